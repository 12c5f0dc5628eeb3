"""Masks from maps (threshold or per-image scaling at the original size) and PNG encoding."""

import io

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from spade_batch.method.masks import mask_from_map, png_bytes


def _bilinear(anomaly_map: np.ndarray, height: int, width: int) -> np.ndarray:
    """Independent reference: torch's bilinear resize, align_corners=False, in float64."""
    t = torch.from_numpy(anomaly_map.astype(np.float64))[None, None]
    return F.interpolate(t, size=(height, width), mode="bilinear", align_corners=False)[0, 0].numpy()


def test_mask_is_the_map_at_the_original_size_thresholded():
    anomaly_map = np.random.default_rng(0).random((16, 16)).astype(np.float32)
    mask = mask_from_map(anomaly_map, 37, 53, threshold=0.5)
    full = _bilinear(anomaly_map, 37, 53)
    assert mask.shape == (37, 53) and mask.dtype == np.uint8
    clear = np.abs(full - 0.5) > 1e-6
    np.testing.assert_array_equal(mask[clear] == 255, full[clear] > 0.5)
    assert set(np.unique(mask)) <= {0, 255}


def test_without_a_threshold_the_mask_is_the_map_scaled_per_image():
    anomaly_map = np.random.default_rng(1).random((16, 16)).astype(np.float32) * 7 + 3
    mask = mask_from_map(anomaly_map, 20, 30, threshold=None)
    full = _bilinear(anomaly_map, 20, 30)
    expected = 255 * (full - full.min()) / (full.max() - full.min())
    assert mask.min() == 0 and mask.max() == 255
    np.testing.assert_allclose(mask, expected, atol=0.5 + 1e-3)


def test_a_read_only_map_is_accepted():
    anomaly_map = np.ones((8, 8), np.float32)
    anomaly_map.flags.writeable = False
    assert mask_from_map(anomaly_map, 4, 4, threshold=0.0).min() == 255


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


