"""Image thresholds from normal scores: each estimator against a direct computation (numpy, scipy), the promise each
states against simulations of fresh normal images, few and zero scores, and the suspect rule."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import stats

from spade_batch.config import _CHOICES
from spade_batch.formats.card import CalibrationRecord
from spade_batch.method.image_threshold import (
    ESTIMATORS,
    MIN_SCORES,
    XI_MIN,
    FprLaw,
    PotTail,
    estimate_image_threshold,
    gpd_fit,
    recorded_law,
    suspects,
)


def test_the_estimators_are_the_config_choices():
    assert ESTIMATORS == _CHOICES["image_estimator"]


@pytest.mark.parametrize(("count", "target"), [(2, 0.01), (20, 0.05), (200, 0.01), (635, 0.01)])
def test_the_order_statistic_is_numpys_quantile_and_its_law_is_what_thresholds_on_that_many_normal_images_give(count, target):
    """Simulation: thresholds set on `count` uniform normal scores; the false-positive rate each gives on new normal
    images is 1 - threshold. Its mean and 5% and 95% points are the law's (Beta(r, n + 1 - r), r-th largest)."""
    rng = np.random.default_rng(count)
    samples = rng.random((20_000, count))
    found = estimate_image_threshold(samples[0], target, "order_statistic")
    assert found.threshold == np.quantile(samples[0], 1 - target, method="higher") and found.estimator == "order_statistic"
    assert found.threshold == np.sort(samples[0])[count - found.rank]
    rates = 1 - np.quantile(samples, 1 - target, axis=1, method="higher")
    np.testing.assert_allclose(found.fpr_range, np.quantile(rates, [0.05, 0.95]), rtol=0.05, atol=2e-4)
    assert found.expected_fpr == pytest.approx(found.rank / (count + 1)) == pytest.approx(rates.mean(), rel=0.03)
    assert found.supported_fpr == 1 / (count + 1)


@pytest.mark.parametrize("count", [1, 2, 3, 10, 37, 99, 100, 635])
@pytest.mark.parametrize("target", [0.001, 0.01, 0.1, 0.5])
def test_the_expected_rate_lies_inside_its_own_range(count, target):
    """Issue 27, found-item 4: show printed 'about 10 per 1,000 (90% range 25.3 - 776)' for 2 calibration images."""
    found = estimate_image_threshold(np.arange(1.0, count + 1), target, "order_statistic")
    low, high = found.fpr_range
    assert low < found.expected_fpr < high
    assert (found.rank == 1) == (found.threshold == count)


def test_pot_fits_a_generalised_pareto_to_the_highest_scores_as_scipy_does():
    rng = np.random.default_rng(5)
    scores = stats.gamma(3).rvs(400, random_state=rng)
    found = estimate_image_threshold(scores, 0.001, "pot", bootstrap=20)
    n_u = 40  # 10% of 400
    u = np.sort(scores)[-n_u - 1]
    excesses = scores[scores > u]
    xi, loc, sigma = stats.genpareto.fit(excesses, floc=u)
    assert loc == u and xi > XI_MIN
    expected = u + sigma / xi * ((0.001 * 400 / n_u) ** -xi - 1)
    assert found.estimator == "pot" and found.threshold == pytest.approx(expected, rel=2e-3)
    assert found.threshold > u
    low, high = found.fpr_range
    assert low < found.expected_fpr < high and low < 0.001 < high


@pytest.mark.parametrize("shape", [-0.3, 0.0, 0.3])
def test_the_tail_fit_is_scipys_maximum_likelihood_and_never_below_it_where_scipys_shape_is_allowed(shape):
    rng = np.random.default_rng(7)
    for size in (8, 20, 64):
        excesses = stats.genpareto(shape, scale=2.0).rvs(size, random_state=rng)
        xi, sigma = gpd_fit(excesses)
        assert xi >= XI_MIN - 1e-9
        reference_xi, _, reference_sigma = stats.genpareto.fit(excesses, floc=0)
        ours = stats.genpareto.logpdf(excesses, xi, scale=sigma).sum()
        if reference_xi >= XI_MIN:
            assert ours >= stats.genpareto.logpdf(excesses, reference_xi, scale=reference_sigma).sum() - 1e-6
            assert (xi, sigma) == pytest.approx((reference_xi, reference_sigma), rel=1e-2, abs=1e-3)
        # brute force over allowed shapes: no (xi, sigma) is more likely
        grid = [(x, s) for x in np.linspace(XI_MIN, 2, 60) for s in np.geomspace(0.05, 20, 60) * excesses.mean()]
        best = max(stats.genpareto.logpdf(excesses, x, scale=s).sum() for x, s in grid)
        assert ours >= best - 1e-6


