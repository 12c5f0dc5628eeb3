"""`spade-batch show` on a real model and a real run (fit and score on a local Ray), local and on the S3 test server.

The summary is checked against the scores table read with pyarrow and the model card, and against
the bad files this test puts in: two undecodable test images, one empty one, one undecodable
training image.
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import pytest

from spade_batch import cli
from spade_batch.config import Settings
from spade_batch.engine.fit import run_fit
from spade_batch.engine.score import run_score
from spade_batch.formats import storage
from spade_batch.formats.card import CalibrationRecord, ModelCard, Thresholds, load_card
from spade_batch.formats.datasets import make_demo_data
from spade_batch.formats.images import Preprocessing
from spade_batch.formats.layout import Outputs as RunOutputs
from spade_batch.formats.layout import part_name
from spade_batch.formats.scores import ScoreRow, read_scores, write_scores
from spade_batch.reports.run_report import read_run_scores
from spade_batch.reports.summary import decision_rules, failure_reason, failures_by_reason, false_alarm_range, run_summary

pytestmark = pytest.mark.usefixtures("ray_local")

BAD_TEST = {"bad/a.png": b"not an image", "bad/b.png": b"also not an image", "bad/c.png": b""}
BAD_TRAIN = {"good/zz_corrupt.png": b"not an image"}
TOP = 3


@dataclass(frozen=True)
class Outputs:
    """A fitted model and a scored run under one root, and the flags that reach that root."""

    model: str
    run: str
    options: dict[str, Any] | None
    flags: list[str]


def write_bad_files(root: str, files: dict[str, bytes], options: dict[str, Any] | None) -> None:
    for name, data in files.items():
        storage.write_bytes(storage.join(root, name), data, options)


@pytest.fixture(scope="module", params=["local", "s3"])
def outputs(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Outputs:
    local = make_demo_data(str(tmp_path_factory.mktemp("data")), n_train=8, n_test_good=2, n_test_per_defect=1, min_size=48, max_size=64)
    if request.param == "local":
        root, options, flags = str(tmp_path_factory.mktemp("out")), None, []
    else:
        s3 = request.getfixturevalue("s3")
        root, options = request.getfixturevalue("new_bucket")(), s3.storage_options
        flags = ["--storage-options", json.dumps(options)]
        fs, path = storage.filesystem(root, options)
        fs.put(local, f"{path}/data", recursive=True)
        local = storage.join(root, "data")
    write_bad_files(storage.join(local, "train"), BAD_TRAIN, options)
    write_bad_files(storage.join(local, "test"), BAD_TEST, options)
    settings = Settings(backbone="resnet18", weights="random", k=3, image_size=64, batch_size=4, shard_size=3,
                        calibration_fraction=0.25, device="cpu", storage_options=options or {})
    model, run = storage.join(root, "model"), storage.join(root, "run")
    run_fit(storage.join(local, "train"), model, settings)
    run_score(model, storage.join(local, "test"), run, settings)
    return Outputs(model, run, options, flags)


def show(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = cli.main(["show", *argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_show_json_on_a_model_gives_the_cards_identity_counts_and_failures(outputs, capsys):
    code, out, _ = show(capsys, outputs.model, "--json", *outputs.flags)
    assert code == 0
    summary = json.loads(out)
    card = load_card(outputs.model, outputs.options)
    assert summary["kind"] == "model" and summary["uri"] == outputs.model
    assert (summary["backbone"], summary["weights"]) == ("resnet18", "random")
    assert summary["weights_sha256"] == card.weights_sha256 and len(card.weights_sha256) == len("sha256:") + 64
    assert summary["settings"]["k"] == 3 and summary["settings"]["image_size"] == 64
    assert summary["thresholds"] == asdict(card.thresholds) and summary["thresholds"]["image"] is not None
    training = summary["training"]
    assert training["gallery_images"] + training["calibration_images"] == 8  # the 8 good training images
    assert training["calibration_images"] >= 1 and training["failed_images"] == 1
    [failure] = summary["failures"]
    assert failure["count"] == 1 and failure["example"] == "good/zz_corrupt.png"
    assert "not an image file" in failure["reason"] and "zz_corrupt" not in failure["reason"]


def test_show_json_on_a_run_matches_the_scores_table(outputs, capsys):
    code, out, _ = show(capsys, outputs.run, "--json", "--top", str(TOP), *outputs.flags)
    assert code == 0
    summary = json.loads(out)
    table = read_scores(storage.list_files(storage.join(outputs.run, "scores"), (".parquet",), outputs.options), outputs.options)
    rows = table.to_pylist()
    scored = [row for row in rows if row["error"] is None]
    anomalous = sum(row["is_anomalous"] for row in scored)
    assert summary["kind"] == "run" and summary["model_uri"] == outputs.model
    assert summary["counts"] == {"images": len(rows), "scored": len(scored), "failed": len(BAD_TEST), "retryable": 0,
                                 "resumed": 0, "anomalous": anomalous}
    assert summary["anomaly_rate"] == pytest.approx(anomalous / len(scored))
    assert summary["thresholds"] == asdict(load_card(outputs.model, outputs.options).thresholds)
    assert summary["timings"]["seconds"] > 0 and summary["timings"]["images_per_second"] > 0
    order = np.argsort([-row["image_score"] for row in scored], kind="stable")[:TOP]
    assert [row["id"] for row in summary["top"]] == [scored[i]["id"] for i in order]
    for shown in summary["top"]:
        row = next(r for r in scored if r["id"] == shown["id"])
        assert shown["image_score"] == pytest.approx(row["image_score"]) and shown["mask_uri"] == row["mask_uri"]
        assert storage.exists(shown["mask_uri"], outputs.options)
    by_reason = {f["count"]: f for f in summary["failures"]}
    assert sorted(by_reason) == [1, 2]
    assert "not an image file" in by_reason[2]["reason"] and by_reason[2]["example"] == "bad/a.png"
    assert "empty" in by_reason[1]["reason"] and by_reason[1]["example"] == "bad/c.png"
    assert summary["settings"]["method"]["k"] == 3 and "storage_options" in summary["settings"]["storage"]


def test_show_prints_tables_with_the_same_facts(outputs, capsys):
    code, out, _ = show(capsys, outputs.run, "--top", str(TOP), *outputs.flags)
    summary = json.loads(show(capsys, outputs.run, "--json", "--top", str(TOP), *outputs.flags)[1])
    assert code == 0
    lines = out.splitlines()
    assert ["failed", str(len(BAD_TEST))] in [line.split() for line in lines]
    assert any(line.startswith("anomalous") and f"{summary['counts']['anomalous']} (" in line for line in lines)
    assert any(line.strip().startswith("2  ") and "not an image file" in line for line in lines)
    top = lines[lines.index(f"top {TOP} images by score") + 1:]
    assert [line.split()[2] for line in top] == [row["id"] for row in summary["top"]]
    assert all(line.endswith(row["mask_uri"]) for line, row in zip(top, summary["top"]))

    code, out, _ = show(capsys, outputs.model, *outputs.flags)
    card = load_card(outputs.model, outputs.options)
    assert code == 0 and any(line.startswith("backbone") and f"resnet18 (random weights, {card.weights_sha256})" in line for line in out.splitlines())


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


def test_show_and_the_run_report_group_the_same_failures_identically(tmp_path):
    root = str(tmp_path / "run")
    outputs = RunOutputs(root)
    big = "ImageError: cannot decode {}: image is {} pixels, over the max_pixels setting (100). Downscale it"
    failures = [  # (id, uri, error), over two part files
        [("a/1.png", "s3://b/x/a/1.png", "ImageError: cannot decode s3://b/x/a/1.png: the file is empty (0 bytes). Re-export it."),
         ("b/2.png", "s3://b/x/b/2.png", big.format("s3://b/x/b/2.png", "10 x 20 = 200")),
         ("s3://b/x/c?.png", "s3://b/x/c?.png", "name rejected: s3://b/x/c?.png has a '?'")],
        [("d/3.png", "s3://b/x/d/3.png", big.format("x/d/3.png", "30 x 40 = 1200")),  # the URI without its scheme
         ("e/4.png", "s3://b/x/e/4.png", "ImageError: cannot decode s3://b/x/e/4.png: the file is empty (0 bytes). Re-export it."),
         ("f/5.png", "s3://b/x/f/5.png", "OSError: read failed\nTraceback (most recent call last): ...")],
    ]
    for part in failures:
        rows = [ScoreRow(id=image_id, uri=uri, error=error) for image_id, uri, error in part]
        write_scores(storage.join(outputs.scores, part_name([row.id for row in rows])), rows)
    run = {"model_uri": "m", "images": 6, "scored": 0, "failed": 6, "retryable": 0, "resumed": 0, "anomalous": None,
           "thresholds": {"image": None, "pixel": None}, "mask_kind": "binary", "seconds": 1.0, "images_per_second": 6.0,
           "settings": {}, "versions": {}}
    storage.write_text(outputs.run_json, json.dumps(run))

    shown = [(f["reason"], f["count"], f["example"]) for f in run_summary(root, top=0)["failures"]]
    reported = [(group.reason, group.count, group.examples[0]) for group in read_run_scores(root, None).failures]

    assert shown == reported
    assert [(reason, count) for reason, count, _ in shown] == [
        ("ImageError: cannot decode <image>: image is N x N = N pixels, over the max_pixels setting (N)", 2),
        ("ImageError: cannot decode <image>: the file is empty (N bytes)", 2),
        ("OSError: read failed", 1),
        ("name rejected: <image> has a '?'", 1),
    ]


@pytest.mark.parametrize(("count", "target"), [(20, 0.05), (200, 0.01), (635, 0.01)])
def test_the_false_alarm_range_is_what_thresholds_set_on_that_many_normal_images_give(count, target):
    """Simulation: thresholds set on `count` uniform normal scores at the (1 - target) quantile ("higher"); the
    false-positive rate each gives on new normal images is 1 - threshold. Its 5% and 95% points match the range."""
    rng = np.random.default_rng(count)
    thresholds = np.quantile(rng.random((20_000, count)), 1 - target, axis=1, method="higher")
    simulated = np.quantile(1 - thresholds, [0.05, 0.95])
    np.testing.assert_allclose(false_alarm_range(count, target), simulated, rtol=0.05, atol=2e-4)


def test_decision_rules_say_how_thresholds_were_set_and_what_they_promise():
    card = ModelCard(settings=Settings().method, preprocessing=Preprocessing(), weights_sha256="sha256:0", layers=[], global_dim=1,
                     train_count=600, train_manifest_sha256="0",
                     thresholds=Thresholds(image=2.5, pixel=1.25, min_region=16, gate_masks=True),
                     calibration=CalibrationRecord(count=600, images="leave_one_out", image_fpr=0.01, pixel_rule="region"))
    rules = decision_rules(card)
    assert rules["calibration"] == "600 normal images (leave-one-out)"
    low, high = false_alarm_range(600, 0.01)
    assert rules["expected false alarms"].startswith("about 10 per 1,000 normal images") and f"{1000 * high:.3g}" in rules["expected false alarms"]
    assert "1.0% of them show a flagged region of 16 pixels" in rules["pixel rule"] and "empty for images not flagged" in rules["masks"]
    uncalibrated = dataclasses.replace(card, thresholds=Thresholds(), calibration=CalibrationRecord())
    assert list(decision_rules(uncalibrated)) == ["calibration"]
