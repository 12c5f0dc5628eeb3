import html
import json
import os
import re
import shutil

import numpy as np
import pytest
from PIL import Image
from sklearn.metrics import f1_score, roc_auc_score

from spade_batch.formats import listing, storage
from spade_batch.formats.datasets import Sample, read_mask
from spade_batch.formats.images import Preprocessing, cropped_share, preprocess_mask, resize_map
from spade_batch.formats.layout import Outputs
from spade_batch.formats.score_table import read_scores
from spade_batch.reports.evaluate import run_evaluate, subsample
from spade_batch.reports.evaluation_page import FIGURES

from .conftest import SETTINGS  # the settings of the fixture model_uri

TOP_KEYS = ("preprocessing", "settings", "counts", "overall", "per_defect_type", "thresholds", "binning_error_bounds",
            "images_per_second", "every", "evaluation_resolution", "decisions", "working_size", "original_resolution",
            "paper_crop")
PIXEL_KEYS = ("pixel_rocauc", "pro", "au_pro_0.05")


@pytest.fixture(scope="module")
def evaluated(model_uri, category, tmp_path_factory) -> tuple[str, dict]:
    out = str(tmp_path_factory.mktemp("eval"))
    return out, run_evaluate(model_uri, category, out, SETTINGS)  # full preprocessing: original resolution by default


def scored(out: str) -> tuple[list[dict], list[str]]:
    """The scored rows of the scores table (errors dropped) and their labels (the test sub-folder)."""
    table = read_scores(listing.list_files(os.path.join(out, "scores", "scores"), (".parquet",)))
    rows = [row for row in table.to_pylist() if row["error"] is None]
    return rows, [os.path.basename(os.path.dirname(row["uri"])) for row in rows]


def ground_truth(category: str, row: dict, label: str) -> np.ndarray:
    """The image's ground-truth mask as H x W bool, read straight from its PNG (good images: all False)."""
    if label == "good":
        return np.zeros((row["height"], row["width"]), bool)
    stem = os.path.splitext(os.path.basename(row["uri"]))[0]
    mask = np.asarray(Image.open(os.path.join(category, "ground_truth", label, f"{stem}_mask.png"))) > 0
    assert mask.shape == (row["height"], row["width"])  # the demo's masks are at the image's size
    return mask


def copy_model(model_uri: str, target: str, **changes) -> str:
    """A copy of the model whose card has the given top-level entries changed (merged into dicts)."""
    shutil.copytree(model_uri, target)
    card_path = os.path.join(target, "spade.json")
    card = json.loads(open(card_path).read())
    for key, value in changes.items():
        card[key] = {**card[key], **value} if isinstance(value, dict) else value
    open(card_path, "w").write(json.dumps(card))
    return target


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
    for values in [written["overall"], *written["per_defect_type"].values(), written["working_size"]["overall"],
                   *written["working_size"]["per_defect_type"].values()]:
        for name in [*PIXEL_KEYS, *(["image_rocauc"] if "image_rocauc" in values else [])]:  # working_size: pixels only
            assert 0 <= values[name] <= 1, (name, values)
    thresholds = written["thresholds"]
    assert set(thresholds["calibrated"]) == {"image", "pixel"}
    assert set(thresholds["f1_optimal"]) >= {"image", "pixel", "image_f1", "pixel_f1"}
    for name in ("calibrated_image_fpr", "calibrated_image_tpr"):
        assert 0 <= thresholds[name] <= 1
    assert 0 <= written["binning_error_bounds"]["pixel_rocauc"] < 1e-2
    assert set(written["binning_error_bounds"]) == {"pixel_rocauc", "pro", "au_pro_0.05"}
    assert written["paper_crop"] is None  # full preprocessing crops nothing
    decisions = written["decisions"]
    assert set(decisions["thresholds"]) == {"image", "pixel", "source", "sources"} and decisions["thresholds"]["source"] == "calibrated"
    assert set(decisions["image"]) == {"fpr", "tpr", "precision", "f1", "flagged_normal", "normal", "flagged_defective", "defective"}
    assert set(decisions["pixel"]) >= {"seg_f1", "tpr", "fpr", "tp", "fp", "fn", "normal_images_flagged", "normal_images",
                                       "share_normal_images_flagged"}
    assert set(decisions["f1_optimal"]) >= {"thresholds", "image", "pixel"} and decisions["notes"] == []
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


