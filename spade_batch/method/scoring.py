"""Scoring rules: how an image's score comes from its kNN distance and its anomaly map.

The rule is a model setting (image_score: knn, map or combined); `Normalisation` holds the scales the
calibration images taught it. Scoring and calibration both use these; neither defines them.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

import numpy as np


@dataclass(frozen=True)
class ImageScore:
    """Result for one image.

    Attributes:
        score: image anomaly score, of the model's image_score (image_scores below).
        neighbours: K int64 indices into model.train_ids, nearest first.
        anomaly_map: S x S float32 pixel scores at the working size (squared feature distance, divided by
            the layer scales when the model normalises layers).
        knn_score: mean squared distance to the K nearest normal images (the paper's image score).
        map_score: the map's highest pixel, or mean of its highest map_top fraction (spade.map_scores).
    """

    score: float
    neighbours: np.ndarray
    anomaly_map: np.ndarray
    knn_score: float = math.nan
    map_score: float = math.nan


@dataclass(frozen=True)
class Normalisation:
    """Scales learnt from the calibration images, recorded in the model card (None: not learnt).

    Attributes:
        layer_scales: per pyramid layer, the standard deviation of its pixel distances (squared feature units).
        knn: (mean, standard deviation) of the calibration images' kNN image scores.
        map: (mean, standard deviation) of their map scores (spade.map_scores).
    """

    layer_scales: list[float] | None = None
    knn: tuple[float, float] | None = None
    map: tuple[float, float] | None = None

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> Normalisation:
        return cls(
            values.get("layer_scales"),
            tuple(values["knn"]) if values.get("knn") else None,  # type: ignore[arg-type]
            tuple(values["map"]) if values.get("map") else None,  # type: ignore[arg-type]
        )

    def to_dict(self) -> dict[str, Any]:
        return {key: value for key, value in dataclasses.asdict(self).items() if value is not None}


def image_scores(knn_scores: np.ndarray, map_scores: np.ndarray, mode: str, normalisation: Normalisation) -> np.ndarray:
    """The image score of config image_score `mode` from B kNN and B map scores (B float64).

    combined: the mean of the two scores, each standardised by the calibration images' mean and standard
    deviation; NaN while the model has not learnt them (during fit's calibration).
    """
    if mode == "knn":
        return np.asarray(knn_scores, np.float64)
    if mode == "map":
        return np.asarray(map_scores, np.float64)
    if normalisation.knn is None or normalisation.map is None:
        return np.full(len(knn_scores), np.nan)
    (knn_mean, knn_std), (map_mean, map_std) = normalisation.knn, normalisation.map
    return ((np.asarray(knn_scores, np.float64) - knn_mean) / knn_std + (np.asarray(map_scores, np.float64) - map_mean) / map_std) / 2
