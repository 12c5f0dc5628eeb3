import json

import numpy as np
import pytest
from scipy import ndimage
from skimage.measure import label as skimage_label
from sklearn.metrics import f1_score, precision_score, recall_score, roc_auc_score, roc_curve

from spade_batch.reports.metrics import (
    PixelDecisions,
    PixelMetrics,
    f1_optimal_image_threshold,
    f1_optimal_pixel_threshold,
    image_decisions,
    image_rocauc,
    roc_curve_points,
    threshold_sweep,
)


def random_labels(rng: np.random.Generator, n: int) -> np.ndarray:
    labels = rng.random(n) < 0.4
    labels[:2] = [True, False]  # both classes present
    return labels


def smooth_maps_and_blobs(seed: int, n: int = 6, size: int = 32) -> tuple[np.ndarray, np.ndarray]:
    """(n, size, size) float32 smooth maps and bool blob masks; the maps are higher on the blobs."""
    rng = np.random.default_rng(seed)
    blobs = ndimage.gaussian_filter(rng.normal(size=(n, size, size)), sigma=(0, 3, 3))
    masks = blobs > np.quantile(blobs, 0.9)
    masks[0] = False  # one defect-free image
    noise = ndimage.gaussian_filter(rng.normal(size=(n, size, size)), sigma=(0, 2, 2))
    maps = noise + 0.3 * ndimage.gaussian_filter(masks.astype(float), sigma=(0, 2, 2))
    return maps.astype(np.float32), masks


def brute_force_pro(maps: np.ndarray, masks: np.ndarray, max_fpr: float = 0.3) -> float:
    """MVTec AD PRO, computed by a threshold sweep over every distinct score."""
    region_scores = []
    for image_map, mask in zip(maps, masks):
        labels, count = ndimage.label(mask, structure=np.ones((3, 3)))
        region_scores += [image_map[labels == r] for r in range(1, count + 1)]
    normal_scores = maps[~masks]
    points = [(0.0, 0.0)]
    for t in np.unique(maps)[::-1]:
        fpr = np.mean(normal_scores >= t)
        pro = np.mean([np.mean(scores >= t) for scores in region_scores])
        points.append((fpr, pro))
    area = 0.0
    for (x0, y0), (x1, y1) in zip(points, points[1:]):
        if x0 >= max_fpr:
            break
        if x1 > max_fpr:
            y1 = y0 + (y1 - y0) * (max_fpr - x0) / (x1 - x0)
            x1 = max_fpr
        area += (x1 - x0) * (y0 + y1) / 2
    return area / max_fpr


def metrics_for(maps: np.ndarray, masks: np.ndarray, bins: int) -> PixelMetrics:
    metrics = PixelMetrics(float(maps.min()), float(maps.max()), bins=bins)
    metrics.update(maps, masks)
    return metrics


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_image_rocauc_matches_sklearn_continuous_and_tied(seed):
    rng = np.random.default_rng(seed)
    labels = random_labels(rng, 200)
    continuous = rng.normal(size=200) + labels
    tied = rng.integers(0, 4, size=200) + labels.astype(int)  # many ties across classes
    for scores in (continuous, tied.astype(float)):
        assert image_rocauc(scores, labels) == pytest.approx(roc_auc_score(labels, scores), abs=1e-12)


def test_roc_curve_points_match_sklearn():
    rng = np.random.default_rng(3)
    labels = random_labels(rng, 100)
    scores = rng.integers(0, 10, size=100).astype(float) + labels
    fpr, tpr, thresholds = roc_curve_points(scores, labels)
    ref_fpr, ref_tpr, ref_thresholds = roc_curve(labels, scores, drop_intermediate=False)
    np.testing.assert_allclose(fpr, ref_fpr, atol=1e-12)
    np.testing.assert_allclose(tpr, ref_tpr, atol=1e-12)
    assert thresholds[0] == np.inf
    np.testing.assert_array_equal(thresholds[1:], ref_thresholds[1:])


def test_image_metrics_reject_one_class_and_bad_input():
    with pytest.raises(ValueError, match="only one class"):
        image_rocauc(np.array([0.1, 0.2]), np.array([False, False]))
    with pytest.raises(ValueError, match="only one class"):
        roc_curve_points(np.array([0.1, 0.2]), np.array([True, True]))
    with pytest.raises(ValueError, match="equal length"):
        image_rocauc(np.array([0.1, 0.2, 0.3]), np.array([False, True]))
    with pytest.raises(ValueError, match="labels must be bool"):
        image_rocauc(np.array([0.1, 0.2]), np.array([0, 1]))
    with pytest.raises(ValueError, match="NaN"):
        image_rocauc(np.array([np.nan, 0.2]), np.array([False, True]))