def test_working_size_pixel_rocauc_matches_sklearn_within_binning_bound(evaluated, category):
    out, metrics = evaluated
    working = metrics["working_size"]
    rows, labels = scored(out)
    every_label = set(labels)
    maps, masks = pixels(out, category, rows, labels, every_label, original=False)
    assert masks.size == 15 * 64 * 64
    bound = working["binning_error_bounds"]["pixel_rocauc"] + 1e-9
    assert abs(working["overall"]["pixel_rocauc"] - roc_auc_score(masks, maps)) <= bound
    maps, masks = pixels(out, category, rows, labels, {"good", "crack"}, original=False)
    assert working["per_defect_type"]["crack"]["pixel_rocauc"] == pytest.approx(roc_auc_score(masks, maps), abs=2e-3)


def test_pixel_metrics_are_at_each_images_original_size_by_default(evaluated, category):
    out, metrics = evaluated
    assert metrics["evaluation_resolution"].startswith("each image's original size")
    original = metrics["original_resolution"]
    assert {key: metrics["overall"][key] for key in PIXEL_KEYS} == original["overall"]
    assert set(original["per_defect_type"]) == {"crack", "scratch", "spot"}
    assert metrics["binning_error_bounds"] == original["binning_error_bounds"]
    assert 0 <= original["overall"]["pro"] <= 1 and 0 <= original["overall"]["au_pro_0.05"] <= 1
    rows, labels = scored(out)
    maps, masks = pixels(out, category, rows, labels, set(labels), original=True)
    assert masks.size == sum(row["height"] * row["width"] for row in rows) > 15 * 64 * 64
    bound = original["binning_error_bounds"]["pixel_rocauc"] + 1e-9
    assert abs(metrics["overall"]["pixel_rocauc"] - roc_auc_score(masks, maps)) <= bound
    assert metrics["overall"]["pixel_rocauc"] != metrics["working_size"]["overall"]["pixel_rocauc"]


def test_decision_counts_equal_a_recomputation_from_the_written_masks_and_verdicts(evaluated, category):
    out, metrics = evaluated
    decisions = metrics["decisions"]
    card = json.loads(open(os.path.join(metrics["model"], "spade.json")).read())
    assert {key: decisions["thresholds"][key] for key in ("image", "pixel")} == {key: card["thresholds"][key] for key in ("image", "pixel")}
    assert decisions["thresholds"]["sources"] == {"image": "calibrated", "pixel": "calibrated"}
    rows, labels = scored(out)
    anomalous = np.array([label != "good" for label in labels])

    flagged = np.array([row["is_anomalous"] for row in rows], dtype=bool)
    image = decisions["image"]
    assert (image["flagged_normal"], image["normal"]) == (np.sum(flagged & ~anomalous), 6)
    assert (image["flagged_defective"], image["defective"]) == (np.sum(flagged & anomalous), 9)
    assert image["fpr"] == pytest.approx(np.mean(flagged[~anomalous])) == metrics["thresholds"]["calibrated_image_fpr"]
    assert image["tpr"] == pytest.approx(np.mean(flagged[anomalous])) == metrics["thresholds"]["calibrated_image_tpr"]
    if flagged.any():
        assert image["precision"] == pytest.approx(np.mean(anomalous[flagged]))
    assert image["f1"] == pytest.approx(f1_score(anomalous, flagged))

    run = Outputs(os.path.join(out, "scores"))
    tp = fp = fn = tn = normal_flagged = 0
    for row, label in zip(rows, labels):
        assert row["mask_uri"] == run.mask(row["id"])
        written = np.asarray(Image.open(row["mask_uri"]))
        assert written.shape == (row["height"], row["width"]) and set(np.unique(written)) <= {0, 255}
        written = written > 0
        truth = ground_truth(category, row, label)
        tp += int(np.sum(written & truth))
        fp += int(np.sum(written & ~truth))
        fn += int(np.sum(~written & truth))
        tn += int(np.sum(~written & ~truth))
        normal_flagged += label == "good" and bool(written.any())
    pixel = decisions["pixel"]
    assert (pixel["tp"], pixel["fp"], pixel["fn"], pixel["tn"]) == (tp, fp, fn, tn)
    assert tp > 0 and fp > 0 and fn > 0  # a non-trivial case
    assert tp + fp + fn + tn == sum(row["height"] * row["width"] for row in rows)
    assert pixel["seg_f1"] == pytest.approx(2 * tp / (2 * tp + fp + fn))
    assert pixel["tpr"] == pytest.approx(tp / (tp + fn)) and pixel["fpr"] == pytest.approx(fp / (fp + tn))
    assert (pixel["normal_images_flagged"], pixel["normal_images"]) == (normal_flagged, 6)
    assert pixel["share_normal_images_flagged"] == pytest.approx(normal_flagged / 6)


