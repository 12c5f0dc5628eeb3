"""Masks from anomaly maps, and their PNG encoding (the one place images are encoded as PNG) and decoding.

A mask is the anomaly map resized to the image's original size and thresholded at the pixel
threshold (0 / 255). Without a known threshold it is the map scaled to 0-255 per image.
"""

from __future__ import annotations

import io

import numpy as np
from PIL import Image

from spade_batch.formats.images import resize_map


def mask_from_map(anomaly_map: np.ndarray, height: int, width: int, threshold: float | None) -> np.ndarray:
    """S x S float map -> height x width uint8 mask: 0/255 above threshold, or the map scaled per image without one."""
    full = resize_map(np.array(anomaly_map, dtype=np.float32), height, width)  # a writable copy: batches arrive read-only
    if threshold is not None:
        return np.where(full > threshold, 255, 0).astype(np.uint8)
    low, high = float(full.min()), float(full.max())
    return np.round(255 * (full - low) / max(high - low, 1e-12)).astype(np.uint8)


def png_bytes(image: np.ndarray) -> bytes:
    """Encode a mask or an image as PNG.

    image: H x W bool (written as 0 / 255, L mode), H x W uint8 (L mode) or H x W x 3 uint8 (RGB).
    """
    array = np.asarray(image)
    if array.dtype == bool and array.ndim == 2:
        array = array.astype(np.uint8) * 255
    if array.dtype != np.uint8 or not (array.ndim == 2 or (array.ndim == 3 and array.shape[2] == 3)):
        raise ValueError(
            f"png_bytes needs H x W bool/uint8 or H x W x 3 uint8, got {array.dtype} {array.shape}; threshold or scale it first"
        )
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


def flagged_pixels(png: bytes, source: str) -> np.ndarray:
    """A written binary mask PNG (0/255) -> H x W bool, True where the mask flags a pixel (any nonzero value).

    source: where the bytes came from, for the error.
    """
    try:
        with Image.open(io.BytesIO(png)) as im:
            array = np.asarray(im)
    except (OSError, ValueError, SyntaxError) as e:
        raise ValueError(f"cannot read the mask {source}: {e}; the scoring run's outputs are damaged, re-run it") from e
    if array.ndim != 2:
        raise ValueError(f"the mask {source} is not a single-channel PNG (shape {array.shape}); it was not written by score")
    return array > 0
