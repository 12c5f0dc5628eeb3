"""Thresholds from normal images only (no defective examples needed).

image threshold: the (1 - image_fpr) quantile of held-out normal image scores, so that about
    image_fpr of normal images score above it ("is_anomalous" = score > threshold).
pixel threshold: the pixel_quantile of held-out normal pixel scores; each map contributes an
    evenly strided sample of at most PIXEL_SAMPLE values, which bounds memory for any set size.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np

from spade_batch.trainset import calibration_warnings

if TYPE_CHECKING:
    from spade_batch.config import Settings
    from spade_batch.detector import ImageScore
    from spade_batch.model import SpadeModel

PIXEL_SAMPLE = 4096


def pixel_sample(anomaly_map: np.ndarray) -> np.ndarray:
    """At most PIXEL_SAMPLE float32 values of an H x W map, evenly strided (deterministic)."""
    flat = anomaly_map.reshape(-1)
    return flat[:: max(1, math.ceil(flat.size / PIXEL_SAMPLE))].astype(np.float32)


def image_threshold(normal_scores: np.ndarray, target_fpr: float) -> float:
    """Score above which about target_fpr of normal images fall."""
    if normal_scores.size == 0:
        raise ValueError("no calibration scores: hold out some normal images (calibration_fraction > 0)")
    return float(np.quantile(normal_scores, 1.0 - target_fpr, method="higher"))


def pixel_threshold(normal_pixel_samples: Sequence[np.ndarray], quantile: float) -> float:
    if not normal_pixel_samples:
        raise ValueError("no calibration maps: hold out some normal images (calibration_fraction > 0)")
    return float(np.quantile(np.concatenate(normal_pixel_samples), quantile, method="higher"))


def calibrate_from_samples(
    model: SpadeModel, image_scores: np.ndarray, pixel_samples: Sequence[np.ndarray], settings: Settings
) -> SpadeModel:
    """Model with thresholds from the scores of held-out normal images.

    Raises ValueError for scores that cannot give a threshold; the card's calibration lists what
    makes the hold-out weak for the target FPR (trainset.calibration_warnings) under "warnings".
    """
    warnings = calibration_warnings(image_scores, settings.image_fpr)
    summary = {
        "count": int(image_scores.size),
        "image_fpr": settings.image_fpr,
        "pixel_quantile": settings.pixel_quantile,
        "image_score_quantiles": {q: float(np.quantile(image_scores, float(q))) for q in ("0.5", "0.9", "0.99")},
        # Kept for the run report's histogram and drift check (drift.py); cards fitted before lack them.
        "image_scores": sorted(float(score) for score in image_scores),
        "warnings": warnings,
    }
    return model.with_thresholds(
        image_threshold(image_scores, settings.image_fpr),
        pixel_threshold(list(pixel_samples), settings.pixel_quantile),
        summary,
    )


def calibrate(model: SpadeModel, results: Sequence[ImageScore], settings: Settings) -> SpadeModel:
    """calibrate_from_samples over in-process scoring results."""
    return calibrate_from_samples(
        model,
        np.array([r.score for r in results], dtype=np.float64),
        [pixel_sample(r.anomaly_map) for r in results],
        settings,
    )


def is_held_out(image_id: str, fraction: float, seed: int = 0) -> bool:
    """Deterministic hold-out by id hash: stable when other images are added or removed."""
    digest = hashlib.sha256(f"{seed}:{image_id}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64 < fraction
