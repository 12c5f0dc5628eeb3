"""`nightly --plan`: many lines in one job. A real two-line plan on a local Ray, and the nightly job's script.

The plan file's checks are in tests/unit/test_nightly_plan.py.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path
from urllib.parse import unquote

import pyarrow.parquet as pq
import pytest

from spade_batch import cli
from spade_batch.exit_codes import ExitCode
from spade_batch.formats import retry, storage
from spade_batch.formats.text import BLANK
from tests import tiny
from tests.conftest import TinyModel
from tests.integration.conftest import TEST_RETRY, S3Server
from tests.integration.nights import FLAGS, make_line
from tests.integration.test_jobs import free_port
from tests.unit.test_nightly_plan import write_plan

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
        {"name": "line1", "train": str(line.train), "model": str(model), "images": str(tmp_path / "nowhere" / "{date}"), "out": out,
         "settings": {"image_fpr": 0.05}},  # applied when it fits the model; line2 must agree (else that line is refused)
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
    assert run["settings"]["image_fpr"] == 0.05 == json.loads((model / "spade.json").read_text())["calibration_settings"]["image_fpr"]

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


@pytest.mark.usefixtures("ray_local")
def test_a_failing_line_never_stops_the_next_shows_no_older_figures_and_leaks_no_secret(
    tmp_path: Path, tiny_model: TinyModel, s3: S3Server, s3_bucket: str, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """damaged: its model's index is cut short, and its out holds last night's run; unreachable (the middle line):
    its store's endpoint is closed, and the endpoint's path holds the session token that only its storage_options
    name; healthy: images and out on the S3 test server, scored."""
    monkeypatch.setattr(retry, "RETRY", retry.retry_policy_from(TEST_RETRY))
    model = tmp_path / "damaged-model"
    shutil.copytree(tiny_model.path, model)
    with open(model / "global.faiss", "r+b") as index:
        index.truncate(100)
    last_night = tmp_path / "results" / "damaged"
    last_night.mkdir(parents=True)
    (last_night / "run.json").write_text(json.dumps({"images": 99, "scored": 99, "failed": 0, "anomalous": 7, "drift": {"alarm": True}}))
    (last_night / "report.html").write_text("last night's report")
    token = "opensesame-4b1d-1618"
    unreachable = {"token": token, "client_kwargs": {"endpoint_url": f"http://127.0.0.1:{free_port()}/gateway/{token}"},
                   "config_kwargs": {"retries": {"total_max_attempts": 1}, "connect_timeout": 0.5}}
    good = sorted(Path(tiny_model.train, "test", "good").glob("*.png"))
    for picture in good:
        storage.write_bytes(f"{s3_bucket}/archive/{DATE}/{picture.name}", picture.read_bytes(), s3.storage_options)
    plan = write_plan(tmp_path / "lines.yaml", [
        {"name": "damaged", "train": "/unused", "model": str(model), "images": tiny_model.train, "out": str(last_night)},
        {"name": "unreachable", "train": "/unused", "model": f"{s3_bucket}/model", "images": f"{s3_bucket}/archive/{{date}}",
         "out": f"{s3_bucket}/results/{{name}}", "settings": {"storage_options": unreachable}},
        {"name": "healthy", "train": "/unused", "model": tiny_model.path, "images": f"{s3_bucket}/archive/{{date}}",
         "out": f"{s3_bucket}/results/{{name}}/{{date}}", "settings": {"storage_options": s3.storage_options}},
    ])
    flags = tiny.flags(tiny_model.settings)

    code = cli.main(["nightly", "--plan", str(plan), "--out", str(tmp_path / "plan"), "--date", DATE, *flags, "--device", "cpu"])

    printed = capsys.readouterr()
    assert code == ExitCode.LINES_FAILED, printed.err
    summary = json.loads((tmp_path / "plan" / "plan.json").read_text())
    rows = {row["line"]: row for row in summary["lines"]}
    # A damaged model fails its line (1); an unreachable store is transient: that line is retryable (75), never figures.
    assert [(rows[name]["exit"], rows[name]["images"], rows[name]["drift"]) for name in ("damaged", "unreachable")] == \
        [(1, BLANK, BLANK), (75, BLANK, BLANK)]
    assert "global.faiss" in rows["damaged"]["error"]
    assert f"/gateway/***/{s3_bucket.removeprefix('s3://')}/model" in rows["unreachable"]["error"]  # the token was in the message
    assert (rows["healthy"]["exit"], rows["healthy"]["scored"]) == (0, len(good))
    healthy = f"{s3_bucket}/results/healthy/{DATE}"
    assert summary["reports"] == {"healthy": f"{healthy}/report.html"}
    assert json.loads(storage.read_text(f"{healthy}/run.json", s3.storage_options))["images"] == len(good)
    page = (tmp_path / "plan" / "report.html").read_text()
    assert f"<code>{healthy}/report.html</code>" in page and "href" not in page  # an s3:// URI is no link
    assert "plan: 3 lines, exit status 4" in printed.out and "transient failure" in printed.err
    for text in (printed.out, printed.err, json.dumps(summary), page):
        assert token not in text


def test_the_nightly_job_takes_a_plan(tmp_path: Path) -> None:
    missing = tmp_path / "lines.yaml"
    job = subprocess.run([sys.executable, str(REPO / "jobs" / "nightly.py"), "--plan", str(missing), "--out", str(tmp_path)],
                         capture_output=True, text=True, timeout=120)
    assert job.returncode == ExitCode.USAGE
    assert job.stderr.strip() == f"spade-batch nightly: error: plan file {missing} does not exist"
