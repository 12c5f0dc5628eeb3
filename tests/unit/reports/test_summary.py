"""`spade-batch show`'s errors, and how failures are grouped by reason, in process.

`show` on a real model and run (fit and score on a local Ray, local and on the S3 test server) is in
tests/integration/reports/test_summary.py.
"""

from __future__ import annotations

import os

import pytest

from spade_batch import cli
from spade_batch.reports.summary import failure_reason, failures_by_reason


def show(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = cli.main(["show", *argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_show_on_a_folder_with_neither_is_a_one_line_error(tmp_path, capsys):
    code, out, err = show(capsys, str(tmp_path))
    assert code == 2 and out == ""
    assert err == (
        f"spade-batch show: error: {tmp_path} holds neither a model (spade.json) nor a finished run (run.json): "
        "give a MODEL_URI written by fit or an OUT_URI written by score (evaluate's run is OUT/scores)\n"
    )


def test_show_takes_only_storage_settings(capsys):
    code, _, err = show(capsys, "somewhere", "--k", "3")
    assert code == 2 and "show does not take --k: a method setting" in err


def test_failure_reasons_group_errors_without_uris_or_numbers():
    failures = [
        ("a/1.png", "ImageError: cannot decode s3://b/x/a/1.png: the file is empty (0 bytes). Re-export it."),
        ("b/2.png", "ImageError: cannot decode s3://b/x/b/2.png: the file is empty (0 bytes). Re-export it."),
        ("c.png", "ImageError: cannot decode /d/c.png: image is 10 x 20 = 200 pixels, over the max_pixels setting (100). Downscale"),
    ]
    assert failures_by_reason(failures) == [
        {"reason": "ImageError: cannot decode <image>: the file is empty (N bytes)", "count": 2, "example": "a/1.png"},
        {"reason": "ImageError: cannot decode <image>: image is N x N = N pixels, over the max_pixels setting (N)",
         "count": 1, "example": "c.png"},
    ]
    assert failure_reason(os.path.join("x", "y.png"), "name rejected: x/y.png collides") == "name rejected: <image> collides"
