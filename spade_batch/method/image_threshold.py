"""The image threshold from normal calibration scores, what it promises, and the calibration images that look wrong.

One concept: n normal images' image scores (leave-one-out or held out; squared distances, so >= 0) give a
threshold that new normal images exceed with a rate near image_fpr. Estimators (config image_estimator):

order_statistic  np.quantile(scores, 1 - image_fpr, method="higher"), the r-th largest score. Exact and
                 assumption-free: its false-positive rate on new normal images is Beta(r, n + 1 - r)
                 distributed (mean r / (n + 1)). Below about 1/image_fpr images it is the largest score,
                 and one odd normal image decides.
pot              peaks over threshold (SPOT, Siffer et al., KDD 2017): a generalised Pareto (loc fixed at u; maximum
                 likelihood with shape >= XI_MIN, gpd_fit) fitted to the scores above u, the (n_u + 1)-th largest score,
                 n_u = max(MIN_EXCESSES, ceil(TAIL_FRACTION * n)); threshold
                 z = u + sigma / xi * ((image_fpr * n / n_u) ** -xi - 1) (xi -> 0: u - sigma * log(image_fpr * n / n_u)).
lognormal        a log-normal fitted robustly: m = median of log scores, s = 1.4826 * their MAD;
                 threshold exp(m + z_(1 - image_fpr) * s).

The fitted estimators' uncertainty is a bootstrap: the scores are resampled BOOTSTRAP times (seed SEED), the
model refitted, and the fixed threshold's exceedance probability under each refit is a draw of its
false-positive rate. Every estimator states its promise as one law, `FprLaw`, a Beta distribution (exact for the
order statistic; for the others, matched to the draws' mean and variance): its mean is the expected false-alarm
rate, its 5% and 95% quantiles the 90% range, and its Beta-binomial gives drift's band for a night.
How often the true rate lies in the stated 90% range (simulated, image_fpr 0.01-0.02): order_statistic 0.90 by
construction; lognormal 0.90 on log-normal scores (n 50); pot 0.79 (n 100) and 0.68 (n 30) on gamma(3) scores, whose
true rate averaged 1.5x and 2.9x the target: with few excesses the bootstrap does not see the tail model's bias, so
pot's range is too narrow there (benchmarks across training-set sizes decide the default).

Few scores: pot needs MIN_SCORES["pot"], lognormal MIN_SCORES["lognormal"]; with fewer (or scores that cannot be
fitted: no spread, no positive score, a target inside the bulk of the scores) they fall back to the order statistic
and say why (ImageThreshold.note). Log scores: a score <= 0 (an image duplicating a gallery image) counts as the
smallest positive score, so it can neither break the log nor move the upper tail.

Suspect training images: a calibration image whose log score lies more than SUSPECT_MADS robust standard
deviations (1.4826 * MAD) above the median of log scores (suspects).

Pure math: numpy and scipy, no torch (reports import it for the promise).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np
from scipy import optimize, stats

from spade_batch.formats.card import CalibrationRecord

ESTIMATORS = ("order_statistic", "pot", "lognormal")
LEVEL = 0.9
"""The probability the stated range of the false-positive rate holds."""
MIN_SCORES = {"order_statistic": 1, "pot": 16, "lognormal": 10}
"""Fewest calibration scores each estimator fits on; with fewer it falls back to the order statistic."""
TAIL_FRACTION = 0.1
"""pot: share of the scores above the tail threshold u (u near the 90th percentile) ..."""
MIN_EXCESSES = 8
"""... and at least this many, so that the two tail parameters rest on more than a handful of points."""
BOOTSTRAP = 100
"""Resamples of the scores behind a fitted estimator's FPR law (about 1 s for pot on one core)."""
SEED = 0
MAD_SCALE = 1.4826
"""MAD x MAD_SCALE estimates the standard deviation of normally distributed values."""
SUSPECT_MADS = 3.5
"""Iglewicz and Hoaglin's cut for the modified z-score: a log-normal sample flags 2.3e-4 of its points, so about
one normal image in 4,300 is suspected wrongly, while an image scoring 1.5x the median's tail is caught."""


