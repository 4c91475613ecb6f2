"""The reference parts of the docs, generated from the code so that they cannot drift from it: the family tables
(from the registry, `retrofit.families`) and the command-line reference (from the parsers, `retrofit.cli`).

``python -m retrofit.reference`` rewrites them: docs/cli.md whole, and the blocks between ``<!-- NAME:start -->`` and
``<!-- NAME:end -->`` in README.md and docs/families.md. tests/test_docs.py checks that they are current.
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _supported():
    from .families import FAMILIES

    return [family for family in FAMILIES.values() if family.refusal is None]


def families_summary() -> str:
    """The README's table: one row per family."""
    lines = ["| family | Hub example | classes | prefix tokens |", "|---|---|---|---|"]
    for family in _supported():
        dual = [head.class_name for head in family.heads.values() if head.is_dual_encoder]
        if dual:  # a row of its own: what CLIP/SigLIP users download, for zero-shot classification
            name = f"{family.user_name} dual encoder (zero-shot)"
            lines.append(f"| {name} | `{family.example_id}` | {', '.join(dual)} | {family.prefix_description} |")
        classes = ", ".join(name for name in family.heads if name not in dual)
        if classes:  # SigLIP 2 has no classifier class: its dual encoder's row is all
            lines.append(f"| {family.user_name} | `{family.example_id}` | {classes} | {family.prefix_description} |")
    return "\n".join(lines)


def families_detail() -> str:
    """docs/families.md's table: one row per class, with what its head reads after the merge."""
    lines = [
        "| family | class (loads with) | prefix tokens P | what the head reads after the merge | features distilled |",
        "|---|---|---|---|---|",
    ]
    for family in _supported():
        for index, head in enumerate(family.heads.values()):
            name = f"{family.user_name} (`{family.example_id}`)" if index == 0 else family.user_name
            features = "logits (and the classifier's input)" if head.is_classifier else f"`{head.features}`"
            if head.is_dual_encoder:
                features += " (the text tower stays frozen)"
            lines.append(
                f"| {name} | {head.class_name} (`{head.auto_class}`) | {family.prefix_description} | {head.reads} | "
                f"{features} |"
            )
    return "\n".join(lines)


def family_notes() -> str:
    """docs/families.md's notes: what changes, or breaks, after a merge, per family."""
    return "\n".join(f"- **{family.user_name}**: {family.notes}" for family in _supported() if family.notes)


def refused_families() -> str:
    """docs/families.md's list of the families retrofit recognises and refuses, and why."""
    from .families import FAMILIES

    return "\n".join(
        f"- **{family.user_name}** ({', '.join(f'`{t}`' for t in family.model_types)}): {family.refusal}"
        for family in FAMILIES.values()
        if family.refusal
    )


def cli_reference() -> str:
    """docs/cli.md: every command's options, as ``retrofit COMMAND --help`` gives them, grouped as there."""
    from .cli import COMMANDS, build_parser

    parser = build_parser()
    commands = next(action for action in parser._actions if isinstance(action, argparse._SubParsersAction))
    parts = [
        "# Command-line reference",
        "",
        "Generated from the settings (`retrofit/settings.py`) by `python -m retrofit.reference`; "
        "`retrofit COMMAND --help` prints the same. `retrofit run RECIPE --help` shows the recipe's own values as "
        "the defaults.",
    ]
    for name, (help_line, _, _) in COMMANDS.items():
        sub = commands.choices[name]
        parts += ["", f"## `retrofit {name}`", "", help_line[0].upper() + help_line[1:] + "."]
        for group in sub._action_groups:
            rows = [action for action in group._group_actions if action.help != argparse.SUPPRESS]
            if not rows or all(action.dest == "help" for action in rows):
                continue
            title = {"positional arguments": "Arguments", "options": "Options"}.get(group.title, group.title)
            parts += ["", f"**{title}**", "", "| option | meaning |", "|---|---|"]
            for action in rows:
                if action.dest == "help":
                    continue
                value = "" if action.nargs == 0 else f" {action.metavar or action.dest.upper()}"
                names = (
                    ", ".join(f"`{option}{value}`" for option in action.option_strings) or f"`{action.dest.upper()}`"
                )
                meaning = " ".join((action.help or "").split()).replace("|", "\\|")
                parts.append(f"| {names} | {meaning} |")
    return "\n".join(parts) + "\n"


# file -> (block name -> what fills it)
BLOCKS = {
    "README.md": {"families": families_summary},
    "docs/families.md": {"families": families_detail, "notes": family_notes, "refused": refused_families},
}


def replace_block(text: str, name: str, body: str) -> str:
    """`text` with the block between ``<!-- name:start -->`` and ``<!-- name:end -->`` set to `body`."""
    pattern = re.compile(rf"(<!-- {name}:start -->\n).*?(<!-- {name}:end -->)", re.DOTALL)
    if not pattern.search(text):
        raise ValueError(f"no block '{name}' (<!-- {name}:start --> ... <!-- {name}:end -->)")
    return pattern.sub(lambda match: match.group(1) + body.rstrip("\n") + "\n" + match.group(2), text)


def generated(root: Path = ROOT) -> dict[Path, str]:
    """Every generated file's content, as it should be."""
    files = {root / "docs" / "cli.md": cli_reference()}
    for name, blocks in BLOCKS.items():
        text = (root / name).read_text(encoding="utf-8")
        for block, make in blocks.items():
            text = replace_block(text, block, make())
        files[root / name] = text
    return files


def main() -> int:
    for path, text in generated().items():
        if not path.exists() or path.read_text(encoding="utf-8") != text:
            path.write_text(text, encoding="utf-8")
            print(f"wrote {path.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