def test_f1_optimal_decisions_are_the_label_chosen_reference(evaluated, category):
    out, metrics = evaluated
    reference, f1_optimal = metrics["decisions"]["f1_optimal"], metrics["thresholds"]["f1_optimal"]
    assert (reference["thresholds"]["image"], reference["thresholds"]["pixel"]) == (f1_optimal["image"], f1_optimal["pixel"])
    rows, labels = scored(out)
    scores = np.array([row["image_score"] for row in rows])
    anomalous = np.array([label != "good" for label in labels])
    assert reference["image"]["f1"] == pytest.approx(f1_optimal["image_f1"])
    assert reference["image"]["flagged_normal"] == np.sum(scores[~anomalous] >= f1_optimal["image"])
    # Pixels: "score >= threshold" on the saved maps resized to each image's size, exactly (the threshold is a bin edge).
    maps, masks = pixels(out, category, rows, labels, set(labels), original=True)
    predicted = maps >= f1_optimal["pixel"]
    pixel = reference["pixel"]
    assert (pixel["tp"], pixel["fp"], pixel["fn"]) == (np.sum(predicted & masks), np.sum(predicted & ~masks), np.sum(~predicted & masks))
    assert pixel["seg_f1"] == pytest.approx(f1_optimal["pixel_f1"]) == pytest.approx(f1_score(masks, predicted))
    assert f1_optimal["pixel_resolution"] == "each image's original size"


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
    assert "Decisions at the calibrated thresholds vs F1-optimal (label-chosen)" in page
    for text in ("AU-PRO (FPR &lt;= 0.05)", "PRO (FPR &lt;= 0.3)", "(working size)", "pixel SegF1 (pooled)",
                 "normal images with any flagged pixel"):
        assert text in page, text


def test_every_second_image_evaluates_about_half_and_records_it(model_uri, category, tmp_path):
    metrics = run_evaluate(model_uri, category, str(tmp_path), SETTINGS, original_resolution=False, every=2)
    # Per label, sorted: good 000..005 + broken -> 000, 002, 004, broken; each defect type 000, 002.
    assert metrics["every"] == 2
    assert metrics["counts"]["images"] == 10 and metrics["counts"]["failed"] == 1
    assert metrics["counts"]["per_type"] == {"good": 3, "crack": 2, "scratch": 2, "spot": 2}
    listed = open(tmp_path / "test_images.txt").read().split()
    assert len(listed) == 10 and all(os.path.isabs(path) for path in listed)
    assert metrics["original_resolution"] is None  # working resolution only, as asked
    assert metrics["evaluation_resolution"].startswith("working size 64 x 64 only")
    assert {key: metrics["overall"][key] for key in PIXEL_KEYS} == metrics["working_size"]["overall"]
    assert metrics["decisions"]["resolution"].startswith("each image's original size")  # the masks as written
    assert json.loads(open(tmp_path / "metrics.json").read())["every"] == 2