@dataclass(frozen=True)
class FprLaw:
    """The false-positive rate on new normal images of a threshold set on n normal scores: Beta(a, b)."""

    a: float
    b: float

    @classmethod
    def order_statistic(cls, count: int, rank: int) -> FprLaw:
        """The r-th largest of `count` scores (rank 1: the largest): Beta(r, count + 1 - r), exactly."""
        if not 1 <= rank <= count:
            raise ValueError(f"rank must be in [1, {count}], got {rank}")
        return cls(float(rank), float(count + 1 - rank))

    @classmethod
    def matching(cls, draws: np.ndarray) -> FprLaw:
        """The Beta law with the mean and variance of these draws of a rate (variance clipped into a Beta's reach)."""
        mean = float(np.clip(np.mean(draws), 1e-9, 1 - 1e-9))
        variance = float(np.clip(np.var(draws), 1e-12 * mean, mean * (1 - mean) * (1 - 1e-6)))
        common = mean * (1 - mean) / variance - 1
        return cls(mean * common, (1 - mean) * common)

    @property
    def mean(self) -> float:
        return self.a / (self.a + self.b)

    def range(self, level: float = LEVEL) -> tuple[float, float]:
        """The central `level` interval of the rate."""
        law = stats.beta(self.a, self.b)
        return float(law.ppf((1 - level) / 2)), float(law.ppf((1 + level) / 2))


@dataclass(frozen=True)
class ImageThreshold:
    """An image threshold and its promise on new normal images.

    Attributes:
        threshold: an image is anomalous when its score > threshold (score units).
        estimator: the estimator that set it (the one asked for, or order_statistic after a fallback).
        law: its false-positive rate on new normal images (FprLaw).
        count: n, the calibration scores it was set on.
        supported_fpr: the smallest target these n images evidence: 1 / (n + 1), the expected rate of their largest
            score; a smaller image_fpr is the largest score (order_statistic) or an extrapolation of the fitted tail.
        rank: order_statistic: which largest score it is (1: the largest); None for the fitted estimators.
        note: why the estimator asked for was not used ("" when it was).
    """

    threshold: float
    estimator: str
    law: FprLaw
    count: int
    supported_fpr: float
    rank: int | None = None
    note: str = ""

    @property
    def expected_fpr(self) -> float:
        return self.law.mean

    @property
    def fpr_range(self) -> tuple[float, float]:
        """The LEVEL (90%) range of its false-positive rate."""
        return self.law.range()


def order_statistic_rank(count: int, image_fpr: float) -> int:
    """Which largest of `count` scores np.quantile(scores, 1 - image_fpr, method="higher") is (1: the largest)."""
    return count - min(count, math.ceil((1.0 - image_fpr) * (count - 1)) + 1) + 1


def estimate_image_threshold(
    scores: np.ndarray, image_fpr: float, estimator: str, bootstrap: int = BOOTSTRAP, seed: int = SEED,
) -> ImageThreshold:
    """The threshold of `estimator` on n normal image scores (n,) for target image_fpr, with its promise.

    Raises ValueError for no scores, non-finite ones, an unknown estimator or a target outside (0, 1).
    """
    scores = np.asarray(scores, np.float64)
    if scores.size == 0:
        raise ValueError("no calibration scores: hold out some normal images (calibration_fraction > 0)")
    if not np.all(np.isfinite(scores)):
        raise ValueError(f"{int((~np.isfinite(scores)).sum())} of {scores.size} calibration scores are not finite")
    if estimator not in ESTIMATORS:
        raise ValueError(f"image_estimator {estimator!r} is not one of {', '.join(ESTIMATORS)}")
    if not 0 < image_fpr < 1:
        raise ValueError(f"image_fpr must be in (0, 1), got {image_fpr}")
    if estimator == "order_statistic":
        return order_statistic(scores, image_fpr)
    if scores.size < MIN_SCORES[estimator]:
        return order_statistic(scores, image_fpr, f"{estimator} needs at least {MIN_SCORES[estimator]} calibration scores, "
                                                  f"there are {scores.size}: the order statistic is used")
    fit = TAILS[estimator]
    fitted = fit(scores)
    problem = fitted.problem(image_fpr) if fitted is not None else "the scores do not vary enough to fit it"
    if problem:
        return order_statistic(scores, image_fpr, f"{estimator} cannot set this threshold ({problem}): the order statistic is used")
    threshold = fitted.quantile(image_fpr)
    draws = bootstrap_rates(scores, threshold, fit, bootstrap, seed)
    return ImageThreshold(threshold, estimator, FprLaw.matching(draws), int(scores.size), 1 / (scores.size + 1))


