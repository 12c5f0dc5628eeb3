"""The one fit recipe: training features in part files in, a calibrated model out.

Both fits run it: `detector.fit` (in this process) and `engine.fit` (on Ray). They differ only in how
the feature part files were made and where the held-out images are scored (`HeldOutScorer`). `add`
(in process and on Ray) runs it too, over the parts of every version it descends from plus those of
the images it adds (`Addition`): so a model grown by add is the model one fit of all its images gives.
Everything that decides what the model is happens here, in this order:

1. training hygiene: readable images whose size is far from the rest are left out (trainset.size_outliers);
2. the hold-out: calibration_fraction of the rest, by id hash (calibrate.is_held_out);
3. the card, the centre (one gallery image's features) and the gallery, written part by part;
4. with layer_normalise, a first pass over the held-out images for each layer's spread;
5. the held-out images' scores give the thresholds (calibrate.calibrate_from_samples).

The training set is never whole in memory: one part file per thread at a time.
"""

from __future__ import annotations

import concurrent.futures
import logging
import os
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np

from spade_batch.config import Settings
from spade_batch.formats import storage
from spade_batch.formats.card import ModelCard, Normalisation, VersionRecord, load_card
from spade_batch.formats.features import INDEX_SCHEMA, FeatureTable, read_features
from spade_batch.formats.layout import ModelLayout, part_files, read_columns
from spade_batch.formats.manifest import pairs_sha256
from spade_batch.formats.model import Centre, GalleryWriter, SpadeModel, build_model
from spade_batch.formats.versions import ModelVersion, lineage, next_number, resolve
from spade_batch.method import calibrate
from spade_batch.method.calibrate import CalibrationScores
from spade_batch.method.extractor import Extractor, Features
from spade_batch.method.masks import region_score
from spade_batch.method.scorer import Scorer
from spade_batch.method.trainset import size_outliers

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

    def blocks(self, ids: Sequence[str]) -> Iterator[FeatureTable]:
        """These images' rows, one part file at a time."""
        for part in self.parts_of(ids):
            yield self.block(part, ids)


def read_block(part: str, ids: Iterable[str], options: storage.StorageOptions = None) -> FeatureTable:
    """The rows of these images in one feature part file, in the part's order."""
    table = read_features([part], options)
    wanted = set(ids)
    return table.select(np.array([image_id in wanted for image_id in table.ids], dtype=bool))


def score_held_out(scorer: Scorer, block: FeatureTable, min_region: int | None) -> CalibrationScores:
    """The one way calibration images are scored: from their stored features, with the model's scorer;
    an image that is in the gallery (leave-one-out) against the others only.

    min_region: the region scores' smallest region (calibrate.region_size); None computes none.
    """
    results = scorer.score_features(Features.of_table(block), _own_rows(scorer.model, block.ids))
    return CalibrationScores(
        list(block.ids),
        np.array([r.knn_score for r in results], np.float64),
        np.array([r.map_score for r in results], np.float64),
        [calibrate.pixel_sample(r.anomaly_map) for r in results],
        None if min_region is None else np.array([region_score(r.anomaly_map, min_region) for r in results], np.float64),
    )


def held_out_moments(scorer: Scorer, block: FeatureTable) -> np.ndarray:
    """L x 3 summed (count, sum, sum of squares) of each layer's pixel distances over a block (calibrate.layer_moments)."""
    return scorer.layer_moments(Features.of_table(block), _own_rows(scorer.model, block.ids))


def _own_rows(model: SpadeModel, ids: Sequence[str]) -> np.ndarray | None:
    """Each image's gallery row (-1 when it is not in the gallery), or None when none is."""
    rows = np.array([model.row_of.get(image_id, -1) for image_id in ids], np.int64)
    return rows if (rows >= 0).any() else None


class HeldOutScorer(Protocol):
    """Where the held-out images are scored: in this process (`InProcessHeldOut`) or on model actors (engine.fit)."""

    def moments(self, model: SpadeModel, ids: Sequence[str]) -> np.ndarray:
        """L x 3 layer moments summed over these held-out images (held_out_moments)."""

    def scores(self, model: SpadeModel, ids: Sequence[str]) -> Iterable[CalibrationScores]:
        """These held-out images' scores (score_held_out), in blocks of any order."""


