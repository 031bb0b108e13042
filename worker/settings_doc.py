"""docs/settings.md's table of settings, made from worker/setting_table.py so the two cannot differ.

`python -m worker.settings_doc` rewrites the table between the markers in docs/settings.md (the
prose around it is written by hand); `--check` only says whether the file is up to date, which
tests/test_settings_doc.py also asserts.
"""

from __future__ import annotations

import sys
from pathlib import Path

from worker.setting_table import TABLE, Setting

DOC = Path(__file__).resolve().parents[1] / "docs" / "settings.md"
BEGIN = "<!-- settings table: made from worker/setting_table.py by `python -m worker.settings_doc`; edit it there -->"
END = "<!-- end of settings table -->"
KIND_NAMES = {str: "text", int: "int", float: "float", bool: "bool", tuple: "list"}
HEADER = (
    "| Environment variable | Type | CLI flag (commands) | Default | Meaning |",
    "|---|---|---|---|---|",
)


def _cell(text: str) -> str:
    return text.replace("|", "\\|")


def _flag_cell(setting: Setting) -> str:
    if setting.flag is None:
        return "-"
    repeatable = "; repeatable" if setting.kind is tuple else ""
    return f"`{setting.flag}` ({', '.join(setting.commands)}{repeatable})"


def render_table() -> str:
    """The markdown table, one row per setting, in the table's order."""
    rows = list(HEADER)
    for setting in TABLE:
        default = f"`{setting.text()}`" if setting.text() else "(empty)"
        rows.append(
            f"| `{setting.env}` | {KIND_NAMES[setting.kind]} | {_flag_cell(setting)} | {default} "
            f"| {_cell(setting.meaning)} |"
        )
    return "\n".join(rows)


def with_table(text: str) -> str:
    """`text` (docs/settings.md) with the table between its markers made anew."""
    head, begin, rest = text.partition(BEGIN)
    _old, end, tail = rest.partition(END)
    if not begin or not end:
        raise ValueError(f"{DOC} lacks the markers {BEGIN!r} ... {END!r}")
    return f"{head}{BEGIN}\n{render_table()}\n{END}{tail}"


def main(argv: list[str]) -> int:
    current = DOC.read_text(encoding="utf-8")
    wanted = with_table(current)
    if "--check" in argv:
        if current != wanted:
            print(f"{DOC} differs from worker/setting_table.py: run python -m worker.settings_doc", file=sys.stderr)
            return 1
        return 0
    if current != wanted:
        DOC.write_text(wanted, encoding="utf-8")
        print(f"{DOC} rewritten", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