@pytest.mark.parametrize("seed", [0, 2])
def test_pixel_rocauc_matches_sklearn_within_bound(seed):
    maps, masks = smooth_maps_and_blobs(seed)
    metrics = metrics_for(maps, masks, bins=4096)
    exact = roc_auc_score(masks.ravel(), maps.ravel())
    bound = metrics.error_bounds()["pixel_rocauc"]
    assert abs(metrics.pixel_rocauc() - exact) <= bound + 1e-12
    assert abs(metrics.pixel_rocauc() - exact) < 5e-5
    assert bound < 1e-3


def test_pixel_rocauc_exact_with_ties_when_each_bin_holds_one_value():
    rng = np.random.default_rng(4)
    masks = rng.random((3, 16, 16)) < 0.3
    maps = rng.integers(0, 10, size=(3, 16, 16)) + masks  # integer scores 0..10, many ties
    metrics = PixelMetrics(0.0, 11.0, bins=11)  # one integer per bin, at its lower edge
    metrics.update(maps.astype(np.float32), masks)
    assert metrics.pixel_rocauc() == pytest.approx(roc_auc_score(masks.ravel(), maps.ravel()), abs=1e-12)


@pytest.mark.parametrize("seed", [0, 4])
def test_pro_matches_brute_force_within_bound(seed):
    maps, masks = smooth_maps_and_blobs(seed)
    exact = brute_force_pro(maps, masks)
    assert 0.2 < exact < 0.95  # a non-trivial case
    metrics = metrics_for(maps, masks, bins=4096)
    bound = metrics.error_bounds()["pro"]
    assert abs(metrics.pro() - exact) <= bound + 1e-12
    assert abs(metrics.pro() - exact) < 2e-4
    assert bound < 1e-3


def test_binning_error_shrinks_as_bins_grow():
    maps, masks = smooth_maps_and_blobs(5)
    exact_pro = brute_force_pro(maps, masks)
    exact_auc = roc_auc_score(masks.ravel(), maps.ravel())
    errors, bounds = [], []
    for bins in (8, 64, 512, 4096):  # nested bin edges
        metrics = metrics_for(maps, masks, bins)
        errors.append((abs(metrics.pixel_rocauc() - exact_auc), abs(metrics.pro() - exact_pro)))
        bounds.append(tuple(metrics.error_bounds().values()))
        assert errors[-1][0] <= bounds[-1][0] + 1e-12
        assert errors[-1][1] <= bounds[-1][1] + 1e-12
    errors, bounds = np.array(errors), np.array(bounds)
    assert np.all(np.diff(bounds, axis=0) <= 1e-15)
    assert np.all(errors[-1] < errors[0] / 10)


def test_regions_are_8_connected_and_weighted_equally():
    masks = np.zeros((1, 20, 20), dtype=bool)
    masks[0, 0, 0] = masks[0, 1, 1] = True  # diagonal neighbours: one region of 2 pixels
    masks[0, 10:20, 10:20] = True  # one region of 100 pixels
    maps = np.zeros((1, 20, 20), dtype=np.float32)
    maps[0, 0, 0] = maps[0, 1, 1] = 1.0  # only the small region scores above the normal pixels
    metrics = PixelMetrics(0.0, 1.0, bins=4)
    metrics.update(maps, masks)
    assert metrics.to_dict()["counts"] == {"normal_pixels": 298, "defect_pixels": 102, "regions": 2}
    # PRO curve: (0, 0) -> (0, 0.5) -> (1, 1); area to 0.3 is 0.3 * (0.5 + 0.65) / 2.
    assert metrics.pro() == pytest.approx((0.5 + 0.65) / 2, abs=1e-12)
    assert metrics.pro() == pytest.approx(brute_force_pro(maps, masks), abs=1e-12)


