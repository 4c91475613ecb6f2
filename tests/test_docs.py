"""The reference parts of the docs are generated from the code (`retrofit.reference`) and must be current: the
family tables (from the registry) in README.md and docs/families.md, and docs/cli.md (from the parsers)."""

from __future__ import annotations

from pathlib import Path

from retrofit.reference import ROOT, generated


def test_generated_docs_are_current():
    stale = [str(path.relative_to(ROOT)) for path, text in generated().items() if path.read_text() != text]
    assert not stale, f"{stale} differ from the code; run `python -m retrofit.reference` and commit the result"


def test_every_supported_family_and_command_is_in_the_docs():
    from retrofit.cli import COMMANDS
    from retrofit.families import FAMILIES

    readme, families = (ROOT / "README.md").read_text(), (ROOT / "docs" / "families.md").read_text()
    for family in FAMILIES.values():
        assert family.user_name in (families if family.refusal else readme)
    cli = (ROOT / "docs" / "cli.md").read_text()
    assert all(f"## `retrofit {name}`" in cli for name in COMMANDS)
    assert "`--after-layer K`" in cli and "`--batch-size BATCH_SIZE`" in cli


def test_docs_links_point_at_files_that_exist():
    import re

    for page in [ROOT / "README.md", *(ROOT / "docs").glob("*.md")]:
        for target in re.findall(r"\]\(([^)#]+)(?:#[^)]*)?\)", page.read_text()):
            if not target.startswith("http"):
                assert (page.parent / target).exists(), f"{page.name} links to missing {target}"


def test_readme_is_a_front_door():
    assert len((ROOT / "README.md").read_text()) < 10_000
    assert Path(ROOT / "docs" / "guide.md").is_file()
