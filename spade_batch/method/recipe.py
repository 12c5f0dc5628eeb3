"""The one fit recipe: training features in part files in, a calibrated model out.

Both fits run it: `detector.fit` (in this process) and `engine.fit` (on Ray). They differ only in how
the feature part files were made and where the held-out images are scored (`HeldOutScorer`). `add`
(in process and on Ray) runs it too, over the parts of every version it descends from plus those of
the images it adds (`Addition`): so a model grown by add is the model one fit of all its images gives.
Everything that decides what the model is happens here, in this order:

1. training hygiene (select_training): each content (content_sha256) is used once, whatever its ids
   (trainset.exact_duplicates); readable images whose size is far from the rest are left out (trainset.size_outliers);
2. the hold-out: calibration_fraction of the rest, by id hash (calibrate.is_held_out), or leave-one-out;
3. the card, the centre (one gallery image's features) and the gallery, written part by part;
4. near-duplicates: calibration images with a gallery image much closer than the rest's nearest (trainset.near_duplicates)
   are counted, and each is calibrated without those near-copies, as without its own row;
5. with layer_normalise, a first pass over the held-out images for each layer's spread;
6. the held-out images' scores give the thresholds (calibrate.calibrate_from_samples).

The training set is never whole in memory: one part file per thread at a time.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import logging
import os
from collections.abc import Collection, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
import pyarrow as pa
import torch

from spade_batch.config import Settings
from spade_batch.formats import storage
from spade_batch.formats.calibration_matches import PixelMatches, read_matches, write_matches
from spade_batch.formats.card import (
    ModelCard,
    ModelError,
    NearDuplicates,
    Normalisation,
    TrainingRecord,
    VersionRecord,
    load_card,
)
from spade_batch.formats.features import INDEX_SCHEMA, FeatureTable, read_features, read_global_features
from spade_batch.formats.integrity import read_checked
from spade_batch.formats.layout import ModelLayout, part_files, read_columns
from spade_batch.formats.manifest import pairs_sha256
from spade_batch.formats.model import Centre, SpadeModel
from spade_batch.formats.model_build import GalleryWriter, build_model
from spade_batch.formats.versions import ModelVersion, lineage, next_number, resolve
from spade_batch.method import calibrate, spade
from spade_batch.method.alignment import measure_alignment
from spade_batch.method.calibrate import CalibrationScores
from spade_batch.method.extractor import Extractor, Features
from spade_batch.method.masks import region_score
from spade_batch.method.scorer import Scorer
from spade_batch.method.trainset import NEAR_FRACTION, NEAR_SCALE_RANK, exact_duplicates, near_duplicates, size_outliers

log = logging.getLogger(__name__)

GALLERY_THREADS = 4
"""Part files read and written into the gallery at once: Parquet decoding and centring release the GIL."""


@dataclass(frozen=True)
class StoredFeatures:
    """Training features in part files (formats.features): which part holds each readable image, and its size.

    Attributes:
        parts: id -> the part file holding its row.
        sizes: id -> original (height, width) in pixels.
        failures: {"id", "error"} of the images that could not be read, by id.
        sources: id -> (uri, content_sha256 or None) of every image with a row, readable or not.
        options: storage options that reach the parts.
    """

    parts: dict[str, str]
    sizes: dict[str, tuple[int, int]]
    failures: list[dict[str, str]]
    sources: dict[str, tuple[str, str | None]]
    options: storage.StorageOptions = None

    @classmethod
    def index(cls, part_uris: Iterable[str], options: storage.StorageOptions = None) -> StoredFeatures:
        """Read only the index columns of the parts (INDEX_SCHEMA); of two rows of one id, the later part's counts."""
        parts, sizes, errors, sources = {}, {}, {}, {}
        for part, columns in read_columns(part_uris, INDEX_SCHEMA.names, options, INDEX_SCHEMA):
            for image_id, uri, error, height, width, sha256 in zip(*(columns[name] for name in INDEX_SCHEMA.names)):
                parts[image_id], sources[image_id] = part, (uri, sha256)
                if error is None:
                    sizes[image_id] = (height, width)
                    errors.pop(image_id, None)
                else:
                    errors[image_id] = error
                    sizes.pop(image_id, None)
        failures = [{"id": image_id, "error": error} for image_id, error in sorted(errors.items())]
        return cls({i: p for i, p in parts.items() if i in sizes}, sizes, failures, sources, options)

    def manifest_sha256(self) -> str:
        """The training manifest's hash (manifest.pairs_sha256 of every image with a row, by id): fit's Manifest.sha256."""
        ids = sorted(self.sources)
        return pairs_sha256(ids, [self.sources[image_id][0] for image_id in ids])

    def parts_of(self, ids: Iterable[str]) -> list[str]:
        """The part files holding these images, sorted."""
        return sorted({self.parts[image_id] for image_id in ids})

    def block(self, part: str, ids: Iterable[str]) -> FeatureTable:
        """The rows of these images in one part file, in the part's order."""
        return read_block(part, ids, self.options)

    def global_features(self, ids: Sequence[str]) -> np.ndarray:
        """len(ids) x D float32 global features of these images, in their order, reading only the id and global columns."""
        rows = {}
        for part in self.parts_of(ids):
            rows.update(zip(*read_global_features(part, self.options)))
        return np.stack([rows[image_id] for image_id in ids])

    def blocks(self, ids: Sequence[str]) -> Iterator[FeatureTable]:
        """These images' rows, one part file at a time."""
        for part in self.parts_of(ids):
            yield self.block(part, ids)


