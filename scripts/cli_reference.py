"""Print README.md's "## Command-line reference" section: `spade-batch <command> --help` at 100 columns.

    python scripts/cli_reference.py     # paste the output over the section in README.md

tests/unit/test_cli.py fails when README.md's section differs from this output.
"""

from __future__ import annotations

import contextlib
import io
import os

COMMANDS = ("fit", "add", "model current", "thresholds", "score", "evaluate", "nightly", "demo", "show", "review", "make-demo-data", "config")
HEADING = "## Command-line reference"
COLUMNS = "100"


def command_help(command: str) -> str:
    """The text `spade-batch <command> --help` prints at COLUMNS columns."""
    os.environ["COLUMNS"] = COLUMNS  # argparse reads the width from the environment
    from spade_batch.cli import build_parser

    out = io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.suppress(SystemExit):
        build_parser().parse_args([*command.split(), "--help"])
    return out.getvalue()


def reference() -> str:
    """The whole section: the heading, then one subsection with a fenced help text per command."""
    parts = [HEADING, ""]
    for command in COMMANDS:
        parts += [f"### spade-batch {command}", "", "```", command_help(command).rstrip("\n"), "```", ""]
    return "\n".join(parts)


if __name__ == "__main__":
    print(reference(), end="")
