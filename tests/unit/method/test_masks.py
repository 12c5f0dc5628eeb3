"""Masks from maps (threshold or per-image scaling at the original size) and PNG encoding."""

import dataclasses
import io

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from spade_batch.formats.card import Thresholds
from spade_batch.formats.images import resize_map
from spade_batch.method.masks import drop_small_regions, mask_from_map, mask_scores, png_bytes, region_levels, region_score


def _bilinear(anomaly_map: np.ndarray, height: int, width: int) -> np.ndarray:
    """Independent reference: torch's bilinear resize, align_corners=False, in float64."""
    t = torch.from_numpy(anomaly_map.astype(np.float64))[None, None]
    return F.interpolate(t, size=(height, width), mode="bilinear", align_corners=False)[0, 0].numpy()


def test_mask_is_the_map_at_the_original_size_thresholded():
    anomaly_map = np.random.default_rng(0).random((16, 16)).astype(np.float32)
    mask = mask_from_map(anomaly_map, 37, 53, Thresholds(pixel=0.5))
    full = _bilinear(anomaly_map, 37, 53)
    assert mask.shape == (37, 53) and mask.dtype == np.uint8
    clear = np.abs(full - 0.5) > 1e-6
    np.testing.assert_array_equal(mask[clear] == 255, full[clear] > 0.5)
    assert set(np.unique(mask)) <= {0, 255}


def test_without_a_threshold_the_mask_is_the_map_scaled_per_image():
    anomaly_map = np.random.default_rng(1).random((16, 16)).astype(np.float32) * 7 + 3
    mask = mask_from_map(anomaly_map, 20, 30, Thresholds())
    full = _bilinear(anomaly_map, 20, 30)
    expected = 255 * (full - full.min()) / (full.max() - full.min())
    assert mask.min() == 0 and mask.max() == 255
    np.testing.assert_allclose(mask, expected, atol=0.5 + 1e-3)


def test_a_read_only_map_is_accepted():
    anomaly_map = np.ones((8, 8), np.float32)
    anomaly_map.flags.writeable = False
    assert mask_from_map(anomaly_map, 4, 4, Thresholds(pixel=0.0)).min() == 255


def brute_force_region_score(anomaly_map: np.ndarray, min_region: int) -> float:
    """The largest map value v whose level set `map >= v` holds an 8-connected region of min_region pixels (skimage labels)."""
    from skimage.measure import label

    best = -np.inf
    for value in np.unique(anomaly_map):
        labels = label(anomaly_map >= value, connectivity=2)
        if labels.max() and np.bincount(labels.ravel())[1:].max() >= min_region:
            best = max(best, float(value))
    return best


@pytest.mark.parametrize("min_region", [1, 4, 30])
def test_region_score_is_the_level_up_to_which_a_region_of_that_size_shows(min_region):
    rng = np.random.default_rng(min_region)
    anomaly_map = np.round(rng.gamma(2.0, 1.0, (20, 24)), 2).astype(np.float32)  # ties, as float16 maps have
    score = region_score(anomaly_map, min_region)
    assert score == brute_force_region_score(anomaly_map, min_region)
    below, at = drop_small_regions(anomaly_map > np.nextafter(score, -np.inf), min_region), drop_small_regions(anomaly_map > score, min_region)
    assert below.any() and not at.any()


def test_small_regions_are_dropped_and_large_ones_kept_whole():
    from skimage.measure import label

    flagged = np.random.default_rng(3).random((40, 50)) > 0.7
    kept = drop_small_regions(flagged, 6)
    labels = label(flagged, connectivity=2)
    sizes = np.bincount(labels.ravel())
    np.testing.assert_array_equal(kept, (labels > 0) & (sizes[labels] >= 6))


def test_mask_rules_gate_by_the_verdict_and_drop_regions_scaled_to_the_image():
    anomaly_map = np.zeros((16, 16), np.float32)
    anomaly_map[2:4, 2:4] = 1.0  # 4 pixels at the working size
    anomaly_map[8:14, 8:14] = 1.0  # 36
    rule = Thresholds(image=0.5, pixel=0.5, min_region=10, gate_masks=True)
    assert not mask_from_map(anomaly_map, 32, 32, rule, image_score=0.5).any()  # not flagged: empty
    mask = mask_from_map(anomaly_map, 32, 32, rule, image_score=0.6)  # 4x the area: regions under 40 pixels go
    full = _bilinear(anomaly_map, 32, 32) > 0.5
    assert mask[16:28, 16:28].all() and not mask[:10, :10].any() and full[:10, :10].any()
    assert (mask > 0).sum() == drop_small_regions(full, 40).sum()
    ungated = Thresholds(image=0.5, pixel=0.5)  # a card from before these rules: every flagged pixel, whatever the verdict
    np.testing.assert_array_equal(mask_from_map(anomaly_map, 32, 32, ungated, image_score=0.0) > 0, full)


