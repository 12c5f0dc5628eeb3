"""Thresholds from normal images only (no defective examples needed).

The calibration images are normal images held out of the gallery, or gallery images scored
leave-one-out (recipe.split_fit_ids).
image threshold: by image_estimator (method.image_threshold), so that about image_fpr of normal images
    score above it ("is_anomalous" = score > threshold); the card records the estimator, its promise (the
    threshold's false-positive-rate law) and the suspect calibration images.
pixel threshold, by pixel_rule: the pixel_quantile of their pooled pixel scores (each map contributes
    an evenly strided sample of at most PIXEL_SAMPLE values, which bounds memory for any set size),
    their mean + 3 standard deviations, or the region rule (pixel_threshold_of).
mask rule levels (optional): the region level, the (1 - region_fpr) quantile of their region scores, at
    which a region shows on its own evidence (region_level); the gate, the (1 - gate_fpr) quantile of
    their image scores, above which an image shows every region.

The same calibration images give the scales of the options beyond the paper (`Normalisation`): each
pyramid layer's spread of pixel distances (layer_normalise), and the mean and spread of the kNN and
map image scores that image_score "combined" standardises before averaging them.
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from spade_batch.formats.card import CalibrationRecord, Thresholds
from spade_batch.method.image_threshold import estimate_image_threshold, order_statistic, suspects
from spade_batch.method.score_rules import image_scores
from spade_batch.method.trainset import calibration_warnings

if TYPE_CHECKING:
    from spade_batch.config import CalibrationSettings
    from spade_batch.formats.model import SpadeModel

PIXEL_SAMPLE = 4096


def pixel_sample(anomaly_map: np.ndarray) -> np.ndarray:
    """At most PIXEL_SAMPLE float32 values of an H x W map, evenly strided (deterministic)."""
    flat = anomaly_map.reshape(-1)
    return flat[:: max(1, math.ceil(flat.size / PIXEL_SAMPLE))].astype(np.float32)


def image_threshold(normal_scores: np.ndarray, target_fpr: float) -> float:
    """Score above which about target_fpr of normal images fall: the order statistic (image_threshold.order_statistic)."""
    if normal_scores.size == 0:
        raise ValueError("no calibration scores: hold out some normal images (calibration_fraction > 0)")
    return order_statistic(np.asarray(normal_scores, np.float64), target_fpr).threshold


def pixel_threshold(normal_pixel_samples: Sequence[np.ndarray], quantile: float) -> float:
    if not normal_pixel_samples:
        raise ValueError("no calibration maps: hold out some normal images (calibration_fraction > 0)")
    return float(np.quantile(np.concatenate(normal_pixel_samples), quantile, method="higher"))


def layer_moments(layer_maps: Sequence[np.ndarray]) -> np.ndarray:
    """L x 3 float64 (count, sum, sum of squares) of each layer's B x h_l x w_l distance maps; sums add up over batches."""
    return np.array([(m.size, m.sum(dtype=np.float64), np.square(m, dtype=np.float64).sum()) for m in layer_maps])


def layer_scales(moments: np.ndarray) -> list[float]:
    """Per layer, the standard deviation of its pixel distances from their summed layer_moments (L x 3)."""
    count, total, squares = moments[:, 0], moments[:, 1], moments[:, 2]
    spread = np.sqrt(np.maximum(squares / count - (total / count) ** 2, 0.0))
    if not (spread > 0).all():
        raise ValueError(f"a layer's pixel distances do not vary on the calibration images (spreads {spread.tolist()}); "
                         "hold out more normal images (calibration_fraction) or drop layer_normalise")
    return spread.tolist()


def score_statistics(scores: np.ndarray, name: str) -> tuple[float, float]:
    """(mean, standard deviation) of the calibration images' scores of one kind."""
    spread = float(np.std(scores))
    if not spread > 0:
        raise ValueError(f"the calibration images' {name} scores do not vary ({scores.size} images); "
                         "hold out more normal images (calibration_fraction) or use another image_score")
    return float(np.mean(scores)), spread


@dataclass(frozen=True)
class CalibrationScores:
    """What scoring B normal calibration images gives calibration.

    Attributes:
        ids: B image ids.
        knn_scores, map_scores: B float64 kNN and map image scores (scoring.ImageScore).
        pixel_samples: B float32 vectors of at most PIXEL_SAMPLE pixel scores each (pixel_sample).
        region_scores: B float64 masks.region_score of each map at the model's min_region; None unless
            the pixel rule is region (region_size).
    """

    ids: list[str]
    knn_scores: np.ndarray
    map_scores: np.ndarray
    pixel_samples: list[np.ndarray]
    region_scores: np.ndarray | None = None


def region_size(settings: CalibrationSettings) -> int | None:
    """The min_region that calibration images' region scores are computed at; None when neither the pixel rule
    nor the region level (region_fpr) needs them."""
    return settings.min_region if settings.pixel_rule == "region" or settings.region_fpr > 0 else None


