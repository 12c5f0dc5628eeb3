"""Training-set hygiene through fit on Ray: degenerate images left out of the gallery and calibration.

The end-to-end test fits on a local folder through the Ray pipeline: the reference for a fit with
degenerate images left out is a fit on the same folder without them. Size outliers and weak
hold-outs alone are in tests/unit/method/test_trainset.py.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from spade_batch.config import Settings
from spade_batch.formats.card import CARD_NAME
from spade_batch.formats.datasets import make_demo_data
from spade_batch.formats.model import SpadeModel
from spade_batch.method import calibrate
from tests import tiny


def _held_out_name(stem: str, settings: Settings) -> str:
    """A file name `stem-N.png` that the id-hash split holds out for calibration."""
    return next(f"{stem}-{n}.png" for n in range(1000) if calibrate.is_held_out(f"{stem}-{n}.png", settings.calibration_fraction, settings.seed))


def _gray(height: int, width: int, value: int) -> Image.Image:
    return Image.fromarray(np.full((height, width, 3), value, np.uint8))


@pytest.mark.usefixtures("ray_local")
def test_degenerate_training_images_are_left_out_and_calibration_is_as_without_them(tmp_path: Path) -> None:
    settings = tiny.SETTINGS.replace(calibration_images="held_out", calibration_fraction=0.25, image_fpr=0.1)
    clean = Path(make_demo_data(str(tmp_path / "clean"), n_train=10, n_test_good=0, n_test_per_defect=0,
                                min_size=48, max_size=80)) / "train"
    dirty = tmp_path / "dirty"
    shutil.copytree(clean, dirty)
    dot, strip = _held_out_name("tiny", settings), _held_out_name("strip", settings)
    broken = _held_out_name("broken", settings)
    _gray(1, 1, 255).save(dirty / dot)
    _gray(1, 5000, 0).save(dirty / strip)
    (dirty / broken).write_bytes(b"\x89PNG\r\n\x1a\n truncated")

    from spade_batch.engine.fit import run_fit

    reference = run_fit(str(clean), str(tmp_path / "model-clean"), settings)
    summary = run_fit(str(dirty), str(tmp_path / "model-dirty"), settings)

    assert sorted(entry["id"] for entry in summary.left_out) == sorted([dot, strip])
    assert "1 x 1" in next(e["reason"] for e in summary.left_out if e["id"] == dot)
    # A failed image that the hash split would have held out is in the failed list all the same.
    assert [f["id"] for f in summary.failures] == [broken] and "cannot decode" in summary.failures[0]["error"]
    assert (summary.gallery_images, summary.calibration_images) == (reference.gallery_images, reference.calibration_images)
    assert summary.thresholds["image"] == pytest.approx(reference.thresholds["image"], rel=1e-5)
    assert summary.thresholds["pixel"] == pytest.approx(reference.thresholds["pixel"], rel=1e-3)
    dirty_model = SpadeModel.load(str(tmp_path / "model-dirty"))
    assert dirty_model.train_ids == SpadeModel.load(str(tmp_path / "model-clean")).train_ids
    # Calibration with ~3 held-out images for an fpr of 0.1 is weak: said in the summary and on the card.
    card = json.loads((tmp_path / "model-dirty" / CARD_NAME).read_text())
    assert summary.warnings == card["calibration"]["warnings"] and "needs at least 10" in summary.warnings[0]

    kept = run_fit(str(dirty), str(tmp_path / "model-kept"), settings.replace(keep_size_outliers=True))
    assert kept.left_out == [] and kept.calibration_images == reference.calibration_images + 2
    # What the left-out images would have done: a held-out 1 x 1 white image raises the image threshold.
    assert kept.thresholds["image"] > 2 * reference.thresholds["image"]


@pytest.mark.usefixtures("ray_local")
def test_a_suspect_training_image_is_listed_and_left_out_on_ray_as_in_process(tmp_path: Path) -> None:
    """12 normal images and one of noise, leave-one-out, suspects leave_out, calibration searched on a model actor in both
    passes: the Ray fit lists and leaves out what the in-process fit does, and calibrates as a fit without the suspects."""
    from spade_batch.engine.fit import run_fit
    from spade_batch.formats.images import decode_image
    from spade_batch.method import detector

    settings = tiny.SETTINGS.replace(calibration_images="leave_one_out", calibration_sample=0, image_fpr=0.1,
                                     suspects="leave_out", model_workers=1)
    train = Path(make_demo_data(str(tmp_path / "data"), n_train=12, n_test_good=0, n_test_per_defect=0, min_size=64, max_size=64)) / "train"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(train / "good" / "noise.png")
    summary = run_fit(str(train), str(tmp_path / "model"), settings)
    on_ray = SpadeModel.load(str(tmp_path / "model"))
    paths = sorted((train / "good").iterdir())
    ids = [f"good/{path.name}" for path in paths]
    in_process = detector.fit([decode_image(path.read_bytes(), str(path)) for path in paths], settings, ids=ids)

    assert "good/noise.png" in [entry["id"] for entry in summary.suspects] and summary.suspects_left_out
    found = [[(e["id"], e["score"]) for e in model.card.calibration.suspects] for model in (on_ray, in_process)]
    assert [i for i, _ in found[0]] == [i for i, _ in found[1]]
    assert [score for _, score in found[0]] == pytest.approx([score for _, score in found[1]], rel=1e-3)
    suspected = {entry["id"] for entry in summary.suspects}
    assert on_ray.train_ids == in_process.train_ids == sorted(set(ids) - suspected)
    assert {entry["id"] for entry in summary.left_out} == suspected
    assert on_ray.card.thresholds.image == pytest.approx(in_process.card.thresholds.image, rel=1e-3)
    assert on_ray.card.calibration.image_scores == pytest.approx(in_process.card.calibration.image_scores, rel=1e-3)