def three_blobs() -> np.ndarray:
    """A 32 x 32 map with three single-peaked blobs of peaks 1.0, 2.0 and 3.0 on a low floor."""
    yy, xx = np.mgrid[0:32, 0:32]
    blobs = [(6, 6, 1.0), (6, 24, 2.0), (24, 14, 3.0)]
    return np.maximum.reduce([peak * np.exp(-((yy - y) ** 2 + (xx - x) ** 2) / 8.0) for y, x, peak in blobs]).astype(np.float32)


def direct_mask(full: np.ndarray, rule: Thresholds, image_score: float, min_pixels: int) -> np.ndarray:
    """Reference: skimage's 8-connected regions of full > pixel of min_pixels or more; all of them when the gate lets the
    image through (or no gate and no region level), else those holding min_pixels pixels above the region level."""
    from skimage.measure import label

    gate = min(level for level in (rule.gate, rule.image) if level is not None)  # a flagged image shows every region
    every = (rule.gate_masks and image_score > gate) or (not rule.gate_masks and rule.region is None)
    labels = label(full > rule.pixel, connectivity=2)
    shown = np.zeros(full.shape, bool)
    for number in range(1, labels.max() + 1):
        region = labels == number
        evident = rule.region is not None and (full[region] > rule.region).sum() >= min_pixels
        if region.sum() >= min_pixels and (every or evident):
            shown |= region
    return shown


GATED = Thresholds(image=5.0, pixel=0.5, gate_masks=True)
MASK_RULES = {
    "gated (today's default)": GATED,
    "ungated (cards from before gate_masks)": Thresholds(image=5.0, pixel=0.5),
    "(a) gated, regions with their own evidence": dataclasses.replace(GATED, region=1.5),
    "(b) gated at a looser image level": dataclasses.replace(GATED, gate=2.0),
    "(a + b)": dataclasses.replace(GATED, region=2.5, gate=2.0),
    "gated at a level above the image threshold (a card whose gate_fpr is below its image_fpr)": dataclasses.replace(GATED, gate=5.5),
    "(c) every image: only regions with their own evidence": Thresholds(image=5.0, pixel=0.5, region=1.5),
}


@pytest.mark.parametrize("name", MASK_RULES)
@pytest.mark.parametrize("image_score", [1.0, 3.0, 6.0])  # below the looser gate, between it and the image threshold, above
@pytest.mark.parametrize("min_region", [0, 12])
def test_each_mask_rule_equals_its_direct_computation(name, image_score, min_region):
    anomaly_map = three_blobs()
    rule = dataclasses.replace(MASK_RULES[name], min_region=min_region)
    min_pixels = 4 * min_region if min_region > 1 else 1  # the mask is 64 x 64: 4x the working size's pixels
    full = _bilinear(anomaly_map, 64, 64).astype(np.float32)
    mask = mask_from_map(anomaly_map, 64, 64, rule, image_score) > 0
    expected = direct_mask(resize_map(anomaly_map, 64, 64), rule, image_score, min_pixels)
    np.testing.assert_array_equal(mask, expected)
    np.testing.assert_allclose(resize_map(anomaly_map, 64, 64), full, atol=1e-6)  # the reference's map is the bilinear one
    assert expected.any() or name.startswith("gated") or image_score < 2.0  # every case but the gated ones shows something


def test_the_mask_rules_differ_where_they_should():
    """On the three blobs (peaks 1, 2, 3) of an image scoring 3.0 (under the image threshold 5, over the loose gate 2)."""
    anomaly_map = three_blobs()
    peaks = {1.0: (12, 12), 2.0: (12, 48), 3.0: (48, 28)}  # each blob's centre at the 64 x 64 size

    def shown(rule: Thresholds, score: float = 3.0) -> set[float]:
        mask = mask_from_map(anomaly_map, 64, 64, rule, score) > 0
        return {peak for peak, (y, x) in peaks.items() if mask[y, x]}

    rules = MASK_RULES
    assert shown(rules["gated (today's default)"]) == set()
    assert shown(rules["gated (today's default)"], 6.0) == {1.0, 2.0, 3.0}
    assert shown(rules["ungated (cards from before gate_masks)"]) == {1.0, 2.0, 3.0}
    assert shown(rules["(a) gated, regions with their own evidence"]) == {2.0, 3.0}
    assert shown(rules["(a) gated, regions with their own evidence"], 6.0) == {1.0, 2.0, 3.0}
    assert shown(rules["(b) gated at a looser image level"]) == {1.0, 2.0, 3.0}
    assert shown(rules["(b) gated at a looser image level"], 1.0) == set()
    assert shown(rules["(a + b)"], 1.0) == {3.0}
    assert shown(rules["(c) every image: only regions with their own evidence"], 6.0) == {2.0, 3.0}
    # A shown region keeps its whole extent at the pixel threshold, not only its pixels above the region level.
    mask = mask_from_map(anomaly_map, 64, 64, rules["(a) gated, regions with their own evidence"], 3.0) > 0
    full = resize_map(anomaly_map, 64, 64)
    assert (mask & (full < 1.5)).any() and not (mask & (full <= 0.5)).any()


