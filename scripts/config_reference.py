"""Rewrite the key tables of docs/configuration.md from spade_batch.config.describe().

    python scripts/config_reference.py     # updates docs/configuration.md in place

Each group's table follows its `## <group>: ...` heading (and at most one paragraph under it); the text around
the tables is written by hand. tests/unit/test_config.py fails when a key, type, default or meaning on the page
differs from the code.
"""

from __future__ import annotations

import pathlib
import re

from spade_batch.config import describe

PAGE = pathlib.Path(__file__).resolve().parents[1] / "docs" / "configuration.md"
HEADER = "| key | type | default | meaning |\n|---|---|---|---|\n"


def table(group: str) -> str:
    """The markdown table of one group's keys: key, type, default, meaning."""
    return HEADER + "".join(f"| `{row.key}` | {row.kind} | `{row.default}` | {row.help} |\n" for row in describe() if row.group == group)


def updated(text: str) -> str:
    """`text` (the page) with each group's table replaced by the one the code describes."""
    for group in dict.fromkeys(row.group for row in describe()):
        pattern = re.compile(rf"(^## {group}:[^\n]*\n\n(?:[^\n]+\n\n)?){re.escape(HEADER)}(?:\|[^\n]*\|\n)+", flags=re.M)
        text, count = pattern.subn(lambda match: match.group(1) + table(group), text, count=1)
        if count != 1:
            raise SystemExit(f"{PAGE.name} has no table for group {group} (a '## {group}: ...' heading, then the table)")
    return text


def main() -> None:
    PAGE.write_text(updated(PAGE.read_text()))


if __name__ == "__main__":
    main()