def read_block(part: str, ids: Iterable[str], options: storage.StorageOptions = None) -> FeatureTable:
    """The rows of these images in one feature part file, in the part's order."""
    table = read_features([part], options)
    wanted = set(ids)
    return table.select(np.array([image_id in wanted for image_id in table.ids], dtype=bool))


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
    knn_scores, matches = scorer.match_features(Features.of_table(block), _own_rows(scorer.model, block.ids),
                                                [previous.get(image_id) for image_id in block.ids])
    return CalibrationMatches(list(block.ids), knn_scores.astype(np.float64), matches)


def _own_rows(model: SpadeModel, ids: Sequence[str]) -> np.ndarray | None:
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
    knn_scores, neighbours = spade.image_knn(model.index, queries, model.card.settings.k, _own_rows(model, ids))
    return {image_id: (float(score), previous[image_id]) for image_id, score, retrieved in zip(ids, knn_scores, neighbours)
            if {model.train_ids[n] for n in retrieved} == set(previous[image_id].neighbour_ids)}


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


@dataclass(frozen=True)
class Selection:
    """Which readable training images a model uses, and why it does not use the others.

    Attributes:
        gallery_ids, calibration_ids: sorted (split_fit_ids of the images used).
        left_out: {"id", "reason"} of the images kept out of both for their size (trainset.size_outliers).
        duplicates: {"id", "kept"} of the images whose content another image has (trainset.exact_duplicates).
    """

    gallery_ids: list[str]
    calibration_ids: list[str]
    left_out: list[dict[str, str]]
    duplicates: list[dict[str, str]]

    @property
    def used(self) -> set[str]:
        """The images in the gallery or calibration."""
        return {*self.gallery_ids, *self.calibration_ids}

    def record(self, near: NearDuplicates | None = None) -> TrainingRecord:
        """What the card records of it."""
        return TrainingRecord(self.left_out, self.duplicates, near or NearDuplicates())

    def without(self, suspects: Sequence[dict[str, Any]], settings: Settings) -> Selection:
        """The selection with these suspect images ({"id", "score"}) left out, the rest split again (split_fit_ids)."""
        suspected = {entry["id"] for entry in suspects}
        gallery_ids, calibration_ids = split_fit_ids(sorted(self.used - suspected), settings)
        reasons = [{"id": entry["id"], "reason": f"suspect: image score {entry['score']:.4g} far above the other calibration images"}
                   for entry in suspects]
        return Selection(gallery_ids, calibration_ids, [*self.left_out, *reasons], self.duplicates)