def test_png_bytes_round_trips_exactly():
    rng = np.random.default_rng(1)
    mask = rng.random((37, 53)) < 0.3
    decoded = Image.open(io.BytesIO(png_bytes(mask)))
    assert decoded.mode == "L" and decoded.size == (53, 37)
    np.testing.assert_array_equal(np.asarray(decoded), mask.astype(np.uint8) * 255)
    levels = rng.integers(0, 256, size=(20, 30), dtype=np.uint8)
    np.testing.assert_array_equal(np.asarray(Image.open(io.BytesIO(png_bytes(levels)))), levels)


def test_png_bytes_rejects_other_dtypes_and_shapes():
    with pytest.raises(ValueError, match="float32"):
        png_bytes(np.zeros((4, 4), dtype=np.float32))
    with pytest.raises(ValueError, match=r"\(4, 4, 4\)"):
        png_bytes(np.zeros((4, 4, 4), dtype=np.uint8))


def test_png_bytes_round_trips_rgb():
    image = np.random.default_rng(2).integers(0, 256, size=(7, 9, 3), dtype=np.uint8)
    np.testing.assert_array_equal(np.asarray(Image.open(io.BytesIO(png_bytes(image)))), image)




def _smooth_map(seed: int, size: int = 24) -> np.ndarray:
    """A smooth S x S float32 map with ties (rounded), so regions grow and merge as the threshold falls."""
    from scipy import ndimage

    rng = np.random.default_rng(seed)
    return np.round(ndimage.gaussian_filter(rng.random((size, size)), 1.5) * 300).astype(np.float32) / 300


@pytest.mark.parametrize("min_pixels", [1, 2, 7, 40])
def test_region_levels_flag_what_dropping_small_regions_keeps_at_every_threshold(min_pixels):
    scores = _smooth_map(min_pixels)
    levels = region_levels(scores, min_pixels)
    for threshold in [scores.min() - 1, *np.unique(scores)]:  # every distinct decision
        np.testing.assert_array_equal(levels > threshold, drop_small_regions(scores > threshold, min_pixels))


RULES_SWEPT = {
    "plain": Thresholds(image=1.0),
    "min_region": Thresholds(image=1.0, min_region=6),
    "gated": Thresholds(image=1.0, min_region=6, gate_masks=True),
    "gated at a looser level": Thresholds(image=1.0, min_region=6, gate_masks=True, gate=0.5),
    "gated, regions with their own evidence": Thresholds(image=1.0, min_region=6, gate_masks=True, region=0.8),
    "ungated, only regions with their own evidence": Thresholds(image=1.0, min_region=6, region=0.7),
    "own evidence nowhere": Thresholds(image=1.0, min_region=6, region=5.0),
}


@pytest.mark.parametrize("rule", RULES_SWEPT.values(), ids=RULES_SWEPT.keys())
@pytest.mark.parametrize("image_score", [2.0, 0.75, 0.25])
def test_mask_scores_above_a_pixel_threshold_are_the_mask_written_with_it(rule, image_score):
    """For every pixel threshold the model could hold, mask_from_map writes exactly mask_scores > threshold."""
    anomaly_map = _smooth_map(3, 16)
    anomaly_map = (anomaly_map - anomaly_map.min()) / (anomaly_map.max() - anomaly_map.min())
    scores = mask_scores(anomaly_map, 37, 29, rule, image_score)
    assert scores.shape == (37, 29) and scores.dtype == np.float32
    shown = 0
    for threshold in np.quantile(anomaly_map, np.linspace(0, 1, 25)):
        written = mask_from_map(anomaly_map, 37, 29, dataclasses.replace(rule, pixel=float(threshold)), image_score) > 0
        np.testing.assert_array_equal(scores > threshold, written)
        shown += written.any()
    if not rule.shows_every_region(image_score) and (rule.region is None or rule.region > 1):
        assert np.all(scores == -np.inf) and not shown
