"""`spade-batch show` on a real model and a real run (fit and score on a local Ray), local and on the S3 test server.

The summary is checked against the scores table read with pyarrow and the model card, and against
the bad files this test puts in: two undecodable test images, one empty one, one undecodable
training image.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import pytest

from spade_batch.engine.fit import run_fit
from spade_batch.engine.score import run_score
from spade_batch.formats import listing, storage
from spade_batch.formats.card import load_card
from spade_batch.formats.datasets import make_demo_data
from spade_batch.formats.score_table import read_scores
from spade_batch.method.alignment import suggestion
from tests import tiny
from tests.unit.reports.test_summary import show

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
    settings = tiny.SETTINGS.replace(shard_size=3, storage_options=options or {})
    model, run = storage.join(root, "model"), storage.join(root, "run")
    run_fit(storage.join(local, "train"), model, settings)
    run_score(model, storage.join(local, "test"), run, settings)
    return Outputs(model, run, options, flags)


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
    # The 8 good training images are all in the gallery, and each calibrates against the others (leave-one-out).
    assert training["gallery_images"] == training["calibration_images"] == 8 and training["failed_images"] == 1
    [failure] = summary["failures"]
    assert failure["count"] == 1 and failure["example"] == "good/zz_corrupt.png"
    assert "not an image file" in failure["reason"] and "zz_corrupt" not in failure["reason"]
    # fit measured alignment on the calibration images' matches: 8 images x 16 x 16 layer1 cells x kappa 1
    assert card.alignment.matches == 8 * 16 * 16 and summary["alignment"] == suggestion(card.alignment, card.layers, 64)
    assert summary["alignment"].startswith("normal images")


def test_show_json_on_a_run_matches_the_scores_table(outputs, capsys):
    code, out, _ = show(capsys, outputs.run, "--json", "--top", str(TOP), *outputs.flags)
    assert code == 0
    summary = json.loads(out)
    table = read_scores(listing.list_files(storage.join(outputs.run, "scores"), (".parquet",), outputs.options), outputs.options)
    rows = table.to_pylist()
    scored = [row for row in rows if row["error"] is None]
    anomalous = sum(row["is_anomalous"] for row in scored)
    assert summary["kind"] == "run" and summary["model_uri"] == outputs.model
    assert summary["counts"] == {"images": len(rows), "scored": len(scored), "failed": len(BAD_TEST), "retryable": 0,
                                 "resumed": 0, "anomalous": anomalous, "changed": 0, "restored": 0}
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
    summary_of_model = json.loads(show(capsys, outputs.model, "--json", *outputs.flags)[1])
    card = load_card(outputs.model, outputs.options)
    assert code == 0 and any(line.startswith("backbone") and f"resnet18 (random weights, {card.weights_sha256})" in line for line in out.splitlines())
    assert any(line.startswith("alignment") and line.split(None, 1)[1] == summary_of_model["alignment"] for line in out.splitlines())


