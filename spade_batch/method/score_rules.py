"""Scoring rules: how an image's score comes from its kNN distance and its anomaly map.

The rule is a model setting (image_score: knn, map or combined); the card's `Normalisation` holds the
scales the calibration images taught it. Scoring and calibration both use these; neither defines them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from spade_batch.formats.card import Normalisation


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
