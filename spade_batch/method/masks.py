"""Masks from anomaly maps, flagged regions, and PNG encoding (the one place images are encoded as PNG) and decoding.

A mask is the anomaly map resized to the image's original size and thresholded at the pixel
threshold (0 / 255); regions smaller than the model's min_region are dropped. Which regions an image
shows is the model's mask rule (card.Thresholds.shows_every_region): every region, or with gate_masks
only on images above the gate level; with a region level, a region is also shown on its own evidence
(it holds min_region pixels above that stricter level). Without a known threshold a mask is the map
scaled to 0-255 per image. Regions are 8-connected.
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


def mask_from_map(anomaly_map: np.ndarray, height: int, width: int, rule: Thresholds, image_score: float | None = None) -> np.ndarray:
    """S x S float map -> height x width uint8 mask: 0/255 where the rule flags a pixel (shown_regions), or the map
    scaled per image when the rule has no pixel threshold.

    image_score: the image's score, which the rule's gate reads (None: unknown, every region is shown).
    """
    full = resize_map(np.array(anomaly_map, dtype=np.float32), height, width)  # a writable copy: batches arrive read-only
    if rule.pixel is None:
        low, high = float(full.min()), float(full.max())
        return np.round(255 * (full - low) / max(high - low, 1e-12)).astype(np.uint8)
    return shown_regions(full, rule, image_score, anomaly_map.size).astype(np.uint8) * 255


def shown_regions(full: np.ndarray, rule: Thresholds, image_score: float | None, map_pixels: int) -> np.ndarray:
    """H x W bool: the pixels a mask flags, from an H x W map at the image's size under a rule with a pixel threshold.

    Flagged regions (full > rule.pixel) of at least min_region pixels at the working size (map_pixels
    pixels there, so min_region * H * W / map_pixels here) are kept; an image that does not show every
    region (Thresholds.shows_every_region) keeps only those holding such a region above rule.region.
    """
    height, width = full.shape
    min_pixels = math.ceil(rule.min_region * height * width / map_pixels) if rule.min_region > 1 else 1
    flagged = full > rule.pixel
    if min_pixels > 1:
        flagged = drop_small_regions(flagged, min_pixels)
    if rule.shows_every_region(image_score):
        return flagged
    if rule.region is None:
        return np.zeros_like(flagged)
    evident = drop_small_regions(full > rule.region, min_pixels)
    labels, _ = ndimage.label(flagged, structure=CONNECTIVITY)
    kept = np.unique(labels[evident])
    return np.isin(labels, kept[kept > 0])


def mask_scores(anomaly_map: np.ndarray, height: int, width: int, rule: Thresholds, image_score: float | None = None) -> np.ndarray:
    """S x S float map -> height x width float32 scores s such that, for any pixel threshold t, the mask mask_from_map
    writes under rule with pixel t (and this image_score) flags exactly the pixels where s > t. So a pixel threshold is
    swept over these scores exactly.

    Each pixel's score is the highest level at which its region keeps min_region pixels (region_levels); on an image
    that does not show every region (Thresholds.shows_every_region) it is also capped by the highest level at which
    its region still holds a pixel with the region's own evidence (a region above rule.region: a reconstruction by
    dilation from those pixels), and -inf everywhere when it has none.
    """
    full = resize_map(np.array(anomaly_map, dtype=np.float32), height, width)
    min_pixels = math.ceil(rule.min_region * height * width / anomaly_map.size) if rule.min_region > 1 else 1
    levels = region_levels(full, min_pixels) if min_pixels > 1 else full
    if rule.shows_every_region(image_score):
        return levels
    evident = drop_small_regions(full > rule.region, min_pixels) if rule.region is not None else np.zeros(full.shape, bool)
    if not evident.any():
        return np.full((height, width), -np.inf, np.float32)
    from skimage.morphology import reconstruction  # imported here, as in region_levels

    # Seeds below every value elsewhere: a pixel is reached only through pixels above the level it is flagged at.
    reached = reconstruction(np.where(evident, full, full.min()), full, method="dilation", footprint=CONNECTIVITY)
    return np.minimum(levels, reached.astype(np.float32))


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
