"""Exit statuses: how a run's outcome maps to one, and the README's table of them."""

from __future__ import annotations

from pathlib import Path

import pytest

from spade_batch.exit_codes import MEANING, PRECEDENCE, ExitCode, markdown_table, plan_exit_code, score_exit_code

README = Path(__file__).resolve().parents[2] / "README.md"


def test_every_code_is_documented_in_the_readme_table() -> None:
    assert set(MEANING) == set(ExitCode) == set(PRECEDENCE) | {ExitCode.USAGE}
    assert markdown_table() in README.read_text(), "regenerate the README's exit-code table from exit_codes.markdown_table()"


def test_the_codes_are_distinct_and_keep_the_documented_numbers() -> None:
    assert {code.name: int(code) for code in ExitCode} == {
        "OK": 0, "FAILED": 1, "USAGE": 2, "IMAGES_FAILED": 3, "LINES_FAILED": 4, "DRIFT": 5, "RETRYABLE": 75,
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


@pytest.mark.parametrize("lines, expected", [
    ([ExitCode.OK, ExitCode.OK], ExitCode.OK),
    ([ExitCode.OK, ExitCode.IMAGES_FAILED, ExitCode.DRIFT], ExitCode.DRIFT),
    ([ExitCode.FAILED, ExitCode.OK], ExitCode.LINES_FAILED),
    ([ExitCode.USAGE, ExitCode.RETRYABLE], ExitCode.LINES_FAILED),
    ([ExitCode.FAILED, ExitCode.USAGE], ExitCode.FAILED),
])
def test_a_plan_s_code(lines, expected) -> None:
    assert plan_exit_code(lines) == expected
