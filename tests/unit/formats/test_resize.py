"""numpy resampling against torch's CPU kernels (the independent reference) on many shapes."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from spade_batch.formats.resize import resize_bilinear, resize_nearest_exact, resize_uint8_antialias

RNG = np.random.default_rng(7)

# Up, down, odd ratios, one-pixel sides, and a downscale steep enough for the widest filters.
SHAPES = [(1, 1, 5, 7), (3, 2, 300, 41), (64, 64, 64, 64), (100, 150, 224, 224), (256, 256, 64, 64),
          (517, 389, 37, 61), (1200, 37, 7, 224), (2000, 1500, 224, 224), (9, 480, 480, 9)]


def random_shapes(count: int) -> list[tuple[int, int, int, int]]:
    return [tuple(int(v) for v in (*RNG.integers(1, 400, 2), *RNG.integers(1, 260, 2))) for _ in range(count)]


@pytest.mark.parametrize("height, width, out_height, out_width", SHAPES + random_shapes(40))
def test_uint8_antialias_is_torchs_kernel_bit_for_bit(height, width, out_height, out_width):
    image = RNG.integers(0, 256, (height, width, 3), dtype=np.uint8)
    expected = F.interpolate(torch.from_numpy(image).permute(2, 0, 1)[None], size=(out_height, out_width),
                             mode="bilinear", antialias=True)[0].permute(1, 2, 0).numpy()
    out = resize_uint8_antialias(image, out_height, out_width)
    assert out.shape == (out_height, out_width, 3) and out.dtype == np.uint8
    np.testing.assert_array_equal(out, expected)


def test_uint8_antialias_keeps_extremes_and_constants():
    image = np.zeros((50, 70, 3), np.uint8)
    image[:, :, 0] = 255
    image[:, :, 2] = 77
    out = resize_uint8_antialias(image, 13, 200)
    assert (out[..., 0] == 255).all() and (out[..., 1] == 0).all() and (out[..., 2] == 77).all()


def on_a_pixel_edge(in_size: int, out_size: int) -> np.ndarray:
    """(out_size,) bool: the output centre maps exactly onto an edge between two input pixels."""
    return (2 * np.arange(out_size) + 1) * in_size % (2 * out_size) == 0


@pytest.mark.parametrize("height, width, out_height, out_width", SHAPES + random_shapes(20) + [(3, 2, 300, 41)])
def test_nearest_exact_is_torchs_kernel_except_exactly_on_pixel_edges(height, width, out_height, out_width):
    # On an edge torch's own pick depends on the other axis' size (3 x 2 -> 300 x 41 and -> 3 x 41 differ).
    mask = RNG.integers(0, 2, (height, width), dtype=np.uint8)
    expected = F.interpolate(torch.from_numpy(mask)[None, None], size=(out_height, out_width), mode="nearest-exact")[0, 0]
    differs = resize_nearest_exact(mask, out_height, out_width) != expected.numpy()
    ties = on_a_pixel_edge(height, out_height)[:, None] | on_a_pixel_edge(width, out_width)[None, :]
    assert not (differs & ~ties).any()


@pytest.mark.parametrize("height, width, out_height, out_width", SHAPES + random_shapes(20))
def test_bilinear_is_torchs_kernel_to_float32_rounding(height, width, out_height, out_width):
    values = RNG.random((height, width)).astype(np.float32)
    expected = F.interpolate(torch.from_numpy(values)[None, None], size=(out_height, out_width), mode="bilinear",
                             align_corners=False)[0, 0].numpy()
    out = resize_bilinear(values, out_height, out_width)
    assert out.shape == (out_height, out_width) and out.dtype == np.float32
    # Both compute source positions in float32; at 2,000 pixels that rounds positions by up to 1e-4 px.
    np.testing.assert_allclose(out, expected, rtol=0, atol=5e-5)