def select_training(features: StoredFeatures, settings: Settings, kept_first: Collection[str] = ()) -> Selection:
    """The training images a model of these features uses: each content once (its copy in kept_first, else the
    smallest id; the others listed as duplicates, never counted twice nor calibrating each other), the images
    whose size is far from the rest's left out, then the gallery / calibration split (split_fit_ids)."""
    first = set(kept_first)
    duplicates = exact_duplicates({i: features.sources[i][1] for i in features.sizes}, lambda image_id: image_id not in first)
    if duplicates:
        example = min(duplicates)
        log.warning("training: %d training images have the content of another image (e.g. %s: the same as %s); each content is "
                    "used once", len(duplicates), example, duplicates[example])
    unique = {i: size for i, size in features.sizes.items() if i not in duplicates}
    left_out = _size_outliers(unique, settings)
    gallery_ids, calibration_ids = split_fit_ids(sorted(set(unique) - {entry["id"] for entry in left_out}), settings)
    return Selection(gallery_ids, calibration_ids, left_out, [{"id": i, "kept": kept} for i, kept in sorted(duplicates.items())])


@dataclass(frozen=True)
class FitResult:
    """A fitted model and how its training images were used (selection: which, and why not the others)."""

    model: SpadeModel
    selection: Selection

    @property
    def gallery_ids(self) -> list[str]:
        return self.selection.gallery_ids

    @property
    def calibration_ids(self) -> list[str]:
        return self.selection.calibration_ids

    @property
    def left_out(self) -> list[dict[str, str]]:
        return self.selection.left_out


def split_fit_ids(ids: Sequence[str], settings: Settings) -> tuple[list[str], list[str]]:
    """(gallery ids, calibration ids), both sorted.

    held_out: the calibration images leave the gallery, chosen by id hash (calibrate.is_held_out).
    leave_one_out: every image is in the gallery, and calibration_sample of them (by id hash) are
    scored against the others.
    Raises ValueError when the settings learn scales from calibration images but none was held out.
    """
    if settings.calibration_images == "leave_one_out":
        return sorted(ids), calibrate.leave_one_out_sample(ids, settings.calibration_sample, settings.seed)
    held = {i for i in ids if calibrate.is_held_out(i, settings.calibration_fraction, settings.seed)}
    learnt = [name for name, on in (("layer_normalise", settings.layer_normalise), ("image_score combined", settings.image_score == "combined")) if on]
    if learnt and not held:
        raise ValueError(
            f"{' and '.join(learnt)}: scales are learnt from calibration images, but calibration_fraction "
            f"{settings.calibration_fraction} held out none of the {len(ids)} training images; raise calibration_fraction or add images"
        )
    return sorted(set(ids) - held), sorted(held)


def new_card(
    extractor: Extractor, settings: Settings, train_count: int, manifest_sha256: str, failed: Sequence[dict[str, str]],
    version: VersionRecord | None = None,
) -> ModelCard:
    """The card of a model fitted with this extractor and settings (no thresholds yet); version: default fit's."""
    needed = settings.k + (settings.calibration_images == "leave_one_out")  # an image is not its own neighbour
    if train_count < needed:
        raise ValueError(
            f"k={settings.k} nearest normal images requested but only {train_count} usable training images "
            f"({len(failed)} failed){'; leave-one-out calibration needs k + 1' if needed > settings.k else ''}; "
            "lower k or add normal images"
        )
    return ModelCard(
        settings=settings.method,
        preprocessing=extractor.preprocessing,
        weights_sha256=extractor.weights_sha256,
        layers=extractor.layer_shapes,
        global_dim=extractor.global_dim,
        train_count=train_count,
        train_manifest_sha256=manifest_sha256,
        failed_train_images=list(failed),
        version=version or VersionRecord(),
        calibration_settings=settings.calibration,
    )


