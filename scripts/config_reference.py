"""Rewrite the key tables of README.md's "## Configuration reference" from spade_batch.config.describe().

    python scripts/config_reference.py     # updates README.md in place

tests/unit/test_config.py fails when a key, type, default or meaning in README.md differs from the code.
"""

from __future__ import annotations

import pathlib
import re

from spade_batch.config import describe

README = pathlib.Path(__file__).resolve().parents[1] / "README.md"
HEADER = "| key | type | default | meaning |\n|---|---|---|---|\n"


def table(group: str) -> str:
    return HEADER + "".join(f"| `{row.key}` | {row.kind} | `{row.default}` | {row.help} |\n" for row in describe() if row.group == group)


def main() -> None:
    text = README.read_text()
    head, section = text.split("## Configuration reference", 1)
    section, tail = section.split("\n## ", 1)
    for group in dict.fromkeys(row.group for row in describe()):
        pattern = re.compile(rf"(### {group}:[^\n]*\n\n(?:[^\n]+\n\n)?){re.escape(HEADER)}(?:\|[^\n]*\|\n)+")
        section, count = pattern.subn(lambda match: match.group(1) + table(group), section, count=1)
        if count != 1:
            raise SystemExit(f"README.md has no table for group {group}")
    README.write_text(head + "## Configuration reference" + section + "\n## " + tail)


if __name__ == "__main__":
    main()