def test_streaming_updates_equal_one_update():
    maps, masks = smooth_maps_and_blobs(6, n=7)
    whole = metrics_for(maps, masks, bins=256)
    streamed = PixelMetrics(whole.low, whole.high, bins=256)
    for start, stop in [(0, 2), (2, 3), (3, 7)]:
        streamed.update(maps[start:stop], masks[start:stop])
    np.testing.assert_array_equal(streamed.normal_hist, whole.normal_hist)
    np.testing.assert_array_equal(streamed.defect_hist, whole.defect_hist)
    np.testing.assert_allclose(streamed.region_hist, whole.region_hist, rtol=1e-12)
    assert streamed.regions == whole.regions
    assert streamed.pixel_rocauc() == pytest.approx(whole.pixel_rocauc(), abs=1e-12)
    assert streamed.pro() == pytest.approx(whole.pro(), abs=1e-12)


def test_perfect_maps_give_pro_and_rocauc_one():
    _, masks = smooth_maps_and_blobs(7)
    metrics = PixelMetrics(0.0, 1.0, bins=16)
    metrics.update(masks.astype(np.float32), masks)
    assert metrics.pixel_rocauc() == pytest.approx(1.0, abs=1e-12)
    assert metrics.pro() == pytest.approx(1.0, abs=1e-12)


def test_scores_outside_range_are_clipped_into_edge_bins():
    masks = np.zeros((1, 8, 8), dtype=bool)
    masks[0, :2] = True
    maps = np.where(masks, 7.0, -3.0).astype(np.float32)  # both outside [0, 1]
    metrics = PixelMetrics(0.0, 1.0, bins=8)
    metrics.update(maps, masks)
    assert metrics.normal_hist[0] == 48 and metrics.defect_hist[-1] == 16
    assert metrics.pixel_rocauc() == pytest.approx(1.0)


def test_curves_have_one_point_per_bin_edge_and_are_monotone():
    maps, masks = smooth_maps_and_blobs(8)
    metrics = metrics_for(maps, masks, bins=64)
    for fpr, y in (metrics.roc_curve(), metrics.pro_curve()):
        assert fpr.shape == y.shape == (65,)
        assert (fpr[0], y[0]) == (0.0, 0.0)
        assert fpr[-1] == pytest.approx(1.0) and y[-1] == pytest.approx(1.0)
        assert np.all(np.diff(fpr) >= 0) and np.all(np.diff(y) >= 0)


def test_to_dict_is_json_ready():
    maps, masks = smooth_maps_and_blobs(9)
    summary = json.loads(json.dumps(metrics_for(maps, masks, bins=128).to_dict()))
    assert summary["bins"] == 128
    assert summary["range"] == [float(maps.min()), float(maps.max())]
    assert summary["counts"]["defect_pixels"] == int(masks.sum())
    assert 0.5 < summary["pixel_rocauc"] <= 1 and 0 < summary["pro"] <= 1


def test_pixel_metrics_without_defects_or_normals_raise():
    metrics = PixelMetrics(0.0, 1.0)
    with pytest.raises(ValueError, match="no defect pixels"):
        metrics.pro()
    metrics.update(np.zeros((2, 8, 8), dtype=np.float32), np.zeros((2, 8, 8), dtype=bool))
    with pytest.raises(ValueError, match="no defect pixels"):
        metrics.pixel_rocauc()
    only_defects = PixelMetrics(0.0, 1.0)
    only_defects.update(np.ones((1, 4, 4), dtype=np.float32), np.ones((1, 4, 4), dtype=bool))
    with pytest.raises(ValueError, match="no normal pixels"):
        only_defects.to_dict()


def test_pixel_metrics_reject_bad_input():
    with pytest.raises(ValueError, match="low < high"):
        PixelMetrics(1.0, 1.0)
    with pytest.raises(ValueError, match="bins"):
        PixelMetrics(0.0, 1.0, bins=0)
    with pytest.raises(ValueError, match="max_fpr"):
        PixelMetrics(0.0, 1.0, max_fpr=0.0)
    metrics = PixelMetrics(0.0, 1.0)
    with pytest.raises(ValueError, match="N x H x W"):
        metrics.update(np.zeros((8, 8)), np.zeros((8, 8), dtype=bool))
    with pytest.raises(ValueError, match="equal shapes"):
        metrics.update(np.zeros((1, 8, 8)), np.zeros((1, 8, 9), dtype=bool))
    with pytest.raises(ValueError, match="masks must be bool"):
        metrics.update(np.zeros((1, 8, 8)), np.zeros((1, 8, 8), dtype=np.uint8))
    with pytest.raises(ValueError, match="NaN"):
        metrics.update(np.full((1, 8, 8), np.nan), np.zeros((1, 8, 8), dtype=bool))


