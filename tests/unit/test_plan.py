"""`nightly --plan`: the plan file's checks, in process. A real two-line plan on a local Ray is in tests/integration/test_plan.py."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from spade_batch import cli
from spade_batch.config import ConfigError, Settings
from spade_batch.exit_codes import ExitCode
from spade_batch.plan import format_table, load_plan


def write_plan(path: Path, lines: list[dict]) -> Path:
    path.write_text(yaml.safe_dump({"lines": lines}, sort_keys=False))
    return path


def line_entry(**changes: object) -> dict:
    return {"name": "a", "train": "/t", "model": "/m", "images": "/i/{date}", "out": "/o/{name}/{date}", **changes}


def test_a_plan_line_takes_the_run_settings_with_its_own_over_them(tmp_path: Path) -> None:
    plan = write_plan(tmp_path / "p.yaml", [line_entry(), line_entry(name="b", settings={"image_fpr": 0.2})])
    lines = load_plan(str(plan), Settings(k=7), frozenset({"k"}))
    assert [(line.name, line.settings.k, line.settings.image_fpr) for line in lines] == [("a", 7, 0.01), ("b", 7, 0.2)]
    assert lines[1].explicit == {"k", "image_fpr"} and lines[0].out == "/o/a/{date}"


@pytest.mark.parametrize("lines, message", [
    ([line_entry(camera="3")], r"line 1: unknown keys camera"),
    ([line_entry(), {"name": "b", "train": "/t"}], r"line 2: missing model, images, out"),
    ([line_entry(), line_entry(settings={"k": "many"})], r"line 2 \(a\): k in .*expected int"),
    ([line_entry(settings={"kk": 3})], r"line 1 \(a\): unknown key 'kk'"),
    ([line_entry(), line_entry()], r"line names must be unique"),
    ([line_entry(name="../up")], r"name '../up' must be letters"),
    ([], r"non-empty list of lines"),
])
def test_a_bad_plan_is_refused_before_any_line_runs_naming_the_line(tmp_path: Path, lines: list, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        load_plan(str(write_plan(tmp_path / "p.yaml", lines)), Settings(), frozenset())


def test_plan_and_single_line_flags_do_not_mix(capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit) as exited:
        cli.main(["nightly", "--plan", "p.yaml", "--train", "/t", "--out", "/o"])
    assert exited.value.code == ExitCode.USAGE
    assert "--plan replaces --train" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli.main(["nightly", "--model", "/m", "--out", "/o"])
    assert "--train, --model and --images are required (or --plan)" in capsys.readouterr().err


def test_the_summary_table_aligns_columns() -> None:
    text = format_table([{"line": "a", "exit": 0}, {"line": "longer", "exit": 75}])
    assert text.splitlines() == ["line    exit", "------  ----", "a       0", "longer  75"]


def test_a_line_that_met_a_transient_storage_failure_is_retryable_not_failed(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """E.g. its store was down when the line started: the plan exits 75, re-run it; another line's success stands."""
    from spade_batch.formats.storage import TransientStorageError
    from spade_batch.plan import run_plan

    plan = write_plan(tmp_path / "p.yaml", [line_entry(out=str(tmp_path / "a")), line_entry(name="b", out=str(tmp_path / "b"))])
    lines = load_plan(str(plan), Settings(), frozenset())

    def run_line(line) -> int:
        if line.name == "a":
            raise TransientStorageError(11, "Cannot list: still failing for a transient reason", "s3://b/imgs")
        return 0

    assert run_plan(lines, str(tmp_path / "plan"), "2026-11-29", None, False, run_line) == ExitCode.RETRYABLE
    assert "a     75    failed" in capsys.readouterr().out
