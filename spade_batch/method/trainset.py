"""Training-set hygiene: images whose size is far from the rest, the same content under two ids, calibration images
with a near-copy in the gallery, and hold-outs too small to calibrate on.

A 1 x 1 or a 100000 x 1 "normal" image resized to the working size looks like nothing else in the
set; in the gallery it is a neighbour no test image resembles, and in the calibration hold-out it
drives the image threshold up until no defect is flagged. Such images are found from their
original sizes alone (no decoding), relative to the median training image.

Calibration sets the image threshold at the (1 - image_fpr) quantile of the held-out scores
(method "higher"): with fewer than 1 / image_fpr held-out images that is simply their maximum,
and the false-positive rate it gives is unknown below 1 / n.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence

import numpy as np

AREA_FACTOR = 8.0
"""An image whose pixel area is more than this many times larger or smaller than the median's is an outlier."""
ASPECT_FACTOR = 3.0
"""An image whose width / height is more than this many times wider or taller than the median's is an outlier."""


def size_outliers(ids: Sequence[str], heights: Sequence[int], widths: Sequence[int]) -> dict[str, str]:
    """id -> why, for images whose size is far from the median training image's.

    heights, widths: original sizes in pixels (all > 0). Far: area (h * w) off the median area by
    more than AREA_FACTOR, or aspect ratio (w / h) off the median aspect ratio by more than
    ASPECT_FACTOR, either way. Compared in log space, so that 8 x smaller and 8 x larger are
    equally far.
    """
    if not ids:
        return {}
    height, width = np.asarray(heights, np.float64), np.asarray(widths, np.float64)
    log_area, log_aspect = np.log(height * width), np.log(width / height)
    area_off = np.abs(log_area - np.median(log_area)) > math.log(AREA_FACTOR)
    aspect_off = np.abs(log_aspect - np.median(log_aspect)) > math.log(ASPECT_FACTOR)
    median_area, median_aspect = float(np.exp(np.median(log_area))), float(np.exp(np.median(log_aspect)))
    reasons = {}
    for i in np.flatnonzero(area_off | aspect_off):
        size = f"{int(width[i])} x {int(height[i])}"
        reasons[ids[i]] = (
            f"size {size} is far from the other training images (median area {median_area:.0f} pixels, "
            f"median width/height {median_aspect:.2f}; more than {AREA_FACTOR:g}x the area or {ASPECT_FACTOR:g}x the aspect ratio apart)"
        )
    return reasons


def calibration_warnings(image_scores: np.ndarray, image_fpr: float, images: str = "held_out", estimator: str = "order_statistic") -> list[str]:
    """What is wrong with n calibration image scores for the target FPR (empty: nothing).

    images: how the calibration images were chosen (config calibration_images), for the advice;
    estimator: what sets the image threshold (config image_estimator).
    Raises ValueError when the scores cannot give a threshold at all (none, or not finite).
    """
    count = int(image_scores.size)
    if count == 0:
        raise ValueError("no calibration scores: hold out some normal images (calibration_fraction > 0)")
    if not np.all(np.isfinite(image_scores)):
        raise ValueError(
            f"{int((~np.isfinite(image_scores)).sum())} of {count} calibration image scores are not finite; "
            "check the training images (see the fit summary's failed and left-out lists)"
        )
    warnings = []
    needed = math.ceil(1 / image_fpr)
    if count < needed:
        which, more = {
            "held_out": ("held out for calibration", "normal images held out (raise calibration_fraction, or use calibration_images "
                         "leave_one_out, which calibrates on every normal image)"),
            "leave_one_out": ("scored leave-one-out for calibration", "normal training images (or raise calibration_sample if it "
                              "is below the training set's size)"),
        }[images]
        threshold = (f"The image threshold is the largest calibration score, and its false-positive rate is only known to be "
                     f"below about 1/{count}." if estimator == "order_statistic" else
                     f"The image threshold extrapolates the {estimator} fit beyond the scores they show (`show` states its 90% range).")
        warnings.append(
            f"only {count} images {which}; an image_fpr of {image_fpr:g} needs at least {needed}. "
            f"{threshold} Add {needed - count} or more {more}, raise image_fpr, or pass --image-threshold."
        )
    if count > 1 and float(image_scores.max()) == float(image_scores.min()):
        warnings.append(
            f"all {count} calibration images score {float(image_scores.max()):g}: they duplicate gallery images, "
            "so the threshold says nothing about new normal images. Remove duplicates from the training set."
        )
    return warnings


def exact_duplicates(hashes: Mapping[str, str | None], rank: Callable[[str], int] = lambda image_id: 0) -> dict[str, str]:
    """id -> the id kept, for each image whose content another image has too (the same content_sha256).

    hashes: id -> content_sha256 of the readable training images (None: unknown, never a duplicate).
    rank: which copy is kept: the lowest rank, then the smallest id (add ranks the images its parent uses first,
    so that a copy under a new name never replaces them).
    """
    groups: dict[str, list[str]] = {}
    for image_id, sha256 in hashes.items():
        if sha256 is not None:
            groups.setdefault(sha256, []).append(image_id)
    duplicates = {}
    for copies in groups.values():
        kept, *others = sorted(copies, key=lambda image_id: (rank(image_id), image_id))
        duplicates.update(dict.fromkeys(others, kept))
    return duplicates


NEAR_FRACTION = 0.03
"""A gallery image is a near-copy of a calibration image when their squared global distance is below this fraction of
the scale (near_duplicates). On Magnetic Tile train/good (efficientnet_lite0, 224 px, 634 images) the closest pair of
distinct images is at 0.073 of the scale; a JPEG re-export (quality 95) of an image at most 0.0017, the image 5 grey
levels brighter 0.0078."""
NEAR_SCALE_RANK = 9
"""The scale is the median squared distance of the calibration images to their NEAR_SCALE_RANK-th nearest other gallery
image: beyond the few near-copies an image may have, so that a set whose every image has a copy (a folder re-exported
and added) still stands out (the median nearest distance would then be a copy's)."""


def near_duplicates(distances: np.ndarray, fraction: float = NEAR_FRACTION) -> tuple[float, np.ndarray]:
    """(scale, B x R bool): which of each calibration image's nearest gallery images are near-copies of it.

    distances: B x R squared global-feature distances (float), each row the image's R nearest gallery images other than
    itself, nearest first; the last column gives the scale, their median (none is near when it is 0).
    """
    distances = np.asarray(distances, np.float64)
    scale = float(np.median(distances[:, -1]))
    return scale, distances < fraction * scale