def test_f1_optimal_pixel_threshold_matches_brute_force_when_binning_is_exact():
    rng = np.random.default_rng(0)
    masks = rng.random((6, 16, 16)) < 0.2
    # 50 distinct values at bin centres: every bin holds at most one value, so the edges see every threshold.
    levels = (np.arange(50) + 0.5) / 50
    maps = levels[np.clip(rng.integers(0, 50, masks.shape) + 15 * masks, 0, 49)]
    metrics = PixelMetrics(0.0, 1.0, bins=50)
    metrics.update(maps, masks)
    threshold, f1 = f1_optimal_pixel_threshold(metrics)
    best = max(f1_score(masks.ravel(), maps.ravel() >= t) for t in levels)
    assert f1 == pytest.approx(best)
    assert f1_score(masks.ravel(), maps.ravel() >= threshold) == pytest.approx(best)


def test_f1_optimal_image_threshold_matches_brute_force():
    rng = np.random.default_rng(1)
    labels = rng.random(40) < 0.4
    scores = np.round(rng.normal(size=40) + labels, 1)  # ties included
    threshold, f1 = f1_optimal_image_threshold(scores, labels)
    best = max(f1_score(labels, scores >= t) for t in np.unique(scores))
    assert f1 == pytest.approx(best)
    assert f1_score(labels, scores >= threshold) == pytest.approx(best)


def skimage_pro(maps: np.ndarray, masks: np.ndarray, max_fpr: float) -> float:
    """AU-PRO by an exact sweep over every distinct score, regions from skimage (8-connected), numpy's trapezoid.

    Independent of PixelMetrics and of brute_force_pro: other region labelling, the curve cut at max_fpr by np.interp.
    """
    overlaps = []  # per region: its pixels' scores
    for image_map, mask in zip(maps, masks):
        regions = skimage_label(mask, connectivity=2)
        overlaps += [image_map[regions == r] for r in range(1, regions.max() + 1)]
    normal = maps[~masks]
    thresholds = np.unique(maps)[::-1]
    fpr = np.r_[0.0, [np.mean(normal >= t) for t in thresholds]]
    pro = np.r_[0.0, [np.mean([np.mean(region >= t) for region in overlaps]) for t in thresholds]]
    keep = fpr <= max_fpr
    x = np.r_[fpr[keep], max_fpr]
    y = np.r_[pro[keep], np.interp(max_fpr, fpr, pro)]  # fpr is non-decreasing: interp at the cut
    return float(np.sum(np.diff(x) * (y[1:] + y[:-1]) / 2) / max_fpr)


@pytest.mark.parametrize("seed", [0, 4])
def test_au_pro_at_005_and_pro_at_03_match_an_exact_sweep_from_one_pass(seed):
    maps, masks = smooth_maps_and_blobs(seed)
    metrics = metrics_for(maps, masks, bins=4096)  # constructed with the default max_fpr 0.3
    for limit in (0.3, 0.05):
        exact = skimage_pro(maps, masks, limit)
        assert 0.02 < exact < 0.95, (limit, exact)  # non-trivial at both limits
        assert abs(metrics.pro(limit) - exact) <= metrics.pro_error_bound(limit) + 1e-12
        assert abs(metrics.pro(limit) - exact) < 1e-3
    assert metrics.pro() == metrics.pro(0.3) and metrics.pro_error_bound() == metrics.error_bounds()["pro"]
    assert metrics.pro(0.05) < metrics.pro(0.3)  # the PRO curve is increasing: its mean over a shorter start is lower


def test_au_pro_is_exact_at_both_limits_when_each_bin_holds_one_value():
    rng = np.random.default_rng(11)
    masks = np.zeros((5, 24, 24), dtype=bool)
    for image in masks[1:]:
        top, left = rng.integers(0, 16, size=2)
        image[top : top + rng.integers(3, 8), left : left + rng.integers(3, 8)] = True
    levels = rng.integers(0, 200, size=masks.shape) + 60 * masks  # integer scores, many ties
    maps = np.minimum(levels, 255).astype(np.float32)
    metrics = PixelMetrics(0.0, 256.0, bins=256)  # one integer per bin, at its lower edge
    metrics.update(maps, masks)
    for limit in (0.3, 0.05):
        assert metrics.pro(limit) == pytest.approx(skimage_pro(maps, masks, limit), abs=1e-12)
        assert metrics.pro(limit) == pytest.approx(brute_force_pro(maps, masks, limit), abs=1e-12)