def fit_from_features(
    features: StoredFeatures,
    extractor: Extractor,
    settings: Settings,
    folder: str,
    failures: Sequence[dict[str, str]] = (),
    held_out: HeldOutScorer | None = None,
    version: VersionRecord | None = None,
    previous: Mapping[str, PixelMatches] | None = None,
    selection: Selection | None = None,
) -> FitResult:
    """The model of these training features, its gallery files written to the local `folder` (card not saved).

    Calibration images are held out of the gallery or scored leave-one-out (settings.calibration_images).

    failures: images that were never extracted (beside features.failures), recorded in the card.
    held_out: where held-out images are scored (default: in this process).
    version: what the card records of the model's version (default: fit's, version 1).
    previous: the calibration matches of the version added to (calibration_matches); none for a fit.
    selection: the images used (default: select_training of the features).
    """
    selection = selection or select_training(features, settings)
    held_out = held_out or InProcessHeldOut(features, extractor, settings)
    manifest_sha256, failed = features.manifest_sha256(), [*features.failures, *failures]
    card = new_card(extractor, settings, len(selection.gallery_ids), manifest_sha256, failed, version)
    model = _fit_selection(selection, features, card, settings, folder, held_out, previous or {})
    record = model.card.calibration
    if settings.suspects == "keep" or not record.suspects:
        return FitResult(model, selection)
    # Leaving suspects out changes the gallery, so the others' scores are made again against it (their matches reused
    # where their K retrieved images did not hold a suspect). Suspects are found once, on the first pass: the rule is not
    # iterated, so that it never eats into the tail of the normal images.
    for entry in record.suspects:
        log.warning("training: suspect image %s (image score %.4g) left out of the gallery and calibration (suspects leave_out)",
                    entry["id"], entry["score"])
    first_matches = read_matches(storage.read_bytes(os.path.join(folder, ModelLayout.calibration_matches)), extractor.layer_shapes)
    selection = selection.without(record.suspects, settings)
    card = new_card(extractor, settings, len(selection.gallery_ids), manifest_sha256, failed, version)
    model = _fit_selection(selection, features, card, settings, folder, held_out, first_matches)  # written again in the same folder
    model = model.with_thresholds(model.card.thresholds,
                                  dataclasses.replace(model.card.calibration, suspects=record.suspects, suspects_left_out=True))
    return FitResult(model, selection)


def _fit_selection(
    selection: Selection, features: StoredFeatures, card: ModelCard, settings: Settings, folder: str,
    held_out: HeldOutScorer, previous: Mapping[str, PixelMatches],
) -> SpadeModel:
    """The gallery and calibration of the selected training images, with this card (new_card; its training record is
    the selection's)."""
    gallery_ids, calibration_ids = selection.gallery_ids, selection.calibration_ids
    model = _write_gallery(features, gallery_ids, dataclasses.replace(card, training=selection.record()), settings, folder)
    if not calibration_ids:
        log.warning("fit: no images held out for calibration; thresholds stay unset (set calibration_fraction > 0)")
        return model
    near = near_duplicates_of(model, calibration_ids, features)
    model = dataclasses.replace(model, card=dataclasses.replace(model.card, training=selection.record(near)))
    return _calibrate(model, calibration_ids, features, held_out, previous, settings)


NEAR_EXAMPLES = 5
"""Near-duplicate calibration images the card and the warning name, closest first."""
NEAR_NEIGHBOURS = 8
"""At most this many near gallery images are left out of one calibration image's search."""


