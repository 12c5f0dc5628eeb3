"""The exit status of every command, and how a run's outcome maps to one (the README's table is checked against it)."""

from __future__ import annotations

from collections.abc import Sequence
from enum import IntEnum


class ExitCode(IntEnum):
    OK = 0
    FAILED = 1
    USAGE = 2
    IMAGES_FAILED = 3
    LINES_FAILED = 4
    DRIFT = 5
    RETRYABLE = 75  # EX_TEMPFAIL


MEANING: dict[ExitCode, str] = {
    ExitCode.OK: "success: every image scored, and no drift alarm raised with `--fail-on-drift`",
    ExitCode.FAILED: "infrastructure error: a failed Ray task or a crash (`--log-level DEBUG` shows the traceback), "
    "no image could be scored, or every line of a plan failed",
    ExitCode.USAGE: "usage or input error: a bad flag, setting or plan file, or an input, model or storage location "
    "that cannot be read; the one-line message names it",
    ExitCode.IMAGES_FAILED: "some images failed: they are recorded with their error in the scores table, the others scored",
    ExitCode.LINES_FAILED: "partial plan: some lines of `nightly --plan` failed (see the summary table), the others completed",
    ExitCode.DRIFT: "drift (only with `--fail-on-drift`): tonight's anomaly rate or score distribution is outside "
    "the calibration band",
    ExitCode.RETRYABLE: "retryable: some images could not be read for a transient reason; re-run the same command",
}

PRECEDENCE = (ExitCode.FAILED, ExitCode.LINES_FAILED, ExitCode.RETRYABLE, ExitCode.DRIFT, ExitCode.IMAGES_FAILED, ExitCode.OK)
"""When a run has several outcomes, the first of these that applies is its exit status."""


def most_severe(codes: Sequence[ExitCode]) -> ExitCode:
    """The first code of PRECEDENCE among `codes` (OK for none)."""
    return next((code for code in PRECEDENCE if code in codes), ExitCode.OK)


def score_exit_code(scored: int, failed: int, retryable: int, drifted: bool, fail_on_drift: bool) -> ExitCode:
    """A scoring run's status from its counts and drift check."""
    if scored == 0 and not retryable:
        return ExitCode.FAILED
    outcomes = [ExitCode.RETRYABLE] * bool(retryable) + [ExitCode.DRIFT] * (drifted and fail_on_drift) + [ExitCode.IMAGES_FAILED] * bool(failed)
    return most_severe(outcomes)


def plan_exit_code(line_codes: Sequence[ExitCode]) -> ExitCode:
    """A plan's status from its lines': FAILED when all failed, LINES_FAILED when some did, else the most severe."""
    failed = [code for code in line_codes if code in (ExitCode.FAILED, ExitCode.USAGE)]
    if failed and len(failed) == len(line_codes):
        return ExitCode.FAILED
    return ExitCode.LINES_FAILED if failed else most_severe(line_codes)


def markdown_table() -> str:
    """The README's exit-code table."""
    rows = [f"| {int(code)} | `{code.name}` | {MEANING[code]} |" for code in ExitCode]
    return "\n".join(["| code | name | meaning |", "|---|---|---|", *rows])