def test_lognormal_is_median_and_mad_of_the_log_scores():
    rng = np.random.default_rng(6)
    scores = rng.lognormal(2.0, 0.4, 60)
    found = estimate_image_threshold(scores, 0.01, "lognormal", bootstrap=50)
    logs = np.log(scores)
    median = np.median(logs)
    spread = 1.4826 * np.median(np.abs(logs - median))
    assert found.estimator == "lognormal" and found.threshold == pytest.approx(math.exp(median + stats.norm.ppf(0.99) * spread))
    assert found.fpr_range[0] < 0.01 < found.fpr_range[1]


@pytest.mark.parametrize("estimator", ["order_statistic", "lognormal"])
def test_the_stated_range_holds_the_true_rate_about_90_percent_of_the_time(estimator):
    """n = 50 normal scores from a known log-normal; the threshold's true rate (the distribution's tail) falls in the
    stated 90% range in about 90% of 300 draws (binomial SE 1.7%)."""
    truth = stats.lognorm(0.5)
    rng = np.random.default_rng(11)
    inside = 0
    for draw in range(300):
        found = estimate_image_threshold(truth.rvs(50, random_state=rng), 0.02, estimator, bootstrap=40, seed=draw)
        low, high = found.fpr_range
        inside += low <= truth.sf(found.threshold) <= high
    assert 0.84 <= inside / 300 <= 0.96


@pytest.mark.parametrize("estimator", ["pot", "lognormal"])
def test_with_too_few_scores_the_fitted_estimators_fall_back_to_the_order_statistic_and_say_so(estimator):
    scores = np.array([1.0, 2.0, 3.0, 4.0, 5.0])
    found = estimate_image_threshold(scores, 0.01, estimator)
    assert found.estimator == "order_statistic" and found.threshold == 5.0 and found.rank == 1
    assert f"{estimator} needs at least {MIN_SCORES[estimator]} calibration scores, there are 5" in found.note


def test_zero_scores_count_as_the_smallest_positive_one_and_scores_without_spread_fall_back():
    rng = np.random.default_rng(3)
    scores = rng.lognormal(0.0, 0.5, 40)
    with_zeros = np.concatenate([[0.0, 0.0], scores])  # duplicates of gallery images score 0
    floored = np.concatenate([[scores.min()] * 2, scores])
    assert estimate_image_threshold(with_zeros, 0.01, "lognormal", bootstrap=10).threshold == \
        estimate_image_threshold(floored, 0.01, "lognormal", bootstrap=10).threshold
    flat = estimate_image_threshold(np.zeros(30), 0.01, "lognormal")
    assert flat.estimator == "order_statistic" and "cannot set this threshold" in flat.note


def test_pot_falls_back_when_the_target_lies_inside_the_fitted_tail():
    found = estimate_image_threshold(np.arange(1.0, 101.0), 0.2, "pot")  # 20 of 100 above: inside the top 10
    assert found.estimator == "order_statistic" and "inside the 10 highest of 100 scores" in found.note
    assert PotTail.tail_count(30) == 8 and PotTail.tail_count(635) == 64


def test_a_card_from_before_estimators_promises_its_order_statistics_law():
    old = CalibrationRecord(count=2, image_fpr=0.01)
    assert recorded_law(old) == FprLaw(1.0, 2.0)  # the largest of 2
    assert recorded_law(CalibrationRecord(count=200, image_fpr=0.01, fpr_law=[3.0, 297.0])) == FprLaw(3.0, 297.0)
    assert recorded_law(CalibrationRecord()) is None


def test_a_beta_matched_to_draws_keeps_their_mean_and_variance():
    draws = np.random.default_rng(0).beta(2.0, 150.0, 5000)
    law = FprLaw.matching(draws)
    assert law.mean == pytest.approx(draws.mean()) and stats.beta(law.a, law.b).var() == pytest.approx(draws.var())


def test_suspects_are_the_images_scoring_far_above_the_rest_on_the_log_scale():
    rng = np.random.default_rng(4)
    scores = rng.lognormal(7.0, 0.25, 60)
    ids = [f"{i:03d}.png" for i in range(60)]
    assert suspects(ids, scores) == []
    odd = scores.copy()
    odd[[5, 17]] = np.exp(7.0 + 0.25 * np.array([6.0, 9.0]))  # 6 and 9 log-sd above the median
    logs = np.log(odd)
    limit = np.exp(np.median(logs) + 3.5 * 1.4826 * np.median(np.abs(logs - np.median(logs))))
    assert [(s.id, s.score) for s in suspects(ids, odd)] == [(ids[i], odd[i]) for i in (17, 5)]
    assert all(score <= limit for i, score in enumerate(odd) if i not in (5, 17))
    assert suspects(ids[:9], odd[:9] * np.r_[np.ones(8), 100.0]) == []  # too few to tell odd from normal
