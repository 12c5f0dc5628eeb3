"""`spade-batch thresholds --labelled`: thresholds from labelled images, published as a new model version."""

from __future__ import annotations

import csv
import json
import os
import shutil

import numpy as np
import pytest
from sklearn.metrics import f1_score

from spade_batch.cli import main
from spade_batch.engine.score import run_score
from spade_batch.formats import listing
from spade_batch.formats.card import load_card
from spade_batch.formats.datasets import read_mask, read_mvtec_category
from spade_batch.formats.images import resize_map
from spade_batch.formats.layout import ModelLayout, Outputs
from spade_batch.formats.score_table import read_scores
from spade_batch.formats.versions import version_numbers
from spade_batch.method.masks import flagged_pixels
from spade_batch.reports.labelled import Target, run_thresholds
from spade_batch.reports.summary import model_summary

from .conftest import SETTINGS


def copy_model(model_uri: str, target: str) -> str:
    shutil.copytree(model_uri, target)
    return target


def card_bytes(model: str) -> bytes:
    with open(ModelLayout(model).card, "rb") as f:
        return f.read()


@pytest.fixture(scope="module")
def labelled(model_uri, category, tmp_path_factory):
    """The command on a copy of the fitted model, its scoring run kept: (model, result, scoring run folder, version 1's card)."""
    root = tmp_path_factory.mktemp("labelled")
    model = copy_model(model_uri, str(root / "model"))
    before = card_bytes(model)
    result = run_thresholds(model, category, SETTINGS, out=str(root / "run"))
    return model, result, str(root / "run" / "scores"), before


def scored_images(run: str, category: str) -> tuple[list[dict], np.ndarray, list[np.ndarray], list[np.ndarray]]:
    """The labelled images' rows (failed ones dropped), labels, saved maps at each image's size and ground truths."""
    samples = {os.path.abspath(s.path): s for s in read_mvtec_category(category, train=False).test}
    rows = [row for row in read_scores(listing.list_files(os.path.join(run, "scores"), (".parquet",))).to_pylist() if row["error"] is None]
    labels = np.array([samples[row["uri"]].is_anomalous for row in rows])
    maps = [resize_map(np.load(Outputs(run).map(row["id"])).astype(np.float32), row["height"], row["width"]) for row in rows]
    truths = [read_mask(samples[row["uri"]].mask_path, row["height"], row["width"]) for row in rows]
    return rows, labels, maps, truths


def test_the_image_threshold_is_the_best_f1_of_a_brute_force_sweep(labelled, category):
    _, result, run, _ = labelled
    rows, labels, _, _ = scored_images(run, category)
    scores = np.array([row["image_score"] for row in rows])
    candidates = [scores.min() - 1, *np.unique(scores)]  # every distinct decision of "score > t"
    best = max(f1_score(labels, scores > t) for t in candidates)
    chosen = result.record.after["image"]
    assert f1_score(labels, scores > chosen) == pytest.approx(best)
    assert result.record.decisions["after"]["image"]["f1"] == pytest.approx(best)
    assert chosen not in scores


def test_the_pixel_threshold_is_the_best_segf1_of_the_gated_masks(labelled, category):
    """Against a direct computation: masks are the maps at each image's size, empty for images the new image
    threshold does not flag (gate_masks, the default); no threshold of a fine grid does better than the chosen one."""
    model, result, run, _ = labelled
    card = load_card(ModelLayout(model).version(2).root)
    assert card.thresholds.gate_masks and card.thresholds.min_region == 0  # the rules this reference applies
    rows, labels, maps, truths = scored_images(run, category)
    flagged_images = [row["image_score"] > result.record.after["image"] for row in rows]
    pooled_truth = np.concatenate([truth.ravel() for truth in truths])

    def seg_f1(threshold: float) -> float:
        masks = [(m > threshold) & flag for m, flag in zip(maps, flagged_images)]
        return f1_score(pooled_truth, np.concatenate([mask.ravel() for mask in masks]))

    chosen = result.record.after["pixel"]
    values = np.concatenate([m.ravel() for m, flag in zip(maps, flagged_images) if flag])
    grid = np.unique(np.r_[np.quantile(values, np.linspace(0, 1, 201)), np.nextafter(np.float32(chosen), np.float32(np.inf))])
    assert seg_f1(chosen) >= max(seg_f1(t) for t in grid) - 1e-12
    assert result.record.decisions["after"]["pixel"]["seg_f1"] == pytest.approx(seg_f1(chosen))
    assert seg_f1(chosen) >= result.record.decisions["before"]["pixel"]["seg_f1"]  # labels do at least as well on themselves


def test_a_new_version_records_how_its_thresholds_were_set(labelled, category):
    model, result, _, before = labelled
    assert version_numbers(model) == [1, 2] and result.version == 2 and result.parent == 1
    old, new = load_card(model), load_card(ModelLayout(model).version(2).root)
    assert card_bytes(model) == before and old.labelled is None  # version 1 is untouched
    record = new.labelled
    assert (record.source, record.kind, record.target) == (category, "mvtec", "best_f1")
    assert (record.normal_images, record.defective_images) == (6, 9)  # the undecodable good image is left out
    assert len(result.failures) == 1 and "999_broken" in result.failures[0]["id"]
    assert record.before == {"image": old.thresholds.image, "pixel": old.thresholds.pixel}
    assert record.after == {"image": new.thresholds.image, "pixel": new.thresholds.pixel} and record.image and record.pixel
    assert (new.version.number, new.version.parent, new.version.images_added) == (2, 1, 0)
    assert new.files == old.files and new.train_count == old.train_count and new.calibration == old.calibration
    for name in new.files:  # the same arrays, linked on a local disk
        assert os.path.samefile(ModelLayout(model).file(name), ModelLayout(model).version(2).file(name))


