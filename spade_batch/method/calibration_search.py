"""Searching the calibration images: from their stored features, against the model's gallery (each without its own
row and its near-copies), in this process or on model actors (`HeldOutScorer`); matches an earlier version stored kept
where the retrieved images did not change; and the calibration images' scores made from their matches."""

from __future__ import annotations

import logging
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np
import torch

from spade_batch.config import Settings
from spade_batch.formats.calibration_matches import PixelMatches
from spade_batch.formats.feature_index import StoredFeatures
from spade_batch.formats.features import FeatureTable, LayerShape
from spade_batch.formats.model import SpadeModel
from spade_batch.method import calibrate, pixel_search, spade
from spade_batch.method.alignment import KEPT_WITHIN, radius_cells
from spade_batch.method.calibrate import CalibrationScores
from spade_batch.method.extractor import Extractor, Features
from spade_batch.method.masks import region_score
from spade_batch.method.scorer import Scorer

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class CalibrationMatches:
    """What searching B calibration images gives: their ids, kNN scores (B float64) and pixel matches (matching)."""

    ids: list[str]
    knn_scores: np.ndarray
    matches: list[PixelMatches]


def match_held_out(scorer: Scorer, block: FeatureTable, previous: Mapping[str, PixelMatches]) -> CalibrationMatches:
    """The one way calibration images are searched: from their stored features, with the model's scorer; an
    image that is in the gallery (leave-one-out) against the others only; an image in `previous` (its matches
    with an earlier version's gallery) only where its retrieved images changed."""
    knn_scores, matches = scorer.match_features(Features.of_table(block), own_rows(scorer.model, block.ids),
                                                [previous.get(image_id) for image_id in block.ids])
    return CalibrationMatches(list(block.ids), knn_scores.astype(np.float64), matches)


def own_rows(model: SpadeModel, ids: Sequence[str]) -> np.ndarray | None:
    """M x E gallery rows each image is scored without (-1 padded): its own row (leave-one-out) and its near-copies'
    (the card's near_duplicates.neighbours); None when none of the images has any."""
    near = model.card.training.near_duplicates.neighbours if model.card.training else {}
    rows = [[model.row_of[i] for i in (image_id, *near.get(image_id, ())) if i in model.row_of] for image_id in ids]
    width = max(map(len, rows), default=0)
    return np.array([row + [-1] * (width - len(row)) for row in rows], np.int64) if width else None


class HeldOutScorer(Protocol):
    """Where the calibration images are searched: in this process (`InProcessHeldOut`) or on model actors (engine.fit)."""

    def matches(self, model: SpadeModel, ids: Sequence[str], previous: Mapping[str, PixelMatches]) -> Iterable[CalibrationMatches]:
        """These calibration images' matches (match_held_out), in blocks of any order."""


@dataclass(frozen=True)
class InProcessHeldOut:
    """Searches calibration images in this process, part by part."""

    features: StoredFeatures
    extractor: Extractor
    settings: Settings

    def matches(self, model: SpadeModel, ids: Sequence[str], previous: Mapping[str, PixelMatches]) -> Iterator[CalibrationMatches]:
        scorer = Scorer(model, self.extractor, self.settings.chunk_bytes, self.settings.precision)
        return (match_held_out(scorer, block, previous) for block in self.features.blocks(ids))


def calibration_matches(
    model: SpadeModel, ids: Sequence[str], features: StoredFeatures, held_out: HeldOutScorer, previous: Mapping[str, PixelMatches],
) -> dict[str, tuple[float, PixelMatches]]:
    """id -> (kNN score, pixel matches) of every calibration image against the model's gallery.

    previous: the matches an earlier version stored (add's parent). An image that retrieves the same K images
    keeps its matches, found from its global features alone; the others are searched (held_out), each from its
    previous matches when it has them.
    """
    matched = _unchanged(model, [image_id for image_id in ids if image_id in previous], features, previous)
    searched = [image_id for image_id in ids if image_id not in matched]
    if previous:
        log.info("calibrate: %d of %d calibration images retrieve the images they did in the version added to: kept; "
                 "%d searched", len(matched), len(ids), len(searched))
    for block in held_out.matches(model, searched, {i: previous[i] for i in searched if i in previous}):
        matched.update(zip(block.ids, zip(block.knn_scores.tolist(), block.matches)))
    return matched


def _unchanged(
    model: SpadeModel, ids: Sequence[str], features: StoredFeatures, previous: Mapping[str, PixelMatches],
) -> dict[str, tuple[float, PixelMatches]]:
    """id -> (kNN score, previous matches) of the images whose K retrieved images are those of their previous matches."""
    if not ids:
        return {}
    global_features = features.global_features(ids)
    queries = spade.centre(torch.from_numpy(global_features), torch.from_numpy(model.centre.global_mean)).numpy()
    knn_scores, neighbours = spade.image_knn(model.index, queries, model.card.settings.k, own_rows(model, ids))
    return {image_id: (float(score), previous[image_id]) for image_id, score, retrieved in zip(ids, knn_scores, neighbours)
            if {model.train_ids[n] for n in retrieved} == set(previous[image_id].neighbour_ids)}