@dataclass(frozen=True)
class InProcessHeldOut:
    """Scores held-out images in this process, part by part."""

    features: StoredFeatures
    extractor: Extractor
    settings: Settings

    def _scorer(self, model: SpadeModel) -> Scorer:
        return Scorer(model, self.extractor, self.settings.chunk_mib * 2**20, self.settings.precision)

    def moments(self, model: SpadeModel, ids: Sequence[str]) -> np.ndarray:
        scorer = self._scorer(model)
        return sum((held_out_moments(scorer, block) for block in self.features.blocks(ids)), np.zeros((len(model.gallery), 3)))

    def scores(self, model: SpadeModel, ids: Sequence[str]) -> Iterator[CalibrationScores]:
        scorer = self._scorer(model)
        min_region = calibrate.region_size(self.settings.calibration)
        return (score_held_out(scorer, block, min_region) for block in self.features.blocks(ids))


@dataclass(frozen=True)
class FitResult:
    """A fitted model and how its training images were used.

    Attributes:
        gallery_ids, calibration_ids: sorted.
        left_out: {"id", "reason"} of the readable images kept out of both for their size.
    """

    model: SpadeModel
    gallery_ids: list[str]
    calibration_ids: list[str]
    left_out: list[dict[str, str]]


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
) -> FitResult:
    """The model of these training features, its gallery files written to the local `folder` (card not saved).

    Calibration images are held out of the gallery or scored leave-one-out (settings.calibration_images).

    failures: images that were never extracted (beside features.failures), recorded in the card.
    held_out: where held-out images are scored (default: in this process).
    version: what the card records of the model's version (default: fit's, version 1).
    """
    left_out = _size_outliers(features.sizes, settings)
    gallery_ids, calibration_ids = split_fit_ids(sorted(set(features.sizes) - {entry["id"] for entry in left_out}), settings)
    card = new_card(extractor, settings, len(gallery_ids), features.manifest_sha256(), [*features.failures, *failures], version)
    model = _write_gallery(features, gallery_ids, card, settings, folder)
    if calibration_ids:
        model = _calibrate(model, calibration_ids, held_out or InProcessHeldOut(features, extractor, settings), settings)
    else:
        log.warning("fit: no images held out for calibration; thresholds stay unset (set calibration_fraction > 0)")
    return FitResult(model, gallery_ids, calibration_ids, left_out)


def _size_outliers(sizes: dict[str, tuple[int, int]], settings: Settings) -> list[dict[str, str]]:
    """The training images to leave out for their size (none with keep_size_outliers), each logged."""
    ids = sorted(sizes)
    outliers = size_outliers(ids, [sizes[i][0] for i in ids], [sizes[i][1] for i in ids])
    verb = "kept (keep_size_outliers)" if settings.keep_size_outliers else "left out of the gallery and calibration"
    for image_id, reason in outliers.items():
        log.warning("fit: training image %s %s: %s", image_id, verb, reason)
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


def _calibrate(model: SpadeModel, calibration_ids: list[str], held_out: HeldOutScorer, settings: Settings) -> SpadeModel:
    """Thresholds (and learnt scales) from the held-out images' scores.

    With layer_normalise the held-out images are searched twice: once for the layers' spreads, then
    for the thresholds of the maps those scales give.
    """
    if settings.layer_normalise:
        scales = calibrate.layer_scales(held_out.moments(model, calibration_ids))
        model = model.with_normalisation(Normalisation(layer_scales=scales))
    # calibration_ids' order, whatever the blocks'
    scores = CalibrationScores.joined(list(held_out.scores(model, calibration_ids)), calibration_ids)
    model = calibrate.calibrate_from_samples(model, scores, settings.calibration)
    for warning in model.card.calibration.warnings:
        log.warning("fit: calibration: %s", warning)
    return model


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

    def new_ids(self, incoming: dict[str, str | None]) -> list[str]:
        """new_images against the parent's readable training images."""
        return new_images({i: self.trained.sources[i][1] for i in self.trained.parts}, incoming)

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
        self, features: StoredFeatures, extractor: Extractor, settings: Settings, folder: str,
        added: tuple[Sequence[str], Sequence[str]], failures: Sequence[dict[str, str]] = (), held_out: HeldOutScorer | None = None,
    ) -> FitResult:
        """The one recipe over features (self.features()), gallery files in the local `folder` (card not saved).

        added: (ids, uris) of the images this add extracted; failures: its images that were never extracted.
        """
        version = VersionRecord(self.number, self.parent.number, len(added[0]), pairs_sha256(*added))
        return fit_from_features(features, extractor, settings, folder, [*self._rejected(), *failures], held_out, version)

    def _rejected(self) -> list[dict[str, str]]:
        """The parent's failed images that have no row in its parts (names the manifest rejected): the card keeps them."""
        return [entry for entry in self.card.failed_train_images if entry["id"] not in self.trained.sources]
