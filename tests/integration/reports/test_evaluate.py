import json
import os
import re
import shutil

import numpy as np
import pytest
from PIL import Image
from sklearn.metrics import f1_score, roc_auc_score

from spade_batch.config import Settings
from spade_batch.engine.fit import run_fit
from spade_batch.formats import storage
from spade_batch.formats.datasets import Sample, make_demo_data, read_mask
from spade_batch.formats.images import Preprocessing, preprocess_mask, resize_map
from spade_batch.formats.layout import Outputs
from spade_batch.formats.scores import read_scores
from spade_batch.reports.evaluate import FIGURES, run_evaluate, subsample

SETTINGS = Settings(
    backbone="resnet18", weights="random", k=3, image_size=64, shard_size=8, batch_size=8, calibration_fraction=0.25
)
TOP_KEYS = ("preprocessing", "settings", "counts", "overall", "per_defect_type", "thresholds", "binning_error_bounds",
            "images_per_second", "every", "evaluation_resolution")


@pytest.fixture(scope="module")
def category(tmp_path_factory) -> str:
    """Demo data (6 good + 3 per defect type in test) plus one undecodable test image."""
    root = make_demo_data(str(tmp_path_factory.mktemp("data")), n_train=16, n_test_good=6, n_test_per_defect=3,
                          min_size=64, max_size=96)
    with open(os.path.join(root, "test", "good", "999_broken.png"), "wb") as f:
        f.write(b"\x89PNG\r\n\x1a\n not really a png")
    return root


@pytest.fixture(scope="module")
def model_uri(ray_local, category, tmp_path_factory) -> str:
    uri = str(tmp_path_factory.mktemp("model"))
    run_fit(os.path.join(category, "train"), uri, SETTINGS)
    return uri


@pytest.fixture(scope="module")
def evaluated(model_uri, category, tmp_path_factory) -> tuple[str, dict]:
    out = str(tmp_path_factory.mktemp("eval"))
    return out, run_evaluate(model_uri, category, out, SETTINGS, original_resolution=True)


def scored(out: str) -> tuple[list[dict], list[str]]:
    """The scored rows of the scores table (errors dropped) and their labels (the test sub-folder)."""
    table = read_scores(storage.list_files(os.path.join(out, "scores", "scores"), (".parquet",)))
    rows = [row for row in table.to_pylist() if row["error"] is None]
    return rows, [os.path.basename(os.path.dirname(row["uri"])) for row in rows]


def pixels(out: str, category: str, rows: list[dict], labels: list[str], keep: set[str], original: bool):
    """All (map, mask) pixels of the images whose label is in keep, at the working or the original size."""
    spec = Preprocessing(size=SETTINGS.image_size, mode="full")
    maps, masks = [], []
    for row, label in zip(rows, labels):
        if label not in keep:
            continue
        anomaly_map = np.load(Outputs(os.path.join(out, "scores")).map(row["id"])).astype(np.float32)
        stem = os.path.splitext(os.path.basename(row["uri"]))[0]
        mask_path = None if label == "good" else os.path.join(category, "ground_truth", label, f"{stem}_mask.png")
        mask = read_mask(mask_path, row["height"], row["width"])
        if original:
            anomaly_map = resize_map(anomaly_map, row["height"], row["width"])
        else:
            mask = preprocess_mask(mask, spec)
        maps.append(anomaly_map.ravel())
        masks.append(mask.ravel())
    return np.concatenate(maps), np.concatenate(masks)


