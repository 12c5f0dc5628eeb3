"""Masks from anomaly maps, flagged regions, and PNG encoding (the one place images are encoded as PNG) and decoding.

A mask is the anomaly map resized to the image's original size and thresholded at the pixel
threshold (0 / 255); regions smaller than the model's min_region are dropped, and with gate_masks an
image that is not anomalous gets an empty mask. Without a known threshold it is the map scaled to
0-255 per image. Regions are 8-connected.
"""

from __future__ import annotations

import io
import math

import numpy as np
from PIL import Image
from scipy import ndimage

from spade_batch.formats.card import Thresholds
from spade_batch.formats.images import resize_map

CONNECTIVITY = np.ones((3, 3), dtype=bool)
"""8-connected regions: a diagonal step joins two flagged pixels."""


def mask_from_map(anomaly_map: np.ndarray, height: int, width: int, rule: Thresholds, anomalous: bool | None = None) -> np.ndarray:
    """S x S float map -> height x width uint8 mask: 0/255 where the rule flags a pixel, or the map scaled per image
    when the rule has no pixel threshold.

    anomalous: the image's verdict; with rule.gate_masks an image that is not anomalous gets an empty mask.
    """
    full = resize_map(np.array(anomaly_map, dtype=np.float32), height, width)  # a writable copy: batches arrive read-only
    if rule.pixel is None:
        low, high = float(full.min()), float(full.max())
        return np.round(255 * (full - low) / max(high - low, 1e-12)).astype(np.uint8)
    if rule.gate_masks and anomalous is False:
        return np.zeros((height, width), np.uint8)
    flagged = full > rule.pixel
    if rule.min_region > 1:
        flagged = drop_small_regions(flagged, math.ceil(rule.min_region * height * width / anomaly_map.size))
    return flagged.astype(np.uint8) * 255


def mask_scores(anomaly_map: np.ndarray, height: int, width: int, rule: Thresholds, anomalous: bool | None = None) -> np.ndarray:
    """S x S float map -> height x width float32 scores s such that, for any pixel threshold t, the mask mask_from_map
    writes under rule with pixel t flags exactly the pixels where s > t: the map at the image's size, each pixel
    lowered to the highest level at which its region keeps min_region pixels (region_levels), and -inf everywhere
    when rule.gate_masks and the image is not anomalous. So a pixel threshold is swept over these scores exactly.
    """
    full = resize_map(np.array(anomaly_map, dtype=np.float32), height, width)
    if rule.gate_masks and anomalous is False:
        return np.full((height, width), -np.inf, np.float32)
    if rule.min_region > 1:
        full = region_levels(full, math.ceil(rule.min_region * height * width / anomaly_map.size))
    return full


def region_levels(scores: np.ndarray, min_pixels: int) -> np.ndarray:
    """H x W float scores -> H x W: each pixel's highest level v such that its 8-connected region of `scores >= v`
    holds at least min_pixels pixels (a grey-level area opening). drop_small_regions(scores > t, min_pixels) is
    exactly `region_levels(scores, min_pixels) > t` for every t."""
    from skimage.morphology import area_opening  # a max-tree in C; imported here, so that writing masks needs no scikit-image

    return area_opening(scores, area_threshold=max(1, min_pixels), connectivity=2).astype(scores.dtype, copy=False)


def drop_small_regions(flagged: np.ndarray, min_pixels: int) -> np.ndarray:
    """H x W bool with the regions of fewer than min_pixels pixels cleared."""
    labels, count = ndimage.label(flagged, structure=CONNECTIVITY)
    if not count:
        return flagged
    sizes = np.bincount(labels.ravel())
    keep = sizes >= min_pixels
    keep[0] = False
    return keep[labels]


def region_score(anomaly_map: np.ndarray, min_region: int) -> float:
    """The score r such that `anomaly_map > t` holds a region of at least min_region pixels exactly when t < r.

    An image's mask shows such a region exactly when the pixel threshold is below r, so a threshold set
    on the calibration images' r bounds how many normal images show one. Exact: a binary search over the
    map's own values (about 16 labellings of an S x S map).
    """
    values = np.unique(anomaly_map)
    low, high = 0, len(values) - 1  # `anomaly_map >= values[low]` (the whole map) always holds such a region
    if max(1, min_region) > anomaly_map.size:
        raise ValueError(f"min_region {min_region} is larger than the {anomaly_map.size}-pixel map")
    while low < high:
        middle = (low + high + 1) // 2
        if _largest_region(anomaly_map >= values[middle]) >= max(1, min_region):
            low = middle
        else:
            high = middle - 1
    return float(values[low])


def _largest_region(flagged: np.ndarray) -> int:
    labels, count = ndimage.label(flagged, structure=CONNECTIVITY)
    return int(np.bincount(labels.ravel())[1:].max()) if count else 0


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
