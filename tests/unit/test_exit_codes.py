"""Exit statuses: how a run's outcome maps to one, and docs/operations.md's table of them."""

from __future__ import annotations

import errno
from pathlib import Path

import pytest

from spade_batch.exit_codes import (
    MEANING,
    PRECEDENCE,
    ExitCode,
    add_exit_code,
    explain,
    markdown_table,
    plan_exit_code,
    score_exit_code,
)
from spade_batch.formats.model import ModelError
from spade_batch.formats.retry import TransientStorageError

OPERATIONS = Path(__file__).resolve().parents[2] / "docs" / "operations.md"


def test_every_code_is_documented_in_the_operations_page_table() -> None:
    assert set(MEANING) == set(ExitCode) == set(PRECEDENCE) | {ExitCode.USAGE, ExitCode.INTERRUPTED}
    assert markdown_table() in OPERATIONS.read_text(), "regenerate docs/operations.md's exit-code table from exit_codes.markdown_table()"


def test_the_codes_are_distinct_and_keep_the_documented_numbers() -> None:
    assert {code.name: int(code) for code in ExitCode} == {
        "OK": 0, "FAILED": 1, "USAGE": 2, "IMAGES_FAILED": 3, "LINES_FAILED": 4, "DRIFT": 5, "RETRYABLE": 75, "INTERRUPTED": 130,
    }


@pytest.mark.parametrize("scored, failed, retryable, drifted, fail_on_drift, expected", [
    (10, 0, 0, False, False, ExitCode.OK),
    (10, 0, 0, True, False, ExitCode.OK),  # a warning line only
    (10, 0, 0, True, True, ExitCode.DRIFT),
    (9, 1, 0, False, True, ExitCode.IMAGES_FAILED),
    (9, 1, 0, True, True, ExitCode.DRIFT),
    (9, 0, 1, True, True, ExitCode.RETRYABLE),  # the night is not complete yet: re-run first
    (0, 0, 3, False, False, ExitCode.RETRYABLE),
    (0, 5, 0, False, False, ExitCode.FAILED),
])
def test_a_scoring_run_s_code(scored, failed, retryable, drifted, fail_on_drift, expected) -> None:
    assert score_exit_code(scored, failed, retryable, drifted, fail_on_drift) == expected


@pytest.mark.parametrize(
    ("read", "failed", "failed_before", "expected"),
    [(2, 0, 0, ExitCode.OK), (0, 0, 0, ExitCode.OK), (2, 1, 0, ExitCode.IMAGES_FAILED), (0, 1, 0, ExitCode.FAILED),
     (0, 1, 1, ExitCode.IMAGES_FAILED), (0, 2, 1, ExitCode.IMAGES_FAILED)],
)
def test_an_add_s_code_and_its_re_run_s(read, failed, failed_before, expected) -> None:
    """A re-run of an add that read 2 images and failed 1 reads nothing and lists the failure the model recorded: exit 3 as its first run."""
    assert add_exit_code(read, failed, failed_before) == expected


@pytest.mark.parametrize("lines, expected", [
    ([ExitCode.OK, ExitCode.OK], ExitCode.OK),
    ([ExitCode.OK, ExitCode.IMAGES_FAILED, ExitCode.DRIFT], ExitCode.DRIFT),
    ([ExitCode.FAILED, ExitCode.OK], ExitCode.LINES_FAILED),
    ([ExitCode.USAGE, ExitCode.RETRYABLE], ExitCode.LINES_FAILED),
    ([ExitCode.FAILED, ExitCode.USAGE], ExitCode.FAILED),
])
def test_a_plan_s_code(lines, expected) -> None:
    assert plan_exit_code(lines) == expected


# ---------------------------------------------------------------- an error's exit status and line


def ray_task_error(cause: BaseException) -> BaseException:
    """What the driver gets when a Ray task raised `cause`: a RayTaskError that is also an instance of its type."""
    from ray.exceptions import RayTaskError

    return RayTaskError("MapBatches(write_score_outputs)", "\x1b[36mray::MapBatches()\x1b[39m traceback", cause).as_instanceof_cause()