def near_duplicates_of(model: SpadeModel, calibration_ids: Sequence[str], features: StoredFeatures) -> NearDuplicates:
    """How many calibration images have a gallery image much closer than the rest (trainset.near_duplicates): their
    squared global distances to their nearest gallery images other than themselves, against the scale. Each one's
    near-copies (up to NEAR_NEIGHBOURS, as the gallery's size allows) are recorded: they are left out of its
    calibration search, as its own row is."""
    queries = spade.centre(torch.from_numpy(features.global_features(calibration_ids)), torch.from_numpy(model.centre.global_mean)).numpy()
    own = _own_rows(model, calibration_ids)
    others = len(model.train_ids) - (own.shape[1] if own is not None else 0)
    distances, neighbours = spade.nearest_images(model.index, queries, min(NEAR_SCALE_RANK, others), own)
    scale, close = near_duplicates(distances)
    close[:, max(others - model.card.settings.k, 0):] = False  # k images are left to retrieve
    close[:, NEAR_NEIGHBOURS:] = False
    flagged = np.flatnonzero(close[:, 0])
    near = {calibration_ids[i]: [model.train_ids[n] for n in neighbours[i][close[i]]] for i in flagged}
    examples = [{"id": calibration_ids[i], "neighbour": model.train_ids[neighbours[i, 0]], "distance": float(distances[i, 0])}
                for i in flagged[np.argsort(distances[flagged, 0], kind="stable")][:NEAR_EXAMPLES]]
    record = NearDuplicates(len(near), len(calibration_ids), NEAR_FRACTION, scale, examples, near)
    if record.count:
        log.warning("training: %d of %d calibration images have a gallery image closer than %g x the scale (%.4g, the median "
                    "distance to the %s-th nearest): each is calibrated without them; e.g. %s", record.count, record.checked,
                    NEAR_FRACTION, scale, distances.shape[1], ", ".join(f"{e['id']} ~ {e['neighbour']} ({e['distance']:.3g})" for e in examples))
    return record


def _size_outliers(sizes: Mapping[str, tuple[int, int]], settings: Settings) -> list[dict[str, str]]:
    """The training images to leave out for their size (none with keep_size_outliers), each logged."""
    ids = sorted(sizes)
    outliers = size_outliers(ids, [sizes[i][0] for i in ids], [sizes[i][1] for i in ids])
    verb = "kept (keep_size_outliers)" if settings.keep_size_outliers else "left out of the gallery and calibration"
    for image_id, reason in outliers.items():
        log.warning("training: image %s %s: %s", image_id, verb, reason)
    return [] if settings.keep_size_outliers else [{"id": i, "reason": r} for i, r in outliers.items()]


def _write_gallery(features: StoredFeatures, gallery_ids: list[str], card: ModelCard, settings: Settings, folder: str) -> SpadeModel:
    """The model in folder, its gallery written from the parts holding gallery images, several at a time."""
    first = features.block(features.parts[gallery_ids[0]], gallery_ids[:1])
    centre = Centre.of_image(first.global_features[0], [layer[0] for layer in first.layers])
    writer = GalleryWriter(folder, gallery_ids, card.layer_shapes, card.global_dim, centre)

    def add(part: str) -> None:
        table = read_features([part], features.options)
        writer.add(table.ids, table.global_features, table.layers)  # rows of images outside the gallery are skipped

    with concurrent.futures.ThreadPoolExecutor(min(GALLERY_THREADS, os.cpu_count() or 1)) as pool:
        list(pool.map(add, features.parts_of(gallery_ids)))
    return build_model(writer, card, settings)


def _calibrate(
    model: SpadeModel, calibration_ids: list[str], features: StoredFeatures, held_out: HeldOutScorer,
    previous: Mapping[str, PixelMatches], settings: Settings,
) -> SpadeModel:
    """Thresholds (and learnt scales) from the calibration images' scores; their matches stored in the model's folder.

    With layer_normalise, each layer's spread is taken from the same matches' layer maps before the maps are made.
    """
    matched = calibration_matches(model, calibration_ids, features, held_out, previous)
    if model.card.settings.match_radius is None:  # restricted matches say nothing of where the full search matches
        record = measure_alignment((matched[i][1] for i in calibration_ids), model.card.layer_shapes[0], model.card.preprocessing.size)
        model = dataclasses.replace(model, card=dataclasses.replace(model.card, alignment=record))
    if settings.layer_normalise:
        moments = sum((calibrate.layer_moments([m.numpy() for m in layer_maps]) for layer_maps in calibration_layer_maps(model, calibration_ids, matched)),
                      np.zeros((len(model.gallery), 3)))
        model = model.with_normalisation(Normalisation(layer_scales=calibrate.layer_scales(moments)))
    scores = calibration_scores(model, calibration_ids, matched, calibrate.region_size(settings.calibration))
    model = calibrate.calibrate_from_samples(model, scores, settings.calibration)
    for warning in model.card.calibration.warnings:
        log.warning("fit: calibration: %s", warning)
    write_matches(os.path.join(model.folder, ModelLayout.calibration_matches), calibration_ids,
                  [matched[image_id][1] for image_id in calibration_ids], model.card.layer_shapes)
    return model.with_file(ModelLayout.calibration_matches)