@dataclass(frozen=True)
class AlignmentSample:
    """One calibration image's centred pixel features, its retrieved images' and its full-search matches with them.

    Attributes:
        queries: per layer, P_l x C_l float32 centred (spade.centre) pixel features of the image.
        galleries: per layer, (K * P_l) x C_l float32 centred features of the K images of matches.neighbour_ids, in
            that order (spade.gather_galleries' layout).
        matches: the image's full-search matches with them (distances P_l x kappa, squared).
    """

    queries: list[torch.Tensor]
    galleries: list[torch.Tensor]
    matches: PixelMatches


def kept_shares(samples: Iterable[AlignmentSample], shapes: Sequence[LayerShape], image_size: int, kappa: int,
                radii: Sequence[int]) -> dict[str, float]:
    """Per radius (pixels at the working size), the share of cells whose kappa nearest matches within that radius
    (pixel_search.local_nearest_matches, the search match_radius runs) average at most KEPT_WITHIN more squared distance than
    the full search's. Each layer's cells count with the layer's weight in the map: each layer's share, averaged.

    Returns:
        {"4": share, ...} in [0, 1]; {} without samples.
    """
    kept, cells = np.zeros((len(radii), len(shapes))), np.zeros(len(shapes))
    for sample in samples:
        for layer, shape in enumerate(shapes):
            full = torch.from_numpy(sample.matches.distances[layer]).mean(dim=1)
            cells[layer] += full.numel()
            for row, radius in enumerate(radii):
                found = pixel_search.local_nearest_matches(sample.queries[layer][None], sample.galleries[layer][None], (shape.height, shape.width),
                                                    radius_cells(radius, shape.height, image_size), kappa)[0][0].mean(dim=1)
                kept[row, layer] += int((found <= (1 + KEPT_WITHIN) * full).sum())
    if not cells.all():
        return {}
    return {str(r): float((kept[row] / cells).mean()) for row, r in enumerate(radii)}


ALIGNMENT_IMAGES = 16
"""Calibration images fit searches again within each alignment radius (evenly spaced by id). At the paper's shapes
the four restricted searches of one image cost about a third of its full search (benchmarks/pixel_knn.py)."""


def alignment_samples(model: SpadeModel, ids: Sequence[str], features: StoredFeatures,
                      matched: Mapping[str, tuple[float, PixelMatches]]) -> Iterator[AlignmentSample]:
    """Up to ALIGNMENT_IMAGES of the calibration images ids, evenly spaced, with their full-search matches: their
    stored pixel features and their retrieved images' gallery rows, both centred as the search centres them."""
    chosen = list(ids)[:: max(1, len(ids) // ALIGNMENT_IMAGES)][:ALIGNMENT_IMAGES]
    means = [torch.from_numpy(mean) for mean in model.centre.layer_means]
    for table in features.blocks(chosen):
        for row, image_id in enumerate(table.ids):
            matches = matched[image_id][1]
            retrieved = np.array([[model.row_of[n] for n in matches.neighbour_ids]], np.int64)
            yield AlignmentSample([spade.centre(torch.from_numpy(layer[row]), mean) for layer, mean in zip(table.layers, means)],
                                  [spade.gather_galleries(bank, retrieved)[0] for bank in model.gallery], matches)


CALIBRATION_MAPS = 64
"""Calibration images whose maps are made at once from their matches (about 4 MB of maps at 128 px)."""


def calibration_layer_maps(model: SpadeModel, ids: Sequence[str], matched: Mapping[str, tuple[float, PixelMatches]]) -> Iterator[list[torch.Tensor]]:
    """Per CALIBRATION_MAPS images of ids, per layer their B x h_l x w_l float32 distance maps (PixelMatches.layer_maps)."""
    shapes = model.card.layer_shapes
    for start in range(0, len(ids), CALIBRATION_MAPS):
        maps = [matched[image_id][1].layer_maps(shapes) for image_id in ids[start : start + CALIBRATION_MAPS]]
        yield [torch.from_numpy(np.stack(layer)) for layer in zip(*maps)]


def calibration_scores(
    model: SpadeModel, ids: Sequence[str], matched: Mapping[str, tuple[float, PixelMatches]], min_region: int | None,
) -> CalibrationScores:
    """The calibration images' scores, in the order of ids, from their matches: each map is the scorer's
    (spade.combine_layer_maps of the layer maps, with the model's layer scales), its score spade.map_scores.

    min_region: the region scores' smallest region (calibrate.region_size); None computes none.
    """
    method, size = model.card.settings, model.card.preprocessing.size
    scales = model.card.normalisation.layer_scales if method.layer_normalise else None
    map_scores, samples, regions = [], [], []
    for layer_maps in calibration_layer_maps(model, ids, matched):
        maps = spade.combine_layer_maps(layer_maps, (size, size), method.sigma, scales)
        map_scores += spade.map_scores(maps, method.map_top).tolist()
        for anomaly_map in maps.numpy():
            samples.append(calibrate.pixel_sample(anomaly_map))
            regions.append(region_score(anomaly_map, min_region) if min_region is not None else 0.0)
    return CalibrationScores(list(ids), np.array([matched[i][0] for i in ids], np.float64), np.array(map_scores, np.float64),
                             samples, None if min_region is None else np.array(regions, np.float64))
