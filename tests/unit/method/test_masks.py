"""Masks from maps (threshold or per-image scaling at the original size) and PNG encoding."""

import io

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from spade_batch.formats.card import Thresholds
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
    assert not mask_from_map(anomaly_map, 32, 32, rule, anomalous=False).any()  # not flagged: empty
    mask = mask_from_map(anomaly_map, 32, 32, rule, anomalous=True)  # 4x the area: regions under 40 pixels go
    full = _bilinear(anomaly_map, 32, 32) > 0.5
    assert mask[16:28, 16:28].all() and not mask[:10, :10].any() and full[:10, :10].any()
    assert (mask > 0).sum() == drop_small_regions(full, 40).sum()
    ungated = Thresholds(image=0.5, pixel=0.5)  # a card from before these rules: every flagged pixel, whatever the verdict
    np.testing.assert_array_equal(mask_from_map(anomaly_map, 32, 32, ungated, anomalous=False) > 0, full)


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


@pytest.mark.parametrize("rule", [Thresholds(), Thresholds(min_region=6), Thresholds(min_region=6, gate_masks=True)],
                         ids=["plain", "min_region", "gated"])
@pytest.mark.parametrize("anomalous", [True, False])
def test_mask_scores_above_a_pixel_threshold_are_the_mask_written_with_it(rule, anomalous):
    """For every pixel threshold the model could hold, mask_from_map writes exactly mask_scores > threshold."""
    anomaly_map = _smooth_map(3, 16)
    scores = mask_scores(anomaly_map, 37, 29, rule, anomalous)
    assert scores.shape == (37, 29) and scores.dtype == np.float32
    for threshold in np.quantile(anomaly_map, np.linspace(0, 1, 25)):
        written = mask_from_map(anomaly_map, 37, 29, Thresholds(pixel=float(threshold), min_region=rule.min_region,
                                                                 gate_masks=rule.gate_masks), anomalous) > 0
        np.testing.assert_array_equal(scores > threshold, written)
    if rule.gate_masks and not anomalous:
        assert np.all(scores == -np.inf)
