"""The drift check's band against a brute-force simulation of calibration + nights, and its verdicts."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import stats

from spade_batch.formats.card import CalibrationRecord
from spade_batch.method.calibrate import image_threshold
from spade_batch.reports.drift import check_drift, quantile_rank, rate_band, threshold_rank

REPS = 40_000


def simulated_counts(calibration: int, tonight: int, fpr: float, seed: int = 0) -> np.ndarray:
    """Anomaly counts of REPS simulated nights: calibrate on `calibration` normal scores, count `tonight` new ones above."""
    rng = np.random.default_rng(seed)
    reference, nights = rng.normal(size=(REPS, calibration)), rng.normal(size=(REPS, tonight))
    thresholds = np.array([image_threshold(row, fpr) for row in reference])
    return (nights > thresholds[:, None]).sum(axis=1)


@pytest.mark.parametrize("calibration, tonight, fpr", [(6, 10, 0.05), (40, 25, 0.1), (200, 50, 0.01)])
def test_the_band_law_matches_a_simulation_of_calibration_and_night(calibration: int, tonight: int, fpr: float) -> None:
    counts = simulated_counts(calibration, tonight, fpr)
    rank = quantile_rank(calibration, fpr)
    law = stats.betabinom(tonight, calibration - rank + 1, rank)
    simulated = np.bincount(counts, minlength=tonight + 1) / REPS
    assert np.abs(simulated - law.pmf(np.arange(tonight + 1))).max() < 0.01
    band = rate_band(tonight, calibration, rank, false_alarm=0.01)
    outside = np.mean((counts < band.low) | (counts > band.high))
    assert outside <= 0.01 + 3 * np.sqrt(0.01 * 0.99 / REPS)  # a normal night leaves the band at most 1% of the time
    assert band.predicted == pytest.approx(counts.mean() / tonight, abs=0.01)


def test_quantile_rank_is_the_rank_of_the_calibrated_threshold() -> None:
    rng = np.random.default_rng(1)
    for count in (1, 2, 7, 50, 333):
        scores = rng.normal(size=count)
        for fpr in (0.01, 0.05, 0.3):
            assert quantile_rank(count, fpr) == threshold_rank(scores, image_threshold(scores, fpr))


def test_the_band_narrows_with_more_calibration_images() -> None:
    few, many = rate_band(100, 10, quantile_rank(10, 0.1)), rate_band(100, 1000, quantile_rank(1000, 0.1))
    assert many.high - many.low < few.high - few.low


def test_a_normal_night_raises_no_alarm_and_a_night_of_defects_does() -> None:
    rng = np.random.default_rng(2)
    calibration_scores = rng.normal(size=60)
    threshold = image_threshold(calibration_scores, 0.05)
    calibration = CalibrationRecord(count=60, image_fpr=0.05, image_scores=sorted(calibration_scores.tolist()))
    normal = rng.normal(size=40)
    quiet = check_drift(normal, int((normal > threshold).sum()), calibration, threshold)
    assert not quiet.drifted and quiet.band is not None and quiet.ks_pvalue > 0.005

    defects = np.concatenate([rng.normal(size=30), rng.normal(4.0, 1.0, size=10)])
    loud = check_drift(defects, int((defects > threshold).sum()), calibration, threshold)
    assert loud.drifted
    assert loud.anomalous > loud.band.high and "outside the calibration band" in loud.reasons[0]


def test_a_shifted_distribution_alarms_even_when_the_rate_is_in_the_band() -> None:
    rng = np.random.default_rng(3)
    calibration_scores = rng.normal(size=200)
    threshold = float(calibration_scores.max())
    calibration = CalibrationRecord(count=200, image_fpr=0.005, image_scores=sorted(calibration_scores.tolist()))
    shifted = np.minimum(rng.normal(1.0, 0.3, size=200), threshold)  # none above the threshold: the rate is fine
    check = check_drift(shifted, 0, calibration, threshold)
    assert check.band is not None and check.band.low == 0
    assert check.drifted and "Kolmogorov-Smirnov" in check.reasons[0]


def test_an_old_card_without_calibration_scores_still_gets_a_band_from_count_and_fpr() -> None:
    check = check_drift(np.arange(20.0), 15, CalibrationRecord(count=10, image_fpr=0.1), 10.5)
    assert check.ks_pvalue is None
    assert check.band == rate_band(20, 10, quantile_rank(10, 0.1), 0.005)
    assert check.drifted


def test_without_a_threshold_there_is_no_band() -> None:
    check = check_drift(np.arange(5.0), 0, CalibrationRecord(count=10, image_fpr=0.1), None)
    assert check.band is None and not check.drifted


def test_drift_is_unknown_not_none_without_calibration() -> None:
    """A model fitted without calibration images: no band, no calibration scores. Nothing was checked."""
    check = check_drift(np.arange(5.0), 0, CalibrationRecord(count=0), None)
    assert not check.drifted and not check.checked
    assert check.verdict().startswith("unknown: the model has no calibration")
    assert check_drift(np.array([]), 0, CalibrationRecord(count=10, image_fpr=0.1), 1.0).verdict() == "unknown: no image was scored"
    known = check_drift(np.arange(20.0), 2, CalibrationRecord(count=10, image_fpr=0.1), 17.5)
    assert known.checked and known.verdict() == "none"