def test_show_says_which_thresholds_are_label_set(labelled, category, capsys):
    model, _, _, _ = labelled
    summary = model_summary(model)
    assert summary["version"] == 2 and summary["thresholds_set_by"] == "labels (image, pixel)"
    assert [row["thresholds_set_by"] for row in summary["versions"]] == ["normal images", "labels (image, pixel)"]
    assert summary["decisions"]["thresholds set by"].startswith(f"labels: {category} (6 normal, 9 defective images)")
    assert "label-set at best_f1" in summary["decisions"]["image rule"]
    assert main(["show", model]) == 0
    shown = capsys.readouterr().out
    assert "thresholds set by" in shown and "labels (image, pixel)" in shown and "normal images" in shown


def test_the_new_version_decides_with_its_thresholds_and_the_old_one_as_before(labelled, category, tmp_path):
    """Scored against each version, the verdicts and written masks follow that version's card: version 2's are the
    decisions the command printed; version 1's are what it decided before."""
    model, result, run, _ = labelled
    images = os.path.join(run, "..", "test_images.txt")
    for version, column in ((2, "after"), (1, "before")):
        out = str(tmp_path / f"v{version}")
        run_score(model, images, out, SETTINGS, model_version=version)
        rows = [row for row in read_scores(listing.list_files(os.path.join(out, "scores"), (".parquet",))).to_pylist() if row["error"] is None]
        limits = result.record.after if column == "after" else result.record.before
        assert all(row["is_anomalous"] == (row["image_score"] > limits["image"]) for row in rows)
        samples = {os.path.abspath(s.path): s for s in read_mvtec_category(category, train=False).test}
        written = np.concatenate([flagged_pixels(open(row["mask_uri"], "rb").read(), row["mask_uri"]).ravel() for row in rows])
        truth = np.concatenate([read_mask(samples[row["uri"]].mask_path, row["height"], row["width"]).ravel() for row in rows])
        # The printed decisions are recomputed from the saved float16 maps; the run masks float32 ones.
        assert f1_score(truth, written) == pytest.approx(result.record.decisions[column]["pixel"]["seg_f1"], abs=0.01)


def test_a_dry_run_prints_the_decisions_and_publishes_nothing(model_uri, category, tmp_path, capsys):
    model = copy_model(model_uri, str(tmp_path / "model"))
    listing = sorted(os.path.relpath(os.path.join(d, f), model) for d, _, files in os.walk(model) for f in files)
    assert main(["thresholds", "--model", model, "--labelled", category, "--target", "recall=1", "--dry-run",
                 "--shard-size", "8", "--batch-size", "8"]) == 0
    shown = capsys.readouterr().out
    assert "dry run: nothing published" in shown and "image TPR" in shown and "SegF1" in shown
    assert "1.000 (9 of 9)" in shown  # recall=1: every defective labelled image flagged
    assert sorted(os.path.relpath(os.path.join(d, f), model) for d, _, files in os.walk(model) for f in files) == listing


def test_a_review_sheet_sets_the_image_threshold_only(model_uri, category, tmp_path):
    """A sheet has verdicts and no masks: the pixel threshold stays the parent's, and the record says so."""
    model = copy_model(model_uri, str(tmp_path / "model"))
    samples = [s for s in read_mvtec_category(category, train=False).test if "broken" not in s.path]
    sheet = str(tmp_path / "sheet.csv")
    with open(sheet, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["id", "uri", "image_score", "mask_uri", "verdict"])
        for number, sample in enumerate(samples):
            verdict = "" if number % 5 == 4 else "defect" if sample.is_anomalous else "Normal"  # some not reviewed
            writer.writerow([os.path.relpath(sample.path, category), os.path.abspath(sample.path), "0.0", "", verdict])
    result = run_thresholds(model, sheet, SETTINGS, target=Target.parse("recall=0.5"))
    card, parent = load_card(ModelLayout(model).version(2).root), load_card(model)
    record = card.labelled
    assert record.kind == "sheet" and record.image and not record.pixel
    assert card.thresholds.pixel == parent.thresholds.pixel and card.thresholds.image != parent.thresholds.image
    assert record.normal_images + record.defective_images == sum(1 for n in range(len(samples)) if n % 5 != 4)
    assert result.record.decisions["after"]["image"]["tpr"] >= 0.5 and result.record.decisions["after"]["pixel"] is None
    assert model_summary(model)["thresholds_set_by"] == "labels (image)"


def test_labelled_data_of_one_class_or_a_bad_target_is_refused(model_uri, category, tmp_path):
    only_good = tmp_path / "good-only"
    shutil.copytree(os.path.join(category, "test", "good"), only_good / "test" / "good")
    with pytest.raises(ValueError, match="at least one of each"):
        run_thresholds(model_uri, str(only_good), SETTINGS, dry_run=True)
    with pytest.raises(ValueError, match="neither a folder"):
        run_thresholds(model_uri, str(tmp_path / "missing"), SETTINGS, dry_run=True)
    with pytest.raises(ValueError, match="recall=R"):
        Target.parse("recall=1.5")
    assert json.loads(json.dumps(str(Target.parse("recall=0.95")))) == "recall=0.95"