def test_overridden_thresholds_are_the_ones_measured_and_metrics_and_report_go_to_object_storage(model_uri, category, s3, s3_bucket):
    out = f"{s3_bucket}/evaluation"
    settings = SETTINGS.replace(pixel_threshold=0.0, storage_options=s3.storage_options)  # every pixel with a positive score is flagged
    metrics = run_evaluate(model_uri, category, out, settings, every=3)
    decisions = metrics["decisions"]
    assert decisions["thresholds"]["source"] == "override" and decisions["thresholds"]["pixel"] == 0.0
    assert decisions["thresholds"]["sources"] == {"image": "calibrated", "pixel": "override"}
    pixel, image = decisions["pixel"], decisions["image"]
    # Masks are gated by the image verdict (the default): every pixel of a flagged image is flagged, none of the others.
    assert pixel["normal_images_flagged"] == image["flagged_normal"] and pixel["normal_images"] == 2
    assert (pixel["fn"] == 0) == (image["tpr"] == 1.0) and (pixel["tp"] > 0) == (image["flagged_defective"] > 0)
    assert metrics["thresholds"]["calibrated"]["pixel"] != 0.0  # still the model's own
    assert "Decisions at the override thresholds" in storage.read_text(f"{out}/report.html", s3.storage_options)
    written = json.loads(storage.read_text(f"{out}/metrics.json", s3.storage_options))
    assert written["overall"] == pytest.approx(metrics["overall"]) and written["counts"]["images"] == 6  # good 000, 003, broken; 000 of each defect
    names = {path.rsplit("/", 1)[1] for path in listing.list_files(out, (".png", ".html"), s3.storage_options)}
    assert names >= {*FIGURES.values(), "report.html"}


def test_a_model_without_thresholds_gets_null_decisions_with_notes(model_uri, category, tmp_path):
    bare = copy_model(model_uri, str(tmp_path / "bare-model"), thresholds={"image": None, "pixel": None})
    metrics = run_evaluate(bare, category, str(tmp_path / "out"), SETTINGS, every=3)
    decisions = metrics["decisions"]
    assert decisions["image"] is None and decisions["pixel"] is None
    assert decisions["thresholds"] == {"image": None, "pixel": None, "source": "calibrated", "sources": {"image": None, "pixel": None}}
    assert len(decisions["notes"]) == 2 and "no image threshold" in decisions["notes"][0] and "no pixel threshold" in decisions["notes"][1]
    assert decisions["f1_optimal"]["image"]["f1"] > 0  # the reference needs no threshold of the model's
    assert "no pixel threshold" in open(tmp_path / "out" / "report.html").read()


def test_paper_preprocessing_is_measured_at_the_working_size_and_says_what_its_crop_drops(model_uri, category, tmp_path):
    paper = copy_model(model_uri, str(tmp_path / "paper-model"), preprocessing={"mode": "paper"}, settings={"preprocess": "paper"})
    metrics = run_evaluate(paper, category, str(tmp_path / "out"), SETTINGS, every=2)
    assert metrics["original_resolution"] is None and "impossible" in metrics["evaluation_resolution"]
    rows, _ = scored(str(tmp_path / "out"))
    spec = Preprocessing(size=SETTINGS.image_size, mode="paper")
    shares = [cropped_share(row["height"], row["width"], spec) for row in rows]
    crop = metrics["paper_crop"]
    assert crop["images"] == len(rows) == 9 and crop["mean_dropped_share"] == pytest.approx(np.mean(shares))
    assert crop["max_dropped_share"] == pytest.approx(max(shares)) and crop["max_dropped_share"] > crop["square_dropped_share"]
    assert json.loads(open(tmp_path / "out" / "scores" / "run.json").read())["paper_crop"] == crop
    assert "use preprocess: full" in crop["message"] and html.escape(crop["message"]) in open(tmp_path / "out" / "report.html").read()
    # Paper masks are written at the working size and compared there with the ground truth through the same crop.
    assert metrics["decisions"]["resolution"].startswith("working size 64 x 64")
    assert metrics["decisions"]["pixel"]["tp"] + metrics["decisions"]["pixel"]["fp"] + metrics["decisions"]["pixel"]["fn"] \
        + metrics["decisions"]["pixel"]["tn"] == 9 * 64 * 64


def test_original_resolution_is_refused_for_paper_preprocessing(model_uri, tmp_path, category):
    paper_model = copy_model(model_uri, str(tmp_path / "paper-model"), preprocessing={"mode": "paper"}, settings={"preprocess": "paper"})
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
