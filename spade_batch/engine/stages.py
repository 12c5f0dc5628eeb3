"""The model stages Ray Data runs as actors: backbone (fit), scorer (score), calibration (fit's hold-out).

Each is a callable class that loads its big read-only state once in __init__ (backbone, faiss
index, memory-mapped gallery) and then serves many batches; everything it computes is the method's (extractor, scorer, recipe).
Batches and their columns are described in cpu_stages.py, which runs before and after these.
"""

from __future__ import annotations

import uuid
from typing import Any

import numpy as np
import ray

from spade_batch.config import Settings
from spade_batch.engine.cpu_stages import Batch, object_column, passed_on, usable_mask, worker_columns
from spade_batch.formats.card import ModelCard
from spade_batch.formats.model import SpadeModel, load_count
from spade_batch.method.calibrate import CalibrationScores, region_size
from spade_batch.method.extractor import Extractor, backbone_loads
from spade_batch.method.recipe import held_out_moments, read_block, score_held_out
from spade_batch.method.scorer import Scorer


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
        kept = passed_on(batch)
        return {**kept, "global": global_features, **{f"layer{i}": bank for i, bank in enumerate(layers)}}


class ScoreStage:
    """Model stage of score: prepared images -> image_score, neighbour_ids, map (B x S x S float32)."""

    def __init__(self, model_uri: str, settings: Settings, card: dict[str, Any] | None = None):
        options = settings.fsspec_options()
        self.model = SpadeModel.load(model_uri, options, ModelCard.from_dict(card) if card else None)
        extractor = Extractor(settings, options, preprocessing=self.model.card.preprocessing)
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
        kept = passed_on(batch)
        return {**kept, "image_score": scores, "neighbour_ids": object_column(neighbour_ids), "map": maps,
                **worker_columns(count, self.worker, self.node, backbone_loads(), load_count())}


class CalibrationStage:
    """Scores held-out normal images from their stored features (no second extraction), on a model actor:
    the recipe's score_held_out (or, with moments, held_out_moments) on each part's held-out rows.

    Batches: part (str), ids (list of str: the held-out images in that part) -> id, knn_score, map_score,
    pixel_sample (calibrate.pixel_sample of each map), and region_score under the region rule; with moments, one row per part of its summed
    L x 3 distance moments instead.
    """

    def __init__(self, model_uri: str, settings: Settings, card: dict[str, Any], moments: bool = False):
        self.scorer = ScoreStage(model_uri, settings, card).scorer
        self.options, self.moments, self.min_region = settings.fsspec_options(), moments, region_size(settings.calibration)

    def __call__(self, batch: Batch) -> Batch:
        blocks = [read_block(str(part), list(ids), self.options) for part, ids in zip(batch["part"], batch["ids"])]
        if self.moments:
            return {"moments": np.stack([held_out_moments(self.scorer, block) for block in blocks])}
        scored = CalibrationScores.joined([score_held_out(self.scorer, block, self.min_region) for block in blocks])
        columns = {"id": object_column(scored.ids), "knn_score": scored.knn_scores, "map_score": scored.map_scores,
                   "pixel_sample": object_column(scored.pixel_samples)}
        return columns if scored.region_scores is None else {**columns, "region_score": scored.region_scores}