def test_metrics_json_has_every_key_and_values_in_unit_interval(evaluated):
    out, metrics = evaluated
    written = json.loads(open(os.path.join(out, "metrics.json")).read())
    assert written == json.loads(json.dumps(metrics))
    for key in TOP_KEYS:
        assert key in written, key
    assert written["preprocessing"] == "full 64px"
    assert written["settings"]["k"] == 3 and written["settings"]["backbone"] == "resnet18"
    assert written["counts"] == {"images": 16, "good": 6, "defective": 9, "failed": 1,
                                 "per_type": {"good": 6, "crack": 3, "scratch": 3, "spot": 3}}
    assert written["failed_images"][0]["id"].endswith("999_broken.png")
    assert {t: v["defective"] for t, v in written["per_defect_type"].items()} == {"crack": 3, "scratch": 3, "spot": 3}
    for values in [written["overall"], *written["per_defect_type"].values()]:
        for name in ("image_rocauc", "pixel_rocauc", "pro"):
            assert 0 <= values[name] <= 1, (name, values)
    thresholds = written["thresholds"]
    assert set(thresholds["calibrated"]) == {"image", "pixel"}
    assert set(thresholds["f1_optimal"]) >= {"image", "pixel", "image_f1", "pixel_f1"}
    for name in ("calibrated_image_fpr", "calibrated_image_tpr"):
        assert 0 <= thresholds[name] <= 1
    assert 0 <= written["binning_error_bounds"]["pixel_rocauc"] < 1e-2
    assert written["images_per_second"] > 0
    assert written["every"] == 1


def test_image_rocauc_and_thresholds_match_sklearn(evaluated):
    out, metrics = evaluated
    rows, labels = scored(out)
    scores = np.array([row["image_score"] for row in rows])
    anomalous = np.array([label != "good" for label in labels])
    assert metrics["overall"]["image_rocauc"] == pytest.approx(roc_auc_score(anomalous, scores), abs=1e-12)
    for defect, values in metrics["per_defect_type"].items():
        keep = np.array([label in ("good", defect) for label in labels])
        assert values["image_rocauc"] == pytest.approx(roc_auc_score(anomalous[keep], scores[keep]), abs=1e-12)

    best_f1 = max(f1_score(anomalous, scores >= t) for t in np.unique(scores))
    f1_optimal = metrics["thresholds"]["f1_optimal"]
    assert f1_optimal["image_f1"] == pytest.approx(best_f1)
    assert f1_score(anomalous, scores >= f1_optimal["image"]) == pytest.approx(best_f1)

    calibrated = metrics["thresholds"]["calibrated"]["image"]
    model_card = json.loads(open(os.path.join(metrics["model"], "spade.json")).read())
    assert calibrated == model_card["thresholds"]["image"]
    assert metrics["thresholds"]["calibrated_image_fpr"] == pytest.approx(np.mean(scores[~anomalous] > calibrated))
    assert metrics["thresholds"]["calibrated_image_tpr"] == pytest.approx(np.mean(scores[anomalous] > calibrated))


def test_pixel_rocauc_matches_sklearn_within_binning_bound(evaluated, category):
    out, metrics = evaluated
    rows, labels = scored(out)
    every_label = set(labels)
    maps, masks = pixels(out, category, rows, labels, every_label, original=False)
    assert masks.size == 15 * 64 * 64
    bound = metrics["binning_error_bounds"]["pixel_rocauc"] + 1e-9
    assert abs(metrics["overall"]["pixel_rocauc"] - roc_auc_score(masks, maps)) <= bound
    maps, masks = pixels(out, category, rows, labels, {"good", "crack"}, original=False)
    assert metrics["per_defect_type"]["crack"]["pixel_rocauc"] == pytest.approx(roc_auc_score(masks, maps), abs=2e-3)


def test_original_resolution_adds_metrics_at_each_image_size(evaluated, category):
    out, metrics = evaluated
    assert metrics["evaluation_resolution"].endswith("original size")
    original = metrics["original_resolution"]
    assert set(original["per_defect_type"]) == {"crack", "scratch", "spot"}
    assert 0 <= original["overall"]["pro"] <= 1
    rows, labels = scored(out)
    maps, masks = pixels(out, category, rows, labels, set(labels), original=True)
    assert masks.size == sum(row["height"] * row["width"] for row in rows) > 15 * 64 * 64
    bound = original["binning_error_bounds"]["pixel_rocauc"] + 1e-9
    assert abs(original["overall"]["pixel_rocauc"] - roc_auc_score(masks, maps)) <= bound


