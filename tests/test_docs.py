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


def _doc_pages() -> list[Path]:
    return [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def _code_lines(page: Path) -> list[str]:
    """The lines of `page`'s fenced code blocks, a backslash-continued command joined into one line."""
    lines, inside = [], False
    for line in page.read_text().splitlines():
        if line.strip().startswith("```"):
            inside = not inside
        elif inside:
            lines.append(line)
    return "\n".join(lines).replace("\\\n", " ").splitlines()


def test_every_command_line_in_the_docs_parses():
    """Each `retrofit ...` command the docs show runs as written as far as the command line goes: its options exist
    and its values pass the settings' checks (no torch, nothing run), and a recipe it names exists; every `--option`
    the docs name anywhere is an option of a retrofit command or of a bench/ script."""
    import re
    import shlex

    from retrofit.cli import COMMANDS, build_parser
    from retrofit.settings import from_namespace

    options = set()
    for name in COMMANDS:
        parser = build_parser([name])._subparsers._group_actions[0].choices[name]
        options.update(flag for action in parser._actions for flag in action.option_strings)
    for script in (ROOT / "bench").glob("*.py"):
        options.update(re.findall(r"""["'](--[a-z0-9-]+)""", script.read_text()))
    foreign = {"--no-deps", "--target", "--num_processes"}  # pip's and accelerate's, in install and launch lines
    commands = 0
    for page in _doc_pages():
        for line in _code_lines(page):
            command = re.match(r"(?:\$ )?(?:accelerate launch .*?-m |\.venv/bin/)?retrofit (.*)", line.strip())
            words = shlex.split(command[1], comments=True) if command else []
            if not words or "..." in words:
                continue
            commands += 1
            try:
                namespace = build_parser(words).parse_args(words)
            except SystemExit:
                raise AssertionError(f"{page.name}: `{line.strip()}` does not parse") from None
            from_namespace(COMMANDS[namespace.command][1], namespace)
            if namespace.command == "run":
                assert (ROOT / namespace.recipe).is_file(), f"{page.name}: no recipe {namespace.recipe}"
        if page.name != "DEV_NOTES.md":
            named = set(re.findall(r"(?<![\w-])(--[a-z][a-z0-9_-]+)", page.read_text()))
            assert not named - options - foreign, f"{page.name} names options nothing has: {named - options - foreign}"
    assert commands > 30


def test_the_guides_convert_example_prints_what_it_shows(capsys):
    """docs/guide.md shows a real `retrofit convert` run on the shipped model: the command prints that table and cost
    line today (run here without --output, so nothing is written and the last line, "wrote ...", is left out)."""
    from retrofit.cli import main

    guide = (ROOT / "docs" / "guide.md").read_text()
    shown = guide.split("```console\n", 1)[1].split("```", 1)[0].splitlines()
    command = shown[0].removeprefix("$ retrofit ").split()
    assert command[:2] == ["convert", "retrofit:fashion-mnist-vit"] and shown[-1] == "wrote out/fm-pm8"
    assert main(command[: command.index("--output")]) == 0
    assert capsys.readouterr().out.splitlines() == shown[1:-1]


def test_every_python_name_the_docs_give_exists():
    """Each `retrofit.module.name` the user docs point at (a function, class or module to read or call) exists."""
    import contextlib
    import importlib
    import re
    from types import ModuleType

    for page in _doc_pages():
        if page.name == "DEV_NOTES.md":
            continue
        for name in set(re.findall(r"\bretrofit(?:\.[A-Za-z_]\w*)+", page.read_text())):
            target = importlib.import_module("retrofit")
            for depth, part in enumerate(name.split(".")[1:], 2):
                if not hasattr(target, part) and isinstance(target, ModuleType):  # a module not imported yet
                    with contextlib.suppress(ModuleNotFoundError):
                        importlib.import_module(".".join(name.split(".")[:depth]))
                assert hasattr(target, part), f"{page.name} names {name}, which does not exist"
                target = getattr(target, part)