def order_statistic(scores: np.ndarray, image_fpr: float, note: str = "") -> ImageThreshold:
    """Today's rule: the r-th largest score (np.quantile "higher"), with its exact Beta law."""
    count = int(scores.size)
    rank = order_statistic_rank(count, image_fpr)
    threshold = float(np.quantile(scores, 1.0 - image_fpr, method="higher"))
    return ImageThreshold(threshold, "order_statistic", FprLaw.order_statistic(count, rank), count, 1 / (count + 1), rank, note)


class Tail(Protocol):
    """A fitted model of the scores' upper tail: the threshold of a target rate, and the rate of a threshold."""

    def quantile(self, rate: float) -> float:
        """The score new normal images exceed with probability `rate`."""

    def sf(self, threshold: float) -> float:
        """The probability a new normal image scores above `threshold`."""

    def problem(self, rate: float) -> str:
        """Why this fit cannot set the threshold of `rate` ("" when it can)."""


@dataclass(frozen=True)
class PotTail:
    """A generalised Pareto over the scores above u: shape xi, scale sigma (score units), n_u of n scores above u."""

    u: float
    xi: float
    sigma: float
    n_u: int
    n: int
    empirical: np.ndarray

    @staticmethod
    def tail_count(count: int) -> int:
        """n_u, the scores the tail is fitted to."""
        return max(MIN_EXCESSES, math.ceil(TAIL_FRACTION * count))

    @classmethod
    def of(cls, scores: np.ndarray) -> PotTail | None:
        """The maximum-likelihood fit to the excesses over u (gpd_fit); None when fewer than 3 scores lie above u."""
        ordered = np.sort(scores)
        n_u = cls.tail_count(ordered.size)
        if n_u >= ordered.size:
            return None
        u = float(ordered[ordered.size - n_u - 1])
        excesses = ordered[ordered > u]
        if excesses.size < 3:
            return None
        xi, sigma = gpd_fit(excesses - u)
        return cls(u, xi, sigma, int(excesses.size), int(ordered.size), ordered)

    def quantile(self, rate: float) -> float:
        ratio = rate * self.n / self.n_u
        if abs(self.xi) < 1e-9:
            return self.u - self.sigma * math.log(ratio)
        return self.u + self.sigma / self.xi * (ratio ** -self.xi - 1)

    def sf(self, threshold: float) -> float:
        if threshold <= self.u:
            return float(np.mean(self.empirical > threshold))
        return self.n_u / self.n * float(stats.genpareto.sf(threshold, self.xi, loc=self.u, scale=self.sigma))

    def problem(self, rate: float) -> str:
        if rate * self.n >= self.n_u:
            return f"the target lies inside the {self.n_u} highest of {self.n} scores, not beyond them"
        return ""


@dataclass(frozen=True)
class LogNormal:
    """A log-normal: log scores with median m and robust standard deviation s (MAD_SCALE x their MAD)."""

    m: float
    s: float

    @classmethod
    def of(cls, scores: np.ndarray) -> LogNormal | None:
        """The robust fit (robust_log_scale); None when the scores have no positive value or no spread."""
        fitted = robust_log_scale(scores)
        return None if fitted is None else cls(*fitted)

    def quantile(self, rate: float) -> float:
        return float(math.exp(self.m + stats.norm.isf(rate) * self.s))

    def sf(self, threshold: float) -> float:
        return float(stats.norm.sf((math.log(threshold) - self.m) / self.s)) if threshold > 0 else 1.0

    def problem(self, rate: float) -> str:
        return ""