def test_report_images_are_readable_pngs_and_the_page_shows_them(evaluated):
    out, _ = evaluated
    for name in FIGURES.values():
        image = Image.open(os.path.join(out, name))
        assert image.format == "PNG", name
        pixels_ = np.asarray(image.convert("RGB"))
        height, width, _ = pixels_.shape
        assert 300 <= width <= 3000 and 250 <= height <= 3000, (name, pixels_.shape)
        assert pixels_.std() > 10, name
        assert len(np.unique(pixels_.reshape(-1, 3), axis=0)) >= 20, name
    page = open(os.path.join(out, "report.html")).read()
    assert set(re.findall(r'<img src="([^"]+)"', page)) == set(FIGURES.values())
    assert "resnet18" in page and "K = 3" in page and "pixel threshold" in page


def test_every_second_image_evaluates_about_half_and_records_it(model_uri, category, tmp_path):
    metrics = run_evaluate(model_uri, category, str(tmp_path), SETTINGS, every=2)
    # Per label, sorted: good 000..005 + broken -> 000, 002, 004, broken; each defect type 000, 002.
    assert metrics["every"] == 2
    assert metrics["counts"]["images"] == 10 and metrics["counts"]["failed"] == 1
    assert metrics["counts"]["per_type"] == {"good": 3, "crack": 2, "scratch": 2, "spot": 2}
    listed = open(tmp_path / "test_images.txt").read().split()
    assert len(listed) == 10 and all(os.path.isabs(path) for path in listed)
    assert metrics["original_resolution"] is None
    assert json.loads(open(tmp_path / "metrics.json").read())["every"] == 2


def test_writes_metrics_and_report_to_object_storage(model_uri, category, s3, s3_bucket):
    out = f"{s3_bucket}/evaluation"
    settings = SETTINGS.replace(storage_options=s3.storage_options)
    metrics = run_evaluate(model_uri, category, out, settings, every=3)
    written = json.loads(storage.read_text(f"{out}/metrics.json", s3.storage_options))
    assert written["overall"] == pytest.approx(metrics["overall"]) and written["counts"]["images"] == 6  # good 000, 003, broken; 000 of each defect
    names = {path.rsplit("/", 1)[1] for path in storage.list_files(out, (".png", ".html"), s3.storage_options)}
    assert names >= {*FIGURES.values(), "report.html"}


def test_original_resolution_is_refused_for_paper_preprocessing(model_uri, tmp_path, category):
    paper_model = str(tmp_path / "paper-model")
    shutil.copytree(model_uri, paper_model)
    card_path = os.path.join(paper_model, "spade.json")
    card = json.loads(open(card_path).read())
    card["preprocessing"]["mode"] = "paper"
    open(card_path, "w").write(json.dumps(card))
    with pytest.raises(ValueError, match="paper.*drop --original-resolution"):
        run_evaluate(paper_model, category, str(tmp_path / "out"), SETTINGS, original_resolution=True)


def test_bad_every_is_refused(tmp_path):
    with pytest.raises(ValueError, match="every must be a positive integer"):
        run_evaluate(str(tmp_path), str(tmp_path), str(tmp_path), SETTINGS, every=0)


def test_subsample_keeps_every_nth_image_of_each_label():
    samples = [Sample(f"/d/test/{label}/{i:03d}.png", label, None) for label in ("good", "crack") for i in range(5)]
    kept = subsample(samples[::-1], 3)
    assert [s.path for s in kept] == [
        "/d/test/crack/000.png", "/d/test/crack/003.png", "/d/test/good/000.png", "/d/test/good/003.png"
    ]
