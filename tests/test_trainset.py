"""Training-set hygiene: size outliers found and left out of the gallery and calibration; weak hold-outs warned about.

The end-to-end test fits on a local folder through the Ray pipeline: the reference for a fit with
degenerate images left out is a fit on the same folder without them.
"""

from __future__ import annotations

import json
import math
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
from spade_batch.method.trainset import AREA_FACTOR, ASPECT_FACTOR, calibration_warnings, size_outliers

# ---------------------------------------------------------------- size outliers


def test_images_near_the_median_size_are_not_outliers() -> None:
    ids = [f"{i}.png" for i in range(6)]
    heights, widths = [64, 70, 80, 48, 60, 64], [64, 60, 80, 64, 72, 100]
    assert size_outliers(ids, heights, widths) == {}


@pytest.mark.parametrize(
    ("height", "width", "why"),
    [(1, 1, "area"), (1000, 1000, "area"), (64, 64 * 4, "aspect"), (64 * 4, 64, "aspect"), (100000, 1, "both")],
)
def test_an_image_far_from_the_median_size_is_an_outlier_and_its_size_is_named(height: int, width: int, why: str) -> None:
    ids = ["a.png", "b.png", "c.png", "d.png", "odd.png"]
    outliers = size_outliers(ids, [64, 64, 70, 60, height], [64, 70, 64, 60, width])
    assert list(outliers) == ["odd.png"], why
    assert f"{width} x {height}" in outliers["odd.png"]


@pytest.mark.parametrize("side", ["larger", "smaller", "wider", "taller"])
def test_the_factors_are_limits_either_way(side: str) -> None:
    """5% inside AREA_FACTOR / ASPECT_FACTOR of the median (1000 x 1000) is kept, 5% outside is not."""

    def odd_one(margin: float) -> tuple[int, int]:
        area, aspect = math.sqrt(AREA_FACTOR * margin), math.sqrt(ASPECT_FACTOR * margin)
        height, width = {"larger": (area, area), "smaller": (1 / area, 1 / area), "wider": (1 / aspect, aspect),
                         "taller": (aspect, 1 / aspect)}[side]
        return round(1000 * height), round(1000 * width)

    ids = ["m1", "m2", "m3", "x"]
    for margin, expected in ((0.95, {}.keys()), (1.05, {"x"})):
        height, width = odd_one(margin)
        assert size_outliers(ids, [1000, 1000, 1000, height], [1000, 1000, 1000, width]).keys() == expected, margin


# ---------------------------------------------------------------- calibration hold-out


def test_a_hold_out_large_enough_for_the_fpr_gives_no_warning() -> None:
    scores = np.random.default_rng(0).normal(10, 1, 100)
    assert calibration_warnings(scores, 0.01) == []


def test_a_hold_out_smaller_than_one_over_fpr_is_warned_about() -> None:
    (warning,) = calibration_warnings(np.arange(1.0, 21.0), 0.01)
    assert "only 20 images held out" in warning and "at least 100" in warning
    # The reason: below 1/fpr images the quantile is simply the largest held-out score.
    assert calibrate.image_threshold(np.arange(1.0, 21.0), 0.01) == 20.0


def test_identical_hold_out_scores_are_warned_about() -> None:
    warnings = calibration_warnings(np.zeros(200), 0.01)
    assert len(warnings) == 1 and "duplicate gallery images" in warnings[0]


@pytest.mark.parametrize("scores", [np.array([]), np.array([1.0, np.nan, 2.0]), np.array([np.inf, 1.0])])
def test_no_or_non_finite_hold_out_scores_are_refused(scores: np.ndarray) -> None:
    with pytest.raises(ValueError, match="no calibration scores|not finite"):
        calibration_warnings(scores, 0.01)


# ---------------------------------------------------------------- through fit on Ray


def _held_out_name(stem: str, settings: Settings) -> str:
    """A file name `stem-N.png` that the id-hash split holds out for calibration."""
    return next(f"{stem}-{n}.png" for n in range(1000) if calibrate.is_held_out(f"{stem}-{n}.png", settings.calibration_fraction, settings.seed))


def _gray(height: int, width: int, value: int) -> Image.Image:
    return Image.fromarray(np.full((height, width, 3), value, np.uint8))


@pytest.mark.usefixtures("ray_local")
def test_degenerate_training_images_are_left_out_and_calibration_is_as_without_them(tmp_path: Path) -> None:
    settings = Settings(backbone="resnet18", weights="random", k=3, image_size=64, batch_size=4, shard_size=4,
                        calibration_fraction=0.25, image_fpr=0.1, device="cpu")
    clean = Path(make_demo_data(str(tmp_path / "clean"), n_train=10, n_test_good=0, n_test_per_defect=0,
                                min_size=48, max_size=80)) / "train"
    dirty = tmp_path / "dirty"
    shutil.copytree(clean, dirty)
    tiny, strip = _held_out_name("tiny", settings), _held_out_name("strip", settings)
    broken = _held_out_name("broken", settings)
    _gray(1, 1, 255).save(dirty / tiny)
    _gray(1, 5000, 0).save(dirty / strip)
    (dirty / broken).write_bytes(b"\x89PNG\r\n\x1a\n truncated")

    from spade_batch.engine.fit import run_fit

    reference = run_fit(str(clean), str(tmp_path / "model-clean"), settings)
    summary = run_fit(str(dirty), str(tmp_path / "model-dirty"), settings)

    assert sorted(entry["id"] for entry in summary.left_out) == sorted([tiny, strip])
    assert "1 x 1" in next(e["reason"] for e in summary.left_out if e["id"] == tiny)
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