def region_level(scores: CalibrationScores, settings: CalibrationSettings, pixel: float) -> float | None:
    """The region level of Thresholds.region: the (1 - region_fpr) quantile of the calibration images' region
    scores (so that about region_fpr of normal images hold a region of max(1, min_region) pixels above it),
    and never below the pixel threshold; None when region_fpr is 0."""
    if not settings.region_fpr:
        return None
    if scores.region_scores is None:
        raise ValueError("region_fpr: the calibration images were scored without region scores (region_size)")
    return max(image_threshold(np.asarray(scores.region_scores, np.float64), settings.region_fpr), pixel)


def pixel_threshold_of(scores: CalibrationScores, settings: CalibrationSettings) -> float:
    """The pixel threshold of settings.pixel_rule from the calibration images' maps.

    quantile: pixel_quantile of the pooled pixel samples; mean_3sigma: their mean + 3 standard deviations
    (MVTec AD 2's baseline); region: the (1 - image_fpr) quantile of the region scores, so that about
    image_fpr of normal images show a flagged region of at least min_region pixels.
    """
    if settings.pixel_rule == "region":
        if scores.region_scores is None:
            raise ValueError("pixel_rule region: the calibration images were scored without region scores (region_size)")
        return image_threshold(np.asarray(scores.region_scores, np.float64), settings.image_fpr)
    if settings.pixel_rule == "mean_3sigma":
        pooled = np.concatenate(scores.pixel_samples).astype(np.float64)
        return float(pooled.mean() + 3 * pooled.std())
    return pixel_threshold(scores.pixel_samples, settings.pixel_quantile)


def calibrate_from_samples(model: SpadeModel, scores: CalibrationScores, settings: CalibrationSettings) -> SpadeModel:
    """Model with thresholds (and, for image_score combined, the score statistics) from normal calibration images.

    Raises ValueError for scores that cannot give a threshold; the card's calibration lists what
    makes the calibration weak for the target FPR (trainset.calibration_warnings) under "warnings".
    """
    mode = model.card.settings.image_score
    normalisation = model.card.normalisation
    knn_scores, map_scores = scores.knn_scores, scores.map_scores
    if mode == "combined":
        normalisation = dataclasses.replace(
            normalisation, knn=score_statistics(knn_scores, "kNN"), map=score_statistics(map_scores, "map")
        )
        model = model.with_normalisation(normalisation)
    image_scores_ = image_scores(knn_scores, map_scores, mode, normalisation)
    warnings = calibration_warnings(image_scores_, settings.image_fpr, settings.calibration_images, settings.image_estimator)
    estimate = estimate_image_threshold(image_scores_, settings.image_fpr, settings.image_estimator)
    record = CalibrationRecord(
        count=int(image_scores_.size),
        images=settings.calibration_images,
        image_fpr=settings.image_fpr,
        pixel_rule=settings.pixel_rule,
        pixel_quantile=settings.pixel_quantile,
        image_score_quantiles={q: float(np.quantile(image_scores_, float(q))) for q in ("0.5", "0.9", "0.99")},
        image_scores=sorted(float(score) for score in image_scores_),
        warnings=[*warnings, estimate.note] if estimate.note else warnings,
        image_estimator=estimate.estimator,
        fpr_law=[estimate.law.a, estimate.law.b],
        suspects=[{"id": suspect.id, "score": suspect.score} for suspect in suspects(scores.ids, image_scores_)],
    )
    pixel = pixel_threshold_of(scores, settings)
    looser = settings.gate_fpr > settings.image_fpr  # a gate at or below the verdict's rate is the image threshold itself
    gate = estimate_image_threshold(image_scores_, settings.gate_fpr, settings.image_estimator).threshold if looser else None
    thresholds = Thresholds(estimate.threshold, pixel, settings.min_region, settings.gate_masks, region_level(scores, settings, pixel), gate)
    return model.with_thresholds(thresholds, record)


def id_hash(image_id: str, seed: int = 0) -> float:
    """A number in [0, 1) fixed by the id and seed alone: who calibrates does not depend on the other images."""
    digest = hashlib.sha256(f"{seed}:{image_id}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def is_held_out(image_id: str, fraction: float, seed: int = 0) -> bool:
    """Deterministic hold-out by id hash: stable when other images are added or removed."""
    return id_hash(image_id, seed) < fraction


def leave_one_out_sample(ids: Sequence[str], size: int, seed: int = 0) -> list[str]:
    """The gallery images that calibrate leave-one-out, sorted: all of them, or (size > 0) the `size` with the smallest id_hash."""
    if not size or size >= len(ids):
        return sorted(ids)
    return sorted(sorted(ids, key=lambda image_id: id_hash(image_id, seed))[:size])
