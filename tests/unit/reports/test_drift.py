"""The drift check's band against a brute-force simulation of calibration + nights, and its verdicts."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from scipy import stats

from spade_batch.formats.card import CalibrationRecord
from spade_batch.method.calibrate import image_threshold
from spade_batch.method.image_threshold import FprLaw, law_at, order_statistic_rank
from spade_batch.reports.drift import check_drift, rate_band

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
    rank = order_statistic_rank(calibration, fpr)  # from the top
    law = stats.betabinom(tonight, rank, calibration + 1 - rank)
    simulated = np.bincount(counts, minlength=tonight + 1) / REPS
    assert np.abs(simulated - law.pmf(np.arange(tonight + 1))).max() < 0.01
    band = rate_band(tonight, FprLaw.order_statistic(calibration, rank), false_alarm=0.01)
    outside = np.mean((counts < band.low) | (counts > band.high))
    assert outside <= 0.01 + 3 * np.sqrt(0.01 * 0.99 / REPS)  # a normal night leaves the band at most 1% of the time
    assert band.predicted == pytest.approx(counts.mean() / tonight, abs=0.01)


def test_the_law_of_the_calibrated_threshold_is_that_of_its_rank_among_the_calibration_scores() -> None:
    rng = np.random.default_rng(1)
    for count in (1, 2, 7, 50, 333):
        scores = rng.normal(size=count)
        record = CalibrationRecord(count=count, image_fpr=0.0, image_scores=sorted(scores.tolist()))
        for fpr in (0.01, 0.05, 0.3):
            threshold = image_threshold(scores, fpr)
            by_rank = law_at(record, threshold, None)  # as an override: where it lies among the scores
            assert by_rank == FprLaw.order_statistic(count, order_statistic_rank(count, fpr))
            assert law_at(dataclasses.replace(record, image_fpr=fpr), threshold, threshold) == by_rank  # the card's own


def test_the_band_narrows_with_more_calibration_images() -> None:
    few = rate_band(100, FprLaw.order_statistic(10, order_statistic_rank(10, 0.1)))
    many = rate_band(100, FprLaw.order_statistic(1000, order_statistic_rank(1000, 0.1)))
    assert many.high - many.low < few.high - few.low


def test_the_band_of_the_cards_threshold_is_its_recorded_law_and_an_override_is_placed_among_the_scores() -> None:
    scores = np.linspace(1.0, 2.0, 50)
    record = CalibrationRecord(count=50, image_fpr=0.01, image_scores=scores.tolist(), image_estimator="pot", fpr_law=[2.0, 198.0])
    calibrated = check_drift(np.ones(30), 0, record, 2.3, calibrated=2.3)  # above every score: a fitted tail's threshold
    assert calibrated.band == rate_band(30, FprLaw(2.0, 198.0), 0.005) and calibrated.band.predicted == 0.01
    override = check_drift(np.ones(30), 0, record, 1.5, calibrated=2.3)  # 25 of 50 scores above it
    assert override.band == rate_band(30, FprLaw.order_statistic(50, 26), 0.005)


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
    assert check.band == rate_band(20, FprLaw.order_statistic(10, order_statistic_rank(10, 0.1)), 0.005)
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
