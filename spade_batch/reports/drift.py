"""Did tonight look like the calibration images? Tonight's anomaly rate against its band, and the score distribution.

The band is the image threshold's promise: a new normal image exceeds the threshold with a
probability whose law the card records (image_threshold.FprLaw: Beta(r, n + 1 - r) for the r-th
largest of n calibration scores, with no assumption on how scores are distributed; matched to a
bootstrap for the fitted estimators), so the count of m normal images above it is
BetaBinomial(m, a, b): wide when n (the calibration count in the model card) is small.
Tonight's score distribution is compared with the calibration scores by a two-sample
Kolmogorov-Smirnov test. Each check takes half of FALSE_ALARM_RATE, so a night of normal images
raises the alarm at most that often.

Pure math: no storage, no Ray.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from scipy import stats

from spade_batch.formats.card import CalibrationRecord
from spade_batch.method.image_threshold import FprLaw, law_at

FALSE_ALARM_RATE = 0.01
"""Largest probability that a night like the calibration images raises the drift alarm."""


@dataclass(frozen=True)
class RateBand:
    """Where tonight's anomaly count should lie if tonight's images are like the calibration ones.

    predicted: expected fraction of images above the threshold; low, high: the band's anomaly
    counts (inclusive) for `images` images.
    """

    images: int
    predicted: float
    low: int
    high: int


@dataclass(frozen=True)
class DriftCheck:
    """Tonight against the calibration images: anomaly rate, its band, and the score-distribution test."""

    images: int  # images scored tonight
    anomalous: int
    band: RateBand | None  # None: no image threshold or no calibration count
    ks_pvalue: float | None  # None: no calibration scores in the model card (fitted before they were kept)
    reasons: list[str] = field(default_factory=list)

    @property
    def drifted(self) -> bool:
        return bool(self.reasons)

    @property
    def rate(self) -> float:
        return self.anomalous / self.images if self.images else 0.0

    @property
    def checked(self) -> bool:
        """Whether either check could run: not for a night without a scored image, nor for a model with neither
        a band (image threshold and calibration count) nor calibration scores."""
        return self.band is not None or self.ks_pvalue is not None

    def verdict(self) -> str:
        """In words: the alarm's reasons, "none", or why drift is unknown."""
        if self.drifted:
            return "; ".join(self.reasons)
        if self.checked:
            return "none"
        if not self.images:
            return "unknown: no image was scored"
        return "unknown: the model has no calibration to compare tonight with (no image threshold and calibration count, no calibration scores)"


def rate_band(images: int, law: FprLaw, false_alarm: float = FALSE_ALARM_RATE / 2) -> RateBand:
    """The central 1 - false_alarm of BetaBinomial(images, law.a, law.b): the count of `images` normal images above a
    threshold whose false-positive rate has that law (image_threshold.FprLaw).

    A night of normal images has fewer than `low` or more than `high` anomalies with probability at most false_alarm.
    """
    counts = stats.betabinom(images, law.a, law.b)
    return RateBand(images, law.mean, int(counts.ppf(false_alarm / 2)), int(counts.ppf(1 - false_alarm / 2)))


def check_drift(
    tonight_scores: np.ndarray, anomalous: int, calibration: CalibrationRecord, threshold: float | None,
    false_alarm: float = FALSE_ALARM_RATE, calibrated: float | None = None,
) -> DriftCheck:
    """Tonight's image scores (m,) and anomaly count against the model card's calibration summary.

    calibration: the card's (image_scores is empty for models fitted before they were kept);
    threshold: the image threshold the run applied; calibrated: the card's (image_threshold.law_at: the band of the
    card's own threshold is the promise `show` states).
    """
    scores = np.asarray(tonight_scores, dtype=np.float64)
    reference = np.asarray(calibration.image_scores, dtype=np.float64)
    count = calibration.count
    law = law_at(calibration, threshold, calibrated) if threshold is not None and count > 0 else None
    band = rate_band(scores.size, law, false_alarm / 2) if law is not None and scores.size else None
    ks_pvalue = float(stats.ks_2samp(scores, reference).pvalue) if reference.size and scores.size else None
    reasons = []
    if band is not None and not band.low <= anomalous <= band.high:
        reasons.append(
            f"anomaly rate {anomalous}/{scores.size} = {anomalous / scores.size:.1%} is outside the calibration band "
            f"{band.low}-{band.high} images (predicted {band.predicted:.1%} from {count} calibration images)"
        )
    if ks_pvalue is not None and ks_pvalue < false_alarm / 2:
        reasons.append(
            f"image scores differ from the {reference.size} calibration scores "
            f"(Kolmogorov-Smirnov p = {ks_pvalue:.2g} < {false_alarm / 2:g})"
        )
    return DriftCheck(int(scores.size), anomalous, band, ks_pvalue, reasons)
