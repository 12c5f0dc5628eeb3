"""The model stages Ray Data runs on model workers (runtime.ModelStage: actors on GPUs, pooled tasks on CPUs): backbone
(fit), scorer (score), calibration (fit's and add's).

Each is a callable class that loads its big read-only state once in __init__ (backbone, faiss
index, memory-mapped gallery) and then serves the run's batches; everything it computes is the method's (extractor, scorer, recipe).
Batches and their columns are described in cpu_stages.py, which runs before and after these.
"""

from __future__ import annotations

import uuid
from typing import Any

import numpy as np
import ray

from spade_batch.config import Settings
from spade_batch.engine.cpu_stages import Batch, object_column, passed_on, usable_mask, worker_columns
from spade_batch.formats.calibration_matches import PixelMatches
from spade_batch.formats.card import ModelCard
from spade_batch.formats.feature_index import read_block
from spade_batch.formats.model import SpadeModel, load_count
from spade_batch.method.calibration_search import CalibrationMatches, match_held_out
from spade_batch.method.extractor import Extractor, backbone_loads
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
        self.loads_before = (backbone_loads(), load_count())  # a pooled process may have served earlier runs
        self.model = SpadeModel.load(model_uri, options, ModelCard.from_dict(card) if card else None)
        extractor = Extractor(settings, options, preprocessing=self.model.card.preprocessing)
        self.scorer = Scorer(self.model, extractor, settings.chunk_bytes, settings.precision)
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
                **worker_columns(count, self.worker, self.node, backbone_loads() - self.loads_before[0],
                                 load_count() - self.loads_before[1])}


class CalibrationStage:
    """Searches calibration images from their stored features (no second extraction), on a model actor: the
    recipe's match_held_out on each part's calibration rows.

    Batches: part (str), ids (list of str: the calibration images in that part) -> id, knn_score, and their
    PixelMatches as neighbours (list of str) and, per layer l, distances<l>, sources<l> and cells<l> (h_l*w_l x kappa arrays).
    previous: the matches an earlier version stored of some of them (calibration_search.calibration_matches).
    """

    def __init__(self, model_uri: str, settings: Settings, card: dict[str, Any], previous: dict[str, PixelMatches]):
        self.scorer = ScoreStage(model_uri, settings, card).scorer
        self.options, self.previous = settings.fsspec_options(), previous

    def __call__(self, batch: Batch) -> Batch:
        blocks = [match_held_out(self.scorer, read_block(str(part), list(ids), self.options), self.previous)
                  for part, ids in zip(batch["part"], batch["ids"])]
        matches = [m for block in blocks for m in block.matches]
        layers = range(len(self.scorer.model.gallery))
        return {
            "id": object_column([i for block in blocks for i in block.ids]),
            "knn_score": np.concatenate([block.knn_scores for block in blocks]),
            "neighbours": object_column([m.neighbour_ids for m in matches]),
            **{f"distances{n}": object_column([m.distances[n] for m in matches]) for n in layers},
            **{f"sources{n}": object_column([m.sources[n] for m in matches]) for n in layers},
            **{f"cells{n}": object_column([m.cells[n] for m in matches]) for n in layers},  # type: ignore[index]
        }


def matches_of(batch: Batch, layers: int) -> CalibrationMatches:
    """The CalibrationMatches of a CalibrationStage output batch."""
    def column(name: str, row: int) -> list[np.ndarray]:
        return [np.asarray(batch[f"{name}{n}"][row]) for n in range(layers)]

    matches = [PixelMatches(list(batch["neighbours"][row]), column("distances", row), column("sources", row), column("cells", row))
               for row in range(len(batch["id"]))]
    return CalibrationMatches([str(i) for i in batch["id"]], np.asarray(batch["knn_score"], np.float64), matches)
