"""The model stages Ray Data runs as actors: backbone (fit), scorer (score), calibration (fit's hold-out).

Each is a callable class that loads its big read-only state once in __init__ (backbone, faiss
index, memory-mapped gallery) and then serves many batches; everything it computes is detector.py's.
Batches and their columns are described in cpu_stages.py, which runs before and after these.
"""

from __future__ import annotations

import uuid
from typing import Any

import numpy as np
import ray
import torch

from spade_batch.config import Settings
from spade_batch.engine.cpu_stages import PASSED_ON, Batch, object_column, usable_mask, worker_columns
from spade_batch.formats.features import read_features
from spade_batch.formats.images import Preprocessing
from spade_batch.formats.model import ModelCard, SpadeModel, load_count
from spade_batch.method import calibrate
from spade_batch.method.detector import Extractor, Features, Scorer, backbone_loads


class ExtractStage:
    """Model stage of fit: prepared images -> global (B x D float32) and layerN (B x P x C float16) columns."""

    def __init__(self, settings: Settings):
        self.extractor = Extractor(settings, settings.fsspec_options())

    def __call__(self, batch: Batch) -> Batch:
        usable = usable_mask(batch)
        count = len(usable)
        global_features = np.zeros((count, self.extractor.global_dim), np.float32)
        layers = [np.zeros((count, s.height * s.width, s.channels), np.float16) for s in self.extractor.layer_shapes]
        if usable.any():
            features = self.extractor.forward(batch["image"][usable])
            global_features[usable] = features.global_features.cpu().numpy()
            for bank, rows in zip(layers, features.pixel_rows()):
                bank[usable] = rows
        kept = {key: batch[key] for key in PASSED_ON}
        return {**kept, "global": global_features, **{f"layer{i}": bank for i, bank in enumerate(layers)}}


class ScoreStage:
    """Model stage of score: prepared images -> image_score, neighbour_ids, map (B x S x S float32)."""

    def __init__(self, model_uri: str, settings: Settings, card: dict[str, Any] | None = None):
        options = settings.fsspec_options()
        self.model = SpadeModel.load(model_uri, options, ModelCard(**card) if card else None)
        preprocessing = Preprocessing.from_dict(self.model.card.preprocessing)
        extractor = Extractor(settings, options, preprocessing=preprocessing)
        self.scorer = Scorer(self.model, extractor, settings.chunk_mib * 2**20, settings.precision)
        self.worker, self.node = uuid.uuid4().hex[:12], ray.get_runtime_context().get_node_id()

    def __call__(self, batch: Batch) -> Batch:
        usable = usable_mask(batch)
        count, size = len(usable), self.scorer.extractor.preprocessing.size
        scores, maps = np.full(count, np.nan, np.float32), np.zeros((count, size, size), np.float32)
        neighbour_ids: list[list[str]] = [[] for _ in range(count)]
        rows = np.flatnonzero(usable)
        for row, result in zip(rows, self.scorer.score_prepared(batch["image"][usable])):
            scores[row], maps[row] = result.score, result.anomaly_map
            neighbour_ids[row] = [self.model.train_ids[n] for n in result.neighbours]
        kept = {key: batch[key] for key in PASSED_ON}
        return {**kept, "image_score": scores, "neighbour_ids": object_column(neighbour_ids), "map": maps,
                **worker_columns(count, self.worker, self.node, backbone_loads(), load_count())}


class CalibrationStage:
    """Scores held-out normal images from their stored features (no second extraction): calibration_batch
    on a model actor.

    moments: return each part's summed per-layer distance moments (Scorer.layer_moments, for the layer
    scales) instead of per-image scores.
    """

    def __init__(self, model_uri: str, settings: Settings, card: dict[str, Any], moments: bool = False):
        self.scorer = ScoreStage(model_uri, settings, card).scorer
        self.options, self.moments = settings.fsspec_options(), moments

    def __call__(self, batch: Batch) -> Batch:
        return calibration_batch(self.scorer, batch, self.options, self.moments)


def calibration_batch(scorer: Scorer, batch: Batch, options: dict[str, Any], moments: bool) -> Batch:
    """part (str), ids (list of str: the held-out images in that part) -> id, knn_score, map_score,
    pixel_sample (calibrate.pixel_sample of each map); with moments, one row per part of its summed
    L x 3 distance moments instead."""
    ids, knn_scores, map_scores, samples, summed = [], [], [], [], []
    for part, wanted in zip(batch["part"], batch["ids"]):
        table = read_features([str(part)], options)
        keep = np.isin(np.array(table.ids, dtype=object), np.array(list(wanted), dtype=object))
        table = table.select(keep)
        layers = [
            torch.from_numpy(layer.astype(np.float32)).view(len(table), s.height, s.width, s.channels).permute(0, 3, 1, 2)
            for layer, s in zip(table.layers, table.layer_shapes)
        ]
        features = Features(torch.from_numpy(table.global_features), layers)
        if moments:
            summed.append(scorer.layer_moments(features))
            continue
        results = scorer.score_features(features)
        ids += table.ids
        knn_scores += [r.knn_score for r in results]
        map_scores += [r.map_score for r in results]
        samples += [calibrate.pixel_sample(r.anomaly_map) for r in results]
    if moments:
        return {"moments": np.stack(summed)}
    return {"id": object_column(ids), "knn_score": np.array(knn_scores, np.float64),
            "map_score": np.array(map_scores, np.float64), "pixel_sample": object_column(samples)}