@pytest.mark.parametrize("wrap", [lambda e: e, ray_task_error], ids=["driver", "ray task"])
@pytest.mark.parametrize(
    ("error", "code", "line"),
    [
        (PermissionError(errno.EACCES, "Permission denied", "/out/masks"), 1,
         "failed: /out/masks: permission denied; give this job access there or choose another location"),
        (OSError(errno.EROFS, "Read-only file system", "/out/run.json"), 1,
         "failed: /out/run.json: read-only file system; choose a writable output location"),
        (OSError(errno.ENOSPC, "No space left on device", "/out/maps/a.npy"), 1,
         "failed: /out/maps/a.npy: no space left on the device; free space there or choose another output location"),
        (IsADirectoryError(errno.EISDIR, "Is a directory", "/out/run.json"), 1,
         "failed: /out/run.json: a folder is where a file is needed; remove or rename that folder, or choose another output location"),
        (ModelError("model file m/global.faiss does not match the checksum"), 2, "error: model file m/global.faiss does not match the checksum"),
        (FileNotFoundError(errno.ENOENT, "No such file", "/in/a.png"), 2, "error: [Errno 2] No such file: '/in/a.png'"),
        (TransientStorageError("s3://b/a.png: SlowDown"), 75, "error: s3://b/a.png: SlowDown; re-run the same command"),
        (KeyError("boom"), 1, "failed: KeyError: 'boom' (--log-level DEBUG shows the traceback)"),
    ],
)
def test_an_error_maps_to_its_documented_status_and_one_clean_line(wrap, error, code, line) -> None:
    assert explain(wrap(error)) == (code, line)


def test_ray_data_s_retry_note_does_not_replace_the_path() -> None:
    """Ray Data appends a note to a failed task's exception args, which Ray then rebuilds as the filename."""
    error = NotADirectoryError(errno.ENOTDIR, "Not a directory", "Failed to apply UDF transform after 1/1 attempts.\nTo change ...")
    error.spade_path = "/nowhere/out/masks/good"  # recorded by engine.runtime.task_stage before Ray saw it
    assert explain(ray_task_error(error))[1].startswith("failed: /nowhere/out/masks/good: a file is where a folder is needed")
    del error.spade_path
    assert explain(error)[1].startswith("failed: [Errno 20] Not a directory")  # no path then, never Ray's note


def test_a_file_in_the_way_is_named_rather_than_the_file_to_write(tmp_path) -> None:
    (tmp_path / "masks").write_text("")
    error = NotADirectoryError(errno.ENOTDIR, "Not a directory", str(tmp_path / "masks" / "good" / "a.png"))
    assert explain(error)[1].startswith(f"failed: {tmp_path / 'masks'}: a file is where a folder is needed")


def test_an_actor_that_died_is_named_by_the_error_in_its_text() -> None:
    class RayActorError(Exception):  # as Ray's: only the text of the actor's error is left
        pass

    text = ("The actor died because of an error raised in its creation task, \x1b[36mray::MapWorker()\x1b[39m\n"
            "  File \"x.py\", line 1\nspade_batch.formats.model.ModelError: model file m/pyramid/layer1.npy is 10 bytes")
    assert explain(RayActorError(text)) == (2, "error: ModelError: model file m/pyramid/layer1.npy is 10 bytes")
    code, line = explain(RayActorError("The actor died unexpectedly before finishing this task \x1b[36m(OOM)\x1b[39m"))
    assert code == 1 and "\x1b" not in line


def test_an_error_a_transient_storage_failure_caused_is_retryable() -> None:
    """E.g. a model file that could not be read because the endpoint was down: the store's fault, not the model's."""
    try:
        try:
            raise TransientStorageError(11, "Cannot read: still failing for a transient reason", "s3://b/m/global.faiss")
        except TransientStorageError as error:
            raise ModelError("model file s3://b/m/global.faiss is missing or damaged (...)") from error
    except ModelError as error:
        assert explain(ray_task_error(error)) == (75, "error: model file s3://b/m/global.faiss is missing or damaged (...); re-run the same command")
    throttled = OSError(errno.EBUSY, "Please reduce your request rate.")  # s3fs's SlowDown, had it escaped the retries
    assert explain(throttled)[0] == 75


def test_a_misspelt_storage_option_is_a_usage_error() -> None:
    from spade_batch.formats.storage import StorageOptionError

    error = StorageOptionError("storage option 'secrt' is not one that s3:// storage takes (...)")
    assert explain(ray_task_error(error)) == (2, "error: storage option 'secrt' is not one that s3:// storage takes (...)")