XI_MIN = -0.5
"""Smallest generalised Pareto shape fitted: below -1 the likelihood is unbounded (a fit to a handful of points runs
there, its endpoint at the largest score), and above -0.5 maximum likelihood is regular (Smith 1985)."""


def gpd_profile(theta: np.ndarray, excesses: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Grimshaw's reduction of the generalised Pareto likelihood of excesses (k,) > 0 to theta = xi / sigma: for each
    theta (m,), the best shape xi = mean(log(1 + theta * excesses)), its scale xi / theta and the log-likelihood,
    each (m,); theta near 0 is the exponential (xi = 0, sigma = mean excess)."""
    theta = np.atleast_1d(np.asarray(theta, np.float64))
    logs = np.log1p(np.outer(theta, excesses))
    xi = logs.mean(axis=1)
    flat = np.abs(theta) * excesses.max() < 1e-9
    sigma = np.where(flat, excesses.mean(), xi / np.where(flat, 1.0, theta))
    loglik = -excesses.size * (np.log(sigma) + 1 + np.where(flat, 0.0, xi))
    return np.where(flat, 0.0, xi), sigma, loglik


def gpd_fit(excesses: np.ndarray) -> tuple[float, float]:
    """(xi, sigma): the maximum-likelihood generalised Pareto of excesses (k,) > 0 (loc 0) with xi >= XI_MIN, by a search
    over Grimshaw's one-parameter profile (gpd_profile), as SPOT does. Where scipy.stats.genpareto.fit(excesses, floc=0)
    finds a maximum with xi >= XI_MIN it is the same one, in about 1 ms instead of 20-100."""
    edge = -1 / float(excesses.max())  # theta above it keeps 1 + theta * excess > 0
    near = edge * (1 - 1e-9)

    def above_min(theta: float) -> float:
        return float(gpd_profile(np.array([theta]), excesses)[0][0]) - XI_MIN

    lowest = near if above_min(near) >= 0 else optimize.brentq(above_min, near, 0.0)  # xi grows with theta
    grid = np.concatenate([lowest * np.linspace(1, 0, 30, endpoint=False), [0.0], np.logspace(-4, 4, 50) / float(excesses.mean())])
    best = int(np.nanargmax(gpd_profile(grid, excesses)[2]))
    low, high = grid[max(best - 1, 0)], grid[min(best + 1, grid.size - 1)]
    refined = optimize.minimize_scalar(lambda theta: -float(gpd_profile(np.array([theta]), excesses)[2][0]), bounds=(low, high),
                                       method="bounded", options={"xatol": 1e-9 * max(abs(low), abs(high))}).x
    xi, sigma, loglik = gpd_profile(np.array([refined, grid[best]]), excesses)
    pick = int(np.argmax(loglik))
    edge_sigma = _best_scale_at_min_shape(excesses)
    if gpd_loglik(XI_MIN, edge_sigma, excesses) > loglik[pick]:  # the maximum lies on the shape bound, off the profile
        return XI_MIN, edge_sigma
    return float(xi[pick]), float(sigma[pick])


def gpd_loglik(xi: float, sigma: float, excesses: np.ndarray) -> float:
    """The generalised Pareto log-likelihood of excesses (k,) (loc 0); -inf outside the support."""
    terms = 1 + xi * excesses / sigma
    if sigma <= 0 or (terms <= 0).any():
        return -math.inf
    return float(-excesses.size * math.log(sigma) - (1 / xi + 1) * np.log(terms).sum()) if xi else \
        float(-excesses.size * math.log(sigma) - excesses.sum() / sigma)


def _best_scale_at_min_shape(excesses: np.ndarray) -> float:
    """The most likely scale with the shape at XI_MIN (its support needs sigma > -XI_MIN * the largest excess)."""
    low = -XI_MIN * float(excesses.max()) * (1 + 1e-9)
    return float(optimize.minimize_scalar(lambda sigma: -gpd_loglik(XI_MIN, sigma, excesses), bounds=(low, low + 100 * float(excesses.max())),
                                          method="bounded", options={"xatol": 1e-9 * low}).x)


TAILS: dict[str, Callable[[np.ndarray], Tail | None]] = {"pot": PotTail.of, "lognormal": LogNormal.of}
"""The fitted estimators: each fits its tail model to (n,) scores (None: it cannot)."""


def robust_log_scale(scores: np.ndarray) -> tuple[float, float] | None:
    """(median, MAD_SCALE x MAD) of the log scores, a score <= 0 counted as the smallest positive one; None when no
    score is positive or the spread is 0."""
    positive = scores[scores > 0]
    if positive.size == 0:
        return None
    logs = np.log(np.maximum(scores, positive.min()))
    median = float(np.median(logs))
    spread = MAD_SCALE * float(np.median(np.abs(logs - median)))
    return (median, spread) if spread > 0 else None


def bootstrap_rates(
    scores: np.ndarray, threshold: float, fit: Callable[[np.ndarray], Tail | None], draws: int, seed: int,
) -> np.ndarray:
    """`draws` (draws,) float64 rates of the fixed threshold: each a resample of the scores, refitted; a resample that
    cannot be fitted gives its empirical rate above the threshold."""
    rng = np.random.default_rng(seed)
    rates = np.empty(draws)
    for draw in range(draws):
        sample = scores[rng.integers(0, scores.size, scores.size)]
        fitted = fit(sample)
        rates[draw] = fitted.sf(threshold) if fitted is not None else float(np.mean(sample > threshold))
    return rates


def recorded_law(record: CalibrationRecord) -> FprLaw | None:
    """The law the card records for its calibrated image threshold; a card from before estimators: its order
    statistic's (count, image_fpr); None without a calibration."""
    if record.fpr_law:
        return FprLaw(*record.fpr_law)
    if not record.count or record.image_fpr is None:
        return None
    return FprLaw.order_statistic(record.count, order_statistic_rank(record.count, record.image_fpr))


def law_at(record: CalibrationRecord, threshold: float, calibrated: float | None) -> FprLaw | None:
    """The false-positive-rate law of the image threshold a run applied: the card's own (recorded_law) when it is the
    calibrated one (or the card keeps no calibration scores); another's as the order statistic it lies at among
    the recorded calibration scores."""
    scores = np.asarray(record.image_scores, np.float64)
    if threshold == calibrated or not scores.size:
        return recorded_law(record)
    return FprLaw.order_statistic(scores.size, min(scores.size, int(np.count_nonzero(scores > threshold)) + 1))


@dataclass(frozen=True)
class Suspect:
    """A calibration image whose score stands far above the rest: its id and image score."""

    id: str
    score: float


def suspects(ids: Sequence[str], scores: np.ndarray) -> list[Suspect]:
    """The images whose log score exceeds median + SUSPECT_MADS x robust spread of the log scores (robust_log_scale),
    highest first; none with fewer than MIN_SCORES["lognormal"] scores (too few to tell odd from normal)."""
    limit = suspect_limit(scores)
    if limit is None:
        return []
    found = [Suspect(image_id, float(score)) for image_id, score in zip(ids, scores) if score > limit]
    return sorted(found, key=lambda suspect: -suspect.score)


def suspect_limit(scores: np.ndarray) -> float | None:
    """The score above which a calibration image is a suspect (None: too few scores, or no spread)."""
    scores = np.asarray(scores, np.float64)
    fitted = robust_log_scale(scores) if scores.size >= MIN_SCORES["lognormal"] else None
    return None if fitted is None else math.exp(fitted[0] + SUSPECT_MADS * fitted[1])
