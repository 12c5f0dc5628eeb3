"""Resampling in numpy, as torch's CPU kernels do it, so that decode and output workers need no torch.

Importing torch and torchvision costs a worker process about 5 CPU-seconds and 300 MB; the CPU
stages of the pipeline (decode, masks) resample on every image, so they do it here instead:

- :func:`resize_uint8_antialias`: bilinear with antialias on uint8 images, bit-identical to
  ``torch.nn.functional.interpolate(mode="bilinear", antialias=True)`` on uint8 (torchvision's
  ``Resize(antialias=True)``): per axis, triangle-filter weights in float64 scaled to int16 at the
  highest precision that fits, integer sums, horizontal pass then vertical, uint8 in between.
- :func:`resize_bilinear`: float32 bilinear, ``align_corners=False``, no antialias (anomaly maps);
  equal to torch's to float32 rounding (both place source pixels in float32).
- :func:`resize_nearest_exact`: nearest at pixel centres (``mode="nearest-exact"``, masks); where an
  output centre falls exactly on an edge between two input pixels torch's pick depends on the
  other axis' size, elsewhere they agree.
"""

from __future__ import annotations

import math

import numpy as np

_MAX_PRECISION = 22
_INT16_LIMIT = 1 << 15


def _antialias_weights(in_size: int, out_size: int) -> tuple[np.ndarray, np.ndarray, int]:
    """One axis: first input index (out_size,), int16 weights (out_size x taps) and their precision in bits."""
    scale = in_size / out_size
    support = scale if scale >= 1.0 else 1.0
    taps = math.ceil(support) * 2 + 1
    inverse = 1.0 / scale if scale >= 1.0 else 1.0
    centre = scale * (np.arange(out_size) + 0.5)
    first = np.maximum((centre - support + 0.5).astype(np.int64), 0)  # truncation, as C's cast
    count = np.clip(np.minimum((centre + support + 0.5).astype(np.int64), in_size) - first, 0, taps)
    offsets = np.arange(taps)
    weights = np.maximum(1.0 - np.abs(((first[:, None] + offsets).astype(np.float64) - centre[:, None] + 0.5) * inverse), 0.0)
    weights[offsets[None, :] >= count[:, None]] = 0.0
    total = np.zeros(out_size)
    for tap in range(taps):  # summed in tap order: the rounding of the normalised weights depends on it
        total += weights[:, tap]
    weights = np.divide(weights, total[:, None], out=weights, where=total[:, None] != 0)
    largest = float(weights.max())
    precision = 0
    while precision < _MAX_PRECISION and int(0.5 + largest * (1 << (precision + 1))) < _INT16_LIMIT:
        precision += 1
    return first, (weights * (1 << precision) + 0.5).astype(np.int64), precision  # C's (int)(0.5 + v)


def _antialias_pass(image: np.ndarray, out_size: int, axis: int) -> np.ndarray:
    """image (H x W x C uint8) resampled along axis 0 or 1 to out_size, uint8."""
    in_size = image.shape[axis]
    if in_size == out_size:
        return image
    first, weights, precision = _antialias_weights(in_size, out_size)
    lines = np.ascontiguousarray(np.moveaxis(image, axis, 0))  # the resampled axis first: whole rows per gather
    weights = weights.astype(np.int32).reshape(out_size, weights.shape[1], *(1,) * (lines.ndim - 1))
    total = np.full((out_size, *lines.shape[1:]), 1 << (precision - 1), np.int32)  # < 2**31: 255 * 2**22 at most
    for tap in range(weights.shape[1]):
        rows = np.minimum(first + tap, in_size - 1)  # beyond an output's taps the weight is 0
        total += lines[rows] * weights[:, tap]
    return np.moveaxis(np.clip(total >> precision, 0, 255).astype(np.uint8), 0, axis)


def resize_uint8_antialias(image: np.ndarray, height: int, width: int) -> np.ndarray:
    """H x W x C uint8 -> height x width x C uint8, bilinear with antialias (torch's uint8 kernel)."""
    return np.ascontiguousarray(_antialias_pass(_antialias_pass(image, width, axis=1), height, axis=0))


def _linear_axis(in_size: int, out_size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """One axis, float32 as torch: low and high input index, and their weights, each (out_size,)."""
    scale = np.float32(in_size) / np.float32(out_size)
    source = np.maximum(scale * (np.arange(out_size, dtype=np.float32) + np.float32(0.5)) - np.float32(0.5), np.float32(0))
    low = np.minimum(np.floor(source).astype(np.int64), in_size - 1)
    high_weight = np.clip(source - low.astype(np.float32), np.float32(0), np.float32(1))
    high = np.where(low < in_size - 1, low + 1, low)
    return low, high, np.float32(1) - high_weight, high_weight


def resize_bilinear(values: np.ndarray, height: int, width: int) -> np.ndarray:
    """H x W float32 -> height x width float32: bilinear, pixel centres aligned, edges clamped, no antialias."""
    values = np.asarray(values, dtype=np.float32)
    row_low, row_high, top, bottom = _linear_axis(values.shape[0], height)
    col_low, col_high, left, right = _linear_axis(values.shape[1], width)
    upper = values[row_low][:, col_low] * left + values[row_low][:, col_high] * right
    lower = values[row_high][:, col_low] * left + values[row_high][:, col_high] * right
    return upper * top[:, None] + lower * bottom[:, None]


def _nearest_exact_axis(in_size: int, out_size: int) -> np.ndarray:
    scale = np.float32(in_size) / np.float32(out_size)
    source = ((np.arange(out_size) + 0.5) * np.float64(scale)).astype(np.float32)  # as torch: double product, float floor
    return np.minimum(np.floor(source).astype(np.int64), in_size - 1)


def resize_nearest_exact(values: np.ndarray, height: int, width: int) -> np.ndarray:
    """H x W (any dtype) -> height x width: the input pixel whose centre is nearest each output centre."""
    return values[np.ix_(_nearest_exact_axis(values.shape[0], height), _nearest_exact_axis(values.shape[1], width))]