def test_pro_limit_must_be_a_rate():
    maps, masks = smooth_maps_and_blobs(1)
    metrics = metrics_for(maps, masks, bins=64)
    for limit in (0.0, 1.5):
        with pytest.raises(ValueError, match="max_fpr"):
            metrics.pro(limit)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_pooled_pixel_decisions_equal_a_direct_computation_on_random_masks(seed):
    rng = np.random.default_rng(seed)
    sizes = [(int(h), int(w)) for h, w in rng.integers(5, 40, size=(9, 2))]  # every image its own size
    normal = [True, True, True, False, False, False, False, True, False]
    truths = [np.zeros(s, bool) if n else rng.random(s) < rng.uniform(0.05, 0.5) for s, n in zip(sizes, normal)]
    flagged = [rng.random(s) < rng.uniform(0.0, 0.3) for s in sizes]
    flagged[0][:] = False  # a clean normal image
    decisions = PixelDecisions()
    for f, t, n in zip(flagged, truths, normal):
        decisions.update(f, t, n)
    pooled_f, pooled_t = np.concatenate([f.ravel() for f in flagged]), np.concatenate([t.ravel() for t in truths])
    tp, fp = np.sum(pooled_f & pooled_t), np.sum(pooled_f & ~pooled_t)
    fn, tn = np.sum(~pooled_f & pooled_t), np.sum(~pooled_f & ~pooled_t)
    result = decisions.to_dict()
    assert (result["tp"], result["fp"], result["fn"], result["tn"]) == (tp, fp, fn, tn)
    assert all(type(result[key]) is int for key in ("tp", "fp", "fn", "tn", "normal_images", "normal_images_flagged"))
    assert result["seg_f1"] == pytest.approx(f1_score(pooled_t, pooled_f))
    assert result["tpr"] == pytest.approx(recall_score(pooled_t, pooled_f))
    assert result["fpr"] == pytest.approx(fp / (fp + tn))
    flagged_normal = sum(f.any() for f, n in zip(flagged, normal) if n)
    assert (result["normal_images"], result["normal_images_flagged"]) == (4, flagged_normal) and flagged_normal < 4
    assert result["share_normal_images_flagged"] == pytest.approx(flagged_normal / 4)
    assert json.loads(json.dumps(result)) == result


def test_pixel_decisions_without_defects_leave_tpr_and_f1_undefined():
    decisions = PixelDecisions()
    decisions.update(np.zeros((4, 4), bool), np.zeros((4, 4), bool), True)
    assert decisions.to_dict()["seg_f1"] is None and decisions.to_dict()["tpr"] is None
    assert decisions.to_dict()["fpr"] == 0.0 and decisions.to_dict()["share_normal_images_flagged"] == 0.0
    with pytest.raises(ValueError, match="bool"):
        decisions.update(np.zeros((4, 4), np.uint8), np.zeros((4, 4), bool), True)
    with pytest.raises(ValueError, match="one shape"):
        decisions.update(np.zeros((4, 4), bool), np.zeros((4, 5), bool), True)


def test_counts_at_a_bin_edge_match_the_thresholded_pixels():
    maps, masks = smooth_maps_and_blobs(3)
    metrics = metrics_for(maps, masks, bins=256)
    threshold, f1 = f1_optimal_pixel_threshold(metrics)
    tp, fp, fn, tn = metrics.counts_at(threshold)
    predicted = maps >= threshold
    assert (tp, fp, fn, tn) == (np.sum(predicted & masks), np.sum(predicted & ~masks), np.sum(~predicted & masks),
                                np.sum(~predicted & ~masks))
    assert 2 * tp / (2 * tp + fp + fn) == pytest.approx(f1)
    with pytest.raises(ValueError, match="bin edges"):
        metrics.counts_at(threshold + 1e-7)


def test_image_decisions_match_sklearn():
    rng = np.random.default_rng(5)
    labels = random_labels(rng, 60)
    flagged = rng.random(60) < np.where(labels, 0.7, 0.1)
    result = image_decisions(flagged, labels)
    assert result["tpr"] == pytest.approx(recall_score(labels, flagged))
    assert result["precision"] == pytest.approx(precision_score(labels, flagged))
    assert result["f1"] == pytest.approx(f1_score(labels, flagged))
    assert result["fpr"] == pytest.approx(np.mean(flagged[~labels]))
    assert (result["flagged_normal"], result["normal"]) == (np.sum(flagged & ~labels), np.sum(~labels))
    assert (result["flagged_defective"], result["defective"]) == (np.sum(flagged & labels), np.sum(labels))
    nothing = image_decisions(np.zeros(4, bool), np.array([True, False, False, True]))
    assert nothing["precision"] is None and nothing["f1"] == 0.0 and nothing["tpr"] == 0.0
    with pytest.raises(ValueError, match="1-D bool"):
        image_decisions(np.zeros(4), np.zeros(4, bool))


