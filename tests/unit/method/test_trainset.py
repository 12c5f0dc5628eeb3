"""Training-set hygiene: size outliers found and left out of the gallery and calibration; weak hold-outs warned about.

The end-to-end test, a fit through the Ray pipeline, is in tests/integration/engine/test_trainset.py.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

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
    assert "only 20 images held out" in warning and "at least 100" in warning and "Add 80 or more normal images held out" in warning
    (warning,) = calibration_warnings(np.arange(1.0, 31.0), 0.01, "leave_one_out")
    assert "only 30 images scored leave-one-out" in warning and "Add 70 or more normal training images" in warning
    # The reason: below 1/fpr images the quantile is simply the largest held-out score.
    assert calibrate.image_threshold(np.arange(1.0, 21.0), 0.01) == 20.0


def test_identical_hold_out_scores_are_warned_about() -> None:
    warnings = calibration_warnings(np.zeros(200), 0.01)
    assert len(warnings) == 1 and "duplicate gallery images" in warnings[0]


@pytest.mark.parametrize("scores", [np.array([]), np.array([1.0, np.nan, 2.0]), np.array([np.inf, 1.0])])
def test_no_or_non_finite_hold_out_scores_are_refused(scores: np.ndarray) -> None:
    with pytest.raises(ValueError, match="no calibration scores|not finite"):
        calibration_warnings(scores, 0.01)
