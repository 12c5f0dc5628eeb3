"""`nightly --plan`: many lines in one job. A real two-line plan on a local Ray, and the nightly job's script.

The plan file's checks are in tests/unit/test_plan.py.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from urllib.parse import unquote

import pyarrow.parquet as pq
import pytest

from spade_batch import cli
from spade_batch.exit_codes import ExitCode
from tests.integration.nights import FLAGS, make_line
from tests.unit.test_plan import write_plan

REPO = Path(__file__).resolve().parents[2]
DATE = "2026-01-02"


@pytest.mark.usefixtures("ray_local")
def test_a_line_whose_images_are_missing_does_not_stop_the_others_and_the_exit_code_says_partial(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    line = make_line(tmp_path / "data", n_train=16, night=6, fit=False)
    model = tmp_path / "models" / "shared"  # missing: the first line fits it, the second finds it
    archive = tmp_path / "archive" / DATE
    archive.parent.mkdir()
    line.normal_night.rename(archive)
    out = str(tmp_path / "results" / "{name}" / "{date}")
    plan = write_plan(tmp_path / "lines.yaml", [
        {"name": "line1", "train": str(line.train), "model": str(model), "images": str(tmp_path / "nowhere" / "{date}"), "out": out},
        {"name": "line2", "train": str(line.train), "model": str(model), "images": str(tmp_path / "archive" / "{date}"), "out": out,
         "settings": {"image_fpr": 0.05}},
    ])

    code = cli.main(["nightly", "--plan", str(plan), "--out", str(tmp_path / "plan" / "{date}"), "--date", DATE, *FLAGS])

    assert code == ExitCode.LINES_FAILED == 4
    assert (model / "spade.json").is_file()
    first, second = tmp_path / "results" / "line1" / DATE, tmp_path / "results" / "line2" / DATE
    assert not (first / "run.json").exists()
    run = json.loads((second / "run.json").read_text())
    ids = sorted(p.name for p in archive.glob("*.png"))
    assert (run["images"], run["scored"]) == (len(ids), len(ids))
    assert sorted(pq.read_table(second / "scores").column("id").to_pylist()) == ids
    assert run["settings"]["image_fpr"] == 0.05  # the line's own setting

    printed = capsys.readouterr().out
    table = printed[printed.index("plan: 2 lines"):].splitlines()
    assert table[0].startswith("plan: 2 lines, exit status 4")
    assert table[1].split()[:3] == ["line", "exit", "status"]
    assert table[3].split()[:3] == ["line1", "1", "failed"] and "nowhere" in table[3]
    assert table[4].split()[:2] == ["line2", "0"] and f"{len(ids)}" in table[4]

    plan_out = tmp_path / "plan" / DATE
    summary = json.loads((plan_out / "plan.json").read_text())
    assert [row["exit"] for row in summary["lines"]] == [1, 0]
    assert list(summary["reports"]) == ["line2"]
    link = (plan_out / unquote(summary["reports"]["line2"])).resolve()
    assert link == (second / "report.html").resolve() and link.is_file()
    assert f'href="{summary["reports"]["line2"]}"' in (plan_out / "report.html").read_text()


def test_the_nightly_job_takes_a_plan(tmp_path: Path) -> None:
    missing = tmp_path / "lines.yaml"
    job = subprocess.run([sys.executable, str(REPO / "jobs" / "nightly.py"), "--plan", str(missing), "--out", str(tmp_path)],
                         capture_output=True, text=True, timeout=120)
    assert job.returncode == ExitCode.USAGE
    assert job.stderr.strip() == f"spade-batch nightly: error: plan file {missing} does not exist"
