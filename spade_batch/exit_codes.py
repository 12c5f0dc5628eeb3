"""The exit status of every command, and how a run's outcome maps to one (docs/operations.md's table is checked against it)."""

from __future__ import annotations

import errno
import os
import re
from collections.abc import Sequence
from enum import IntEnum

from spade_batch.engine.errors import user_error
from spade_batch.formats.text import first_line


class ExitCode(IntEnum):
    OK = 0
    FAILED = 1
    USAGE = 2
    IMAGES_FAILED = 3
    LINES_FAILED = 4
    DRIFT = 5
    RETRYABLE = 75  # EX_TEMPFAIL
    INTERRUPTED = 130  # 128 + SIGINT, as shells report it


MEANING: dict[ExitCode, str] = {
    ExitCode.OK: "success: every image scored, and with `--fail-on-drift` drift checked and no alarm raised",
    ExitCode.FAILED: "infrastructure error: a failed Ray task or a crash (`--log-level DEBUG` shows the traceback), "
    "a location that cannot be written (permission refused, read-only, disk full, a file where a folder is needed: "
    "the message names the path), no image could be scored (or, for `add`, read), or every line of a plan failed",
    ExitCode.USAGE: "usage or input error: a bad flag, setting, storage option or plan file, an input, model or storage location "
    "that cannot be read, or a model that is not what its card says (damaged, cut short, mixed from two fits); "
    "the one-line message names it",
    ExitCode.IMAGES_FAILED: "some images failed: they are recorded with their error in the scores table, the others scored "
    "(`add`: in the new version's card, the others added)",
    ExitCode.LINES_FAILED: "partial plan: some lines of `nightly --plan` failed (see the summary table), the others completed",
    ExitCode.DRIFT: "drift (only with `--fail-on-drift`): tonight's anomaly rate or score distribution is outside "
    "the calibration band, or drift cannot be checked (a model without calibration): the night is not vouched for",
    ExitCode.RETRYABLE: "retryable: storage failed for a transient reason (throttling, 5xx, reset, timeout, an endpoint "
    "down), at the start or for some images; re-run the same command",
    ExitCode.INTERRUPTED: "interrupted (Ctrl-C, SIGINT): what was written is kept; re-run the same command to resume",
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


def add_exit_code(read: int, failed: int, failed_before: int = 0) -> ExitCode:
    """An add's status from how many new images it read and how many failed: FAILED when images failed and none could be
    read (failed_before: how many of the failed ones the model recorded as failed already; with some, IMAGES_FAILED, so
    that a re-run of an add exits as its first run did), IMAGES_FAILED when some failed."""
    if failed:
        return ExitCode.FAILED if read == 0 and not failed_before else ExitCode.IMAGES_FAILED
    return ExitCode.OK


def plan_exit_code(line_codes: Sequence[ExitCode]) -> ExitCode:
    """A plan's status from its lines': FAILED when all failed, LINES_FAILED when some did, else the most severe."""
    failed = [code for code in line_codes if code in (ExitCode.FAILED, ExitCode.USAGE)]
    if failed and len(failed) == len(line_codes):
        return ExitCode.FAILED
    return ExitCode.LINES_FAILED if failed else most_severe(line_codes)


def markdown_table() -> str:
    """docs/operations.md's exit-code table."""
    rows = [f"| {int(code)} | `{code.name}` | {MEANING[code]} |" for code in ExitCode]
    return "\n".join(["| code | name | meaning |", "|---|---|---|", *rows])


_ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")
_TRACEBACK_LAST = re.compile(r"^(?:[A-Za-z_][\w]*\.)*([A-Za-z_]\w*(?:Error|Exception)): (.+)$")
_INPUT_ERRORS = {"ConfigError", "ValueError", "ModelError", "DamagedPartError", "ImageError", "FileNotFoundError", "LockHeldError",
                 "StorageOptionError"}
_PATH_PROBLEMS = {
    errno.EACCES: ("permission denied", "give this job access there or choose another location"),
    errno.EPERM: ("operation not permitted", "give this job access there or choose another location"),
    errno.EROFS: ("read-only file system", "choose a writable output location"),
    errno.ENOSPC: ("no space left on the device", "free space there or choose another output location"),
    errno.EDQUOT: ("disk quota exceeded", "free space there or choose another output location"),
    errno.ENOTDIR: ("a file is where a folder is needed", "remove or rename that file, or choose another output location"),
    errno.EEXIST: ("a file is where a folder is needed", "remove or rename that file, or choose another output location"),
    errno.EISDIR: ("a folder is where a file is needed", "remove or rename that folder, or choose another output location"),
}
"""Storage errors whose cause is the place being written: exit 1, naming the path and what to do."""


def explain(error: BaseException) -> tuple[ExitCode, str]:
    """The exit status of a command that raised `error`, and its one-line message (after "spade-batch CMD: ")."""
    from spade_batch.config import ConfigError
    from spade_batch.formats.retry import is_transient

    cause = user_error(error)
    if is_transient(cause):  # a TransientStorageError, or an error it caused (a model file that could not be read)
        return ExitCode.RETRYABLE, f"error: {first_line(cause)}; re-run the same command"
    if isinstance(cause, OSError) and cause.errno in _PATH_PROBLEMS:
        return ExitCode.FAILED, f"failed: {_path_problem(cause)}"
    if isinstance(cause, (ConfigError, ValueError, OSError, RuntimeError)):
        return ExitCode.USAGE, f"error: {first_line(cause)}"
    names = {cls.__name__ for cls in type(cause).__mro__}
    if "RayActorError" in names:  # an actor that died: only the text of its error is left
        found = [_TRACEBACK_LAST.match(line) for line in _clean(str(cause)).splitlines()]
        last = next((match for match in reversed(found) if match and not match.group(1).startswith("Ray")), None)
        if last is not None:
            code = ExitCode.USAGE if last.group(1) in _INPUT_ERRORS else ExitCode.FAILED
            return code, f"{'error' if code == ExitCode.USAGE else 'failed'}: {last.group(1)}: {last.group(2)}"
    return ExitCode.FAILED, f"failed: {type(cause).__name__}: {first_line(cause)} (--log-level DEBUG shows the traceback)"


def _path_problem(error: OSError) -> str:
    """'<path>: <what is wrong>; <what to do>' for an OSError of _PATH_PROBLEMS."""
    what, todo = _PATH_PROBLEMS[error.errno]
    path = getattr(error, "spade_path", None) or error.filename  # spade_path: see engine.runtime.task_stage
    path = str(path) if path and "\n" not in str(path) else None
    if path and error.errno in (errno.ENOTDIR, errno.EEXIST):
        path = _blocking_file(path)
    return f"{path}: {what}; {todo}" if path else f"{first_line(error)}: {what}; {todo}"


def _blocking_file(path: str) -> str:
    """The file that stands where path (or one of its parent folders) needs a folder: path itself if none is found."""
    current = path
    while current and current != os.path.dirname(current):
        if os.path.lexists(current) and not os.path.isdir(current):
            return current
        current = os.path.dirname(current)
    return path


def _clean(text: str) -> str:
    return _ANSI.sub("", text)
