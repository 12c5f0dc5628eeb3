"""Thresholds from normal data: measured false-positive rates, quantiles, pixel samples, the hold-out; score scales."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
from scipy import stats

from spade_batch.config import Settings
from spade_batch.formats.card import ModelCard, Normalisation, Thresholds
from spade_batch.formats.features import LayerShape
from spade_batch.formats.images import Preprocessing
from spade_batch.formats.model import Centre
from spade_batch.formats.model_build import GalleryWriter, build_model
from spade_batch.method.calibrate import (
    PIXEL_SAMPLE,
    CalibrationScores,
    calibrate_from_samples,
    image_threshold,
    is_held_out,
    layer_moments,
    layer_scales,
    pixel_sample,
    pixel_threshold,
    region_size,
)
from spade_batch.method.masks import drop_small_regions, region_score
from spade_batch.method.score_rules import image_scores

NORMAL_SCORES = stats.chi2(df=8)  # a skewed, positive stand-in for normal images' kNN scores


@pytest.mark.parametrize("target", [0.05, 0.01])
def test_image_threshold_gives_the_target_false_positive_rate_on_fresh_normals(target):
    rng = np.random.default_rng(0)
    calibration, held_out = NORMAL_SCORES.rvs(4000, random_state=rng), NORMAL_SCORES.rvs(20000, random_state=rng)
    threshold = image_threshold(calibration, target)
    measured = float(np.mean(held_out > threshold))
    exact = float(NORMAL_SCORES.sf(threshold))  # the threshold's true false-positive rate
    # The threshold's FPR varies with the calibration draw (binomial SE over 4000); the measured one
    # adds the held-out draw's SE (over 20000). 4 standard errors each.
    se_calibration = math.sqrt(target * (1 - target) / 4000)
    se_measured = math.sqrt(se_calibration**2 + target * (1 - target) / 20000)
    print(f"target {target}: threshold {threshold:.3f}, true FPR {exact:.4f}, measured {measured:.4f} (4 SE = {4 * se_measured:.4f})")
    assert abs(exact - target) < 4 * se_calibration
    assert abs(measured - target) < 4 * se_measured
    # On the calibration scores themselves, at most target of them lie above ("higher" quantile).
    assert np.mean(calibration > threshold) <= target <= np.mean(calibration >= threshold)


def test_image_threshold_on_few_scores_is_the_conservative_order_statistic():
    scores = np.array([3.0, 1.0, 2.0, 5.0, 4.0])
    # A fresh normal score exceeds the j-th smallest of 5 with probability (6 - j) / 6: the 5th gives
    # 1/6 <= 0.2 (the 4th would give 1/3), the 3rd gives 1/2 <= 0.5.
    assert image_threshold(scores, 0.2) == 5.0
    assert image_threshold(scores, 0.5) == 3.0
    assert image_threshold(scores, 0.01) == 5.0


def test_no_calibration_data_is_a_clear_error():
    with pytest.raises(ValueError, match=r"calibration_fraction > 0"):
        image_threshold(np.array([]), 0.05)
    with pytest.raises(ValueError, match=r"calibration_fraction > 0"):
        pixel_threshold([], 0.99)


def test_pixel_threshold_is_the_quantile_of_all_samples():
    rng = np.random.default_rng(1)
    samples = [rng.gamma(2.0, size=n).astype(np.float32) for n in (1000, 37, 4096)]
    values = np.concatenate(samples)
    for quantile in (0.5, 0.99, 0.999):
        threshold = pixel_threshold(samples, quantile)
        assert threshold in values
        assert np.mean(values > threshold) <= 1 - quantile < np.mean(values >= threshold)


@pytest.mark.parametrize(("shape", "stride"), [((10, 10), 1), ((64, 64), 1), ((65, 65), 2), ((1000, 1000), 245), ((224, 224), 13)])
def test_pixel_sample_is_bounded_evenly_strided_and_deterministic(shape, stride):
    anomaly_map = np.random.default_rng(2).random(shape, dtype=np.float32).astype(np.float16)
    sample = pixel_sample(anomaly_map)
    assert sample.dtype == np.float32
    assert sample.size <= PIXEL_SAMPLE
    assert sample.size == math.ceil(anomaly_map.size / stride)
    np.testing.assert_array_equal(sample, anomaly_map.reshape(-1)[::stride].astype(np.float32))
    np.testing.assert_array_equal(pixel_sample(anomaly_map), sample)


def test_is_held_out_is_deterministic_stable_and_near_the_fraction():
    ids = [f"good/{i:05d}.png" for i in range(10000)]
    held = [is_held_out(i, 0.1) for i in ids]
    assert held == [is_held_out(i, 0.1) for i in ids]
    # Adding other images changes nothing for these, in any order.
    more = [f"extra/{i}.png" for i in range(500)] + ids[::-1]
    assert [is_held_out(i, 0.1) for i in more][500:] == held[::-1]
    # Binomial SE over 10000 ids is 0.003; allow 4 SE.
    assert abs(np.mean(held) - 0.1) < 4 * math.sqrt(0.1 * 0.9 / 10000)
    # Another seed holds out another set of about the same size.
    other = [is_held_out(i, 0.1, seed=1) for i in ids]
    assert other != held and abs(np.mean(other) - 0.1) < 0.012
    # A larger fraction holds out a superset; 0 holds out nothing.
    assert all(is_held_out(i, 0.3) for i, h in zip(ids, held) if h)
    assert not any(is_held_out(i, 0.0) for i in ids)


def tiny_model(folder, **settings):
    shape = LayerShape("layer1", 2, 2, 3)
    rng = np.random.default_rng(3)
    global_features = rng.standard_normal((3, 4)).astype(np.float32)
    layers = [rng.standard_normal((3, 4, 3)).astype(np.float16)]
    card = ModelCard(settings=Settings(backbone="resnet18", weights="random", k=2, **settings).method, preprocessing=Preprocessing(),
                     weights_sha256="sha256:0", layers=[shape], global_dim=4, train_count=3, train_manifest_sha256="0")
    writer = GalleryWriter(str(folder), ["a", "b", "c"], [shape], 4, Centre.of_image(global_features[0], [layers[0][0]]))
    writer.add(["a", "b", "c"], global_features, layers)
    return build_model(writer, card, Settings(backbone="resnet18", weights="random", k=2))


def scores_of(knn: np.ndarray, maps: np.ndarray, samples: list[np.ndarray], regions: np.ndarray | None = None) -> CalibrationScores:
    ids = [f"{i:03d}" for i in range(len(knn))]
    return CalibrationScores(ids, knn, maps, samples, maps if regions is None else regions)


@pytest.mark.parametrize("rule", ["quantile", "mean_3sigma", "region"])
def test_each_pixel_rule_equals_its_direct_computation(tmp_path, rule):
    rng = np.random.default_rng(8)
    maps = [rng.gamma(2.0, 0.1, (24, 24)).astype(np.float32) for _ in range(30)]
    samples = [pixel_sample(m) for m in maps]
    regions = np.array([region_score(m, 5) for m in maps])
    settings = Settings(image_score="knn", pixel_rule=rule, pixel_quantile=0.99, image_fpr=0.1, min_region=5, gate_masks=True)
    calibrated = calibrate_from_samples(tiny_model(tmp_path, image_score="knn"), scores_of(rng.random(30), rng.random(30), samples, regions),
                                        settings.calibration)
    pooled = np.concatenate([m.ravel() for m in maps]).astype(np.float64)  # 576-pixel maps: the samples are the whole maps
    expected = {"quantile": np.quantile(pooled, 0.99, method="higher"), "mean_3sigma": pooled.mean() + 3 * pooled.std(),
                "region": np.sort(regions)[int(np.ceil(0.9 * (len(regions) - 1)))]}[rule]
    thresholds = calibrated.card.thresholds
    assert thresholds.pixel == pytest.approx(expected, rel=1e-6)
    assert (thresholds.min_region, thresholds.gate_masks, calibrated.card.calibration.pixel_rule) == (5, True, rule)
    if rule == "region":  # the promise: at most image_fpr of these normal maps show a region of 5 pixels at it
        shown = [drop_small_regions(m > thresholds.pixel, 5).any() for m in maps]
        assert np.mean(shown) <= 0.1 and np.mean([drop_small_regions(m > 0.99 * thresholds.pixel, 5).any() for m in maps]) > 0.05


@pytest.mark.parametrize(("region_fpr", "gate_fpr"), [(0.0, 0.0), (0.05, 0.0), (0.0, 0.2), (0.1, 0.3), (0.0, 0.03)])
def test_the_mask_rule_levels_are_quantiles_of_the_calibration_scores(tmp_path, region_fpr, gate_fpr):
    """The region level: the (1 - region_fpr) order statistic of the region scores, never below the pixel threshold;
    the gate: the (1 - gate_fpr) order statistic of the image scores; 0 leaves either unset (None: today's masks), and
    so does a gate_fpr at or below image_fpr (a gate stricter than the verdict would hide flagged images' regions)."""
    rng = np.random.default_rng(9)
    maps = [rng.gamma(2.0, 0.1, (24, 24)).astype(np.float32) for _ in range(40)]
    regions = np.array([region_score(m, 1) for m in maps])  # each map's peak
    knn = rng.random(40)
    settings = Settings(image_score="knn", pixel_rule="mean_3sigma", image_fpr=0.05, min_region=1, region_fpr=region_fpr, gate_fpr=gate_fpr)
    calibrated = calibrate_from_samples(tiny_model(tmp_path, image_score="knn"), scores_of(knn, knn, [pixel_sample(m) for m in maps], regions),
                                        settings.calibration)
    thresholds = calibrated.card.thresholds
    order = lambda values, fpr: np.sort(values)[int(np.ceil((1 - fpr) * (len(values) - 1)))]  # noqa: E731
    assert thresholds.image == order(knn, 0.05)
    assert thresholds.gate == (order(knn, gate_fpr) if gate_fpr > settings.image_fpr else None)
    assert thresholds.region == (max(order(regions, region_fpr), thresholds.pixel) if region_fpr else None)
    if region_fpr:  # the promise: about region_fpr of these normal maps show a pixel above the level
        shown = np.mean([(m > thresholds.region).any() for m in maps])
        assert region_fpr / 2 <= shown <= region_fpr and thresholds.region > thresholds.pixel


def test_calibrate_sets_the_model_thresholds_from_held_out_scores(tmp_path):
    rng = np.random.default_rng(4)
    knn, maps = rng.random((2, 50))
    samples = [pixel_sample(rng.random((80, 80), dtype=np.float32)) for _ in range(50)]
    settings = Settings(image_fpr=0.1, pixel_rule="quantile", pixel_quantile=0.99, image_score="knn", gate_masks=False)
    model = tiny_model(tmp_path, image_score="knn")
    calibrated = calibrate_from_samples(model, scores_of(knn, maps, samples), settings.calibration)
    assert calibrated.card.thresholds == Thresholds(image_threshold(knn, 0.1), pixel_threshold(samples, 0.99))
    assert calibrated.card.calibration.count == 50
    assert calibrated.card.calibration.image_fpr == 0.1
    assert model.card.thresholds == Thresholds(None, None)  # the input model is unchanged
    assert calibrated.train_ids == model.train_ids and calibrated.index is model.index


def test_region_scores_are_computed_only_for_the_region_rule(tmp_path):
    assert [region_size(Settings(pixel_rule=rule, min_region=7).calibration) for rule in ("quantile", "mean_3sigma", "region")] == [None, None, 7]
    assert region_size(Settings(pixel_rule="mean_3sigma", min_region=7, region_fpr=0.01).calibration) == 7  # the region level needs them
    rng = np.random.default_rng(6)
    scores = scores_of(rng.random(20), rng.random(20), [rng.random(9, dtype=np.float32) for _ in range(20)])
    no_regions = dataclasses.replace(scores, region_scores=None)
    settings = Settings(image_score="knn", pixel_rule="region", image_fpr=0.1).calibration
    with pytest.raises(ValueError, match="without region scores"):
        calibrate_from_samples(tiny_model(tmp_path, image_score="knn"), no_regions, settings)


def test_the_default_decisions_are_leave_one_out_mean_3sigma_gated_at_5_percent():
    """The configuration measured across sizes and sets (docs/accuracy.md, Decisions): a change here is a change of what
    every new model decides."""
    defaults = Settings().calibration
    assert (defaults.calibration_images, defaults.pixel_rule, defaults.gate_masks, defaults.gate_fpr, defaults.min_region,
            defaults.image_estimator) == ("leave_one_out", "mean_3sigma", True, 0.05, 0, "order_statistic")


def test_layer_scales_are_each_layers_standard_deviation_over_all_batches():
    rng = np.random.default_rng(5)
    batches = [[rng.gamma(2.0, scale, size=(count, side, side)) for scale, side in ((1.0, 8), (1000.0, 4))] for count in (3, 1, 2)]
    moments = sum(layer_moments(maps) for maps in batches)
    expected = [np.std(np.concatenate([maps[layer].ravel() for maps in batches])) for layer in range(2)]
    np.testing.assert_allclose(layer_scales(moments), expected, rtol=1e-10)
    with pytest.raises(ValueError, match="do not vary.*layer_normalise"):
        layer_scales(layer_moments([np.ones((2, 4, 4)), rng.random((2, 2, 2))]))


def test_image_scores_of_each_mode():
    rng = np.random.default_rng(6)
    knn, maps = rng.gamma(2.0, 50.0, 20), rng.gamma(2.0, 0.1, 20)
    assert image_scores(knn, maps, "knn", Normalisation()).tolist() == knn.tolist()
    assert image_scores(knn, maps, "map", Normalisation()).tolist() == maps.tolist()
    assert np.isnan(image_scores(knn, maps, "combined", Normalisation())).all()  # before calibration
    learnt = Normalisation(knn=(100.0, 40.0), map=(0.2, 0.05))
    expected = [((k - 100.0) / 40.0 + (m - 0.2) / 0.05) / 2 for k, m in zip(knn, maps)]
    np.testing.assert_allclose(image_scores(knn, maps, "combined", learnt), expected, rtol=1e-12)


def test_calibrate_learns_the_combined_scores_statistics_and_thresholds_them(tmp_path):
    rng = np.random.default_rng(7)
    knn, maps = rng.gamma(2.0, 50.0, 40), rng.gamma(2.0, 0.1, 40)
    samples = [rng.random(16, dtype=np.float32) for _ in range(40)]
    settings = Settings(image_score="combined", image_fpr=0.1)
    model = tiny_model(tmp_path, image_score="combined")
    calibrated = calibrate_from_samples(model, scores_of(knn, maps, samples), settings.calibration)
    normalisation = calibrated.card.normalisation
    assert normalisation.knn == pytest.approx((knn.mean(), knn.std())) and normalisation.map == pytest.approx((maps.mean(), maps.std()))
    combined = ((knn - knn.mean()) / knn.std() + (maps - maps.mean()) / maps.std()) / 2
    assert calibrated.card.thresholds.image == pytest.approx(np.quantile(combined, 0.9, method="higher"), rel=1e-12)
    with pytest.raises(ValueError, match="map scores do not vary"):
        calibrate_from_samples(model, scores_of(knn, np.ones(40), samples), settings.calibration)