def new_images(held: dict[str, str | None], incoming: dict[str, str | None]) -> list[str]:
    """The ids of `incoming` that the model does not hold, sorted.

    held: id -> content_sha256 of the images the model holds (None: unknown, features written before it was recorded).
    incoming: id -> content_sha256 of the images offered (read only for the ids the model holds).
    An id it holds is skipped when its content is the same (or unknown); with other content it is a ValueError naming it.
    """
    changed = sorted(i for i, sha256 in incoming.items() if i in held and held[i] is not None and held[i] != sha256)
    if changed:
        raise ValueError(
            f"{len(changed)} images have the id of an image the model holds but other content (first: {changed[0]}); "
            "an id names one image: rename the new images, or fit a new model"
        )
    unknown = [i for i in incoming if i in held and held[i] is None]
    if unknown:
        log.warning("add: %d images the model holds have no recorded content hash (fitted before it was recorded), e.g. %s: "
                    "skipped as the same images", len(unknown), unknown[0])
    return sorted(set(incoming) - set(held))


@dataclass(frozen=True)
class Addition:
    """An add to the model at model_uri: its current version (the parent), the stored features of the parent's
    training images (the parts of the parent and its ancestors), and the version it publishes.

    Attributes:
        model_uri: the model's root.
        parent: the current version, which the images are added to.
        card: the parent's card.
        parts: the feature parts of the parent and its ancestors, oldest version first.
        trained: the parent's training images (StoredFeatures over those parts).
        number: the version it publishes (versions.next_number).
    """

    model_uri: str
    parent: ModelVersion
    card: ModelCard
    parts: list[str]
    trained: StoredFeatures
    number: int

    @classmethod
    def plan(cls, model_uri: str, options: storage.StorageOptions = None) -> Addition:
        parent = resolve(model_uri, None, options)
        parts = [part for version in lineage(model_uri, parent.number, options)
                 for part in part_files(ModelLayout(version.uri).features, options)]
        return cls(model_uri, parent, load_card(parent.uri, options), parts, StoredFeatures.index(parts, options),
                   next_number(model_uri, options))

    @property
    def target(self) -> ModelLayout:
        """The folder of the version this add publishes; its features/ gets the new images' parts."""
        return ModelLayout(self.model_uri).version(self.number)

    def new_ids(self, incoming: dict[str, str | None], failed_before: Sequence[dict[str, str]] = ()) -> list[str]:
        """new_images against the parent's readable training images, less the failed ones not tried again (failed_before)."""
        again = {entry["id"] for entry in failed_before}
        return [i for i in new_images({i: self.trained.sources[i][1] for i in self.trained.parts}, incoming) if i not in again]

    def failed_before(self, listed: Collection[str], hashes: Mapping[str, str]) -> list[dict[str, str]]:
        """The parent's failed images among `listed` that are not tried again, with their recorded errors: their content is
        the one they failed with, or they cannot be read now (hashes: id -> content_sha256 of the images read). An image
        with other content now is tried again. So a re-run of an add reports the failures its first run did."""
        wanted = set(listed)
        return [entry for entry in self.trained.failures
                if entry["id"] in wanted and hashes.get(entry["id"]) in (None, self.trained.sources[entry["id"]][1])]

    def parent_used(self, settings: Settings) -> set[str]:
        """The images the parent's gallery and calibration use: as its card records them, else (a card from before the
        record) as the recipe selects them now."""
        if self.card.training is not None:
            return set(self.trained.parts) - set(self.card.training.unused())
        return select_training(self.trained, settings).used

    def select(self, features: StoredFeatures, settings: Settings) -> Selection:
        """select_training of the grown model's features (self.features()), the parent's images kept before new copies of them."""
        return select_training(features, settings, self.parent_used(settings))

    def changes(self, selection: Selection, settings: Settings) -> bool:
        """Whether the grown model's gallery or calibration would differ from the parent's (else nothing is published)."""
        return selection.used != self.parent_used(settings)

    def left_out(self, selection: Selection, new: Collection[str], settings: Settings) -> list[dict[str, str]]:
        """{"id", "reason"} of the images the grown model does not use that are new or that the parent used, by id."""
        unused, concerned = selection.record().unused(), set(new) | self.parent_used(settings)
        return [{"id": image_id, "reason": unused[image_id]} for image_id in sorted(unused) if image_id in concerned]

    def check(self, extractor: Extractor) -> None:
        """Refuse an extractor whose features would not be the parent's: other weights found now, or another preprocessing
        derived from the model's settings (a package whose backbone convention changed)."""
        if (extractor.weights_sha256, extractor.preprocessing) != (self.card.weights_sha256, self.card.preprocessing):
            raise ValueError(
                f"the backbone weights or preprocessing found now differ from those of model {self.model_uri} "
                f"(weights sha256 {extractor.weights_sha256[:12]}... vs {self.card.weights_sha256[:12]}...): "
                "new images' features would not be comparable; restore the weights, or fit a new model"
            )

    def features(self) -> StoredFeatures:
        """Every training image of the grown model: the parent's parts, then those in target.features."""
        options = self.trained.options
        return StoredFeatures.index([*self.parts, *part_files(self.target.features, options)], options)

    def fit(
        self, features: StoredFeatures, extractor: Extractor, settings: Settings, folder: str, added: tuple[Sequence[str], Sequence[str]],
        selection: Selection, failures: Sequence[dict[str, str]] = (), held_out: HeldOutScorer | None = None,
    ) -> FitResult:
        """The one recipe over features (self.features()), gallery files in the local `folder` (card not saved).

        added: (ids, uris) of the images this add extracted and could read; selection: self.select(features, settings);
        failures: its images that were never extracted.
        """
        version = VersionRecord(self.number, self.parent.number, len(added[0]), pairs_sha256(*added), self.left_out(selection, added[0], settings))
        return fit_from_features(features, extractor, settings, folder, [*self._rejected(), *failures], held_out, version,
                                 self.previous_matches(), selection)

    def previous_matches(self) -> dict[str, PixelMatches]:
        """The parent's calibration matches (formats.calibration_matches), checked against its card; none, so that every calibration
        image is searched, when it has none (fitted before they were kept) or they cannot be read or do not match."""
        name = ModelLayout.calibration_matches
        if name not in self.card.files:
            log.info("add: version %d keeps no calibration matches (fitted before they were kept): every calibration image is searched",
                     self.parent.number)
            return {}
        try:
            return read_matches(read_checked(self.parent.uri, self.card, name, self.trained.options), self.card.layer_shapes)
        except ModelError:
            reason: object = "its SHA-256 is not the one the card records"
        except (OSError, ValueError, pa.ArrowException) as error:
            reason = error
        log.warning("add: %s cannot be used (%s): every calibration image is searched", ModelLayout(self.parent.uri).file(name), reason)
        return {}

    def _rejected(self) -> list[dict[str, str]]:
        """The parent's failed images that have no row in its parts (names the manifest rejected): the card keeps them."""
        return [entry for entry in self.card.failed_train_images if entry["id"] not in self.trained.sources]