def brute_force_f1s(scores: np.ndarray, labels: np.ndarray) -> dict[float, float]:
    """F1 of "score > t" (sklearn) at every threshold that gives a distinct decision: each distinct score, and below all."""
    finite = np.unique(scores[np.isfinite(scores)])
    candidates = [*finite, finite[0] - 1.0]
    return {float(t): f1_score(labels, scores > t, zero_division=0.0) for t in candidates}


@pytest.mark.parametrize("seed", range(6))
def test_threshold_sweep_matches_a_brute_force_sweep(seed):
    rng = np.random.default_rng(seed)
    scores = np.round(rng.normal(size=60), 1)  # ties
    labels = random_labels(rng, 60)
    scores[labels] += 0.7
    sweep = threshold_sweep(scores, labels)
    brute = brute_force_f1s(scores, labels)
    assert sweep.f1.max() == pytest.approx(max(brute.values()))
    assert len(sweep.thresholds) == len(brute)  # every distinct decision (flagging none included)
    for threshold, true_pos, false_pos, f1 in zip(sweep.thresholds, sweep.true_pos, sweep.false_pos, sweep.f1):
        flagged = scores > threshold
        assert (true_pos, false_pos) == (np.sum(flagged & labels), np.sum(flagged & ~labels))
        assert f1 == pytest.approx(f1_score(labels, flagged, zero_division=0.0))
    best = sweep.best_f1()
    assert sweep.thresholds[best] not in scores  # a threshold between two labelled scores, on neither
    assert f1_score(labels, scores > sweep.thresholds[best]) == pytest.approx(max(brute.values()))


@pytest.mark.parametrize("recall", [0.5, 0.8, 0.95, 1.0])
def test_a_recall_target_takes_the_highest_threshold_reaching_it(recall):
    rng = np.random.default_rng(3)
    scores, labels = rng.normal(size=80), random_labels(rng, 80)
    scores[labels] += 1.0
    sweep = threshold_sweep(scores, labels)
    chosen = sweep.thresholds[sweep.at_recall(recall)]
    assert recall_score(labels, scores > chosen) >= recall
    higher = [t for t in np.unique(scores) if t > chosen]  # every stricter threshold falls short
    assert all(recall_score(labels, scores > t) < recall for t in higher)


def test_items_scored_minus_infinity_are_never_flagged_but_counted():
    scores = np.array([3.0, 2.0, -np.inf, 1.0, -np.inf])
    labels = np.array([True, False, True, True, False])
    sweep = threshold_sweep(scores, labels)
    assert (sweep.positives, sweep.negatives) == (3, 2)
    assert np.isfinite(sweep.thresholds).all() and sweep.true_pos[-1] == 2 and sweep.false_pos[-1] == 1
    assert sweep.f1.max() == pytest.approx(max(brute_force_f1s(scores, labels).values()))
    with pytest.raises(ValueError, match="recall 1"):
        sweep.at_recall(1.0)


def test_float32_thresholds_separate_adjacent_float32_scores():
    """A float32 map is compared with the threshold in float32: the sweep's threshold must flag the same pixels there."""
    low = np.float32(1.0)
    scores = np.array([low, np.nextafter(low, np.float32(2)), np.float32(3)], dtype=np.float32)
    labels = np.array([False, True, True])
    sweep = threshold_sweep(scores, labels)
    for threshold, true_pos, false_pos in zip(sweep.thresholds, sweep.true_pos, sweep.false_pos):
        flagged = scores > threshold  # numpy compares a float32 array with a Python float in float32
        assert (np.sum(flagged & labels), np.sum(flagged & ~labels)) == (true_pos, false_pos)
    assert sweep.f1[sweep.best_f1()] == 1.0


def test_threshold_sweep_refuses_nan_and_non_bool_labels():
    with pytest.raises(ValueError, match="NaN"):
        threshold_sweep(np.array([np.nan, 1.0]), np.array([True, False]))
    with pytest.raises(ValueError, match="bool"):
        threshold_sweep(np.array([0.0, 1.0]), np.array([1, 0]))
