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
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from spade_batch.config import Settings
from spade_batch.formats import storage
from spade_batch.formats.calibration_matches import PixelMatches, read_matches, write_matches
from spade_batch.formats.card import (
    AlignmentRecord,
    ModelCard,
    NearDuplicates,
    Normalisation,
    TrainingRecord,
    VersionRecord,
)
from spade_batch.formats.feature_index import StoredFeatures
from spade_batch.formats.features import read_features
from spade_batch.formats.layout import ModelLayout
from spade_batch.formats.model import Centre, SpadeModel
from spade_batch.formats.model_build import GalleryWriter, build_model
from spade_batch.method import calibrate, calibration_search, spade
from spade_batch.method.alignment import ALIGNMENT_RADII, measure_alignment
from spade_batch.method.calibration_search import (
    HeldOutScorer,
    InProcessHeldOut,
    alignment_samples,
    calibration_layer_maps,
    calibration_matches,
    calibration_scores,
    kept_shares,
)
from spade_batch.method.extractor import Extractor
from spade_batch.method.trainset import NEAR_FRACTION, NEAR_SCALE_RANK, exact_duplicates, near_duplicates, size_outliers

log = logging.getLogger(__name__)

GALLERY_THREADS = 4
"""Part files read and written into the gallery at once: Parquet decoding and centring release the GIL."""


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
    own = calibration_search.own_rows(model, calibration_ids)
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


def _alignment(model: SpadeModel, calibration_ids: list[str], features: StoredFeatures,
               matched: Mapping[str, tuple[float, PixelMatches]]) -> AlignmentRecord:
    """How aligned the calibration images are: where all their matches lie, and how many cells a sample of them keeps
    within each radius (method.alignment)."""
    card = model.card
    record = measure_alignment((matched[i][1] for i in calibration_ids), card.layer_shapes[0], card.preprocessing.size)
    samples = list(alignment_samples(model, calibration_ids, features, matched)) if record.matches else []
    kept = kept_shares(samples, card.layer_shapes, card.preprocessing.size, card.settings.kappa, ALIGNMENT_RADII)
    return dataclasses.replace(record, images=len(samples), kept=kept)


def _calibrate(
    model: SpadeModel, calibration_ids: list[str], features: StoredFeatures, held_out: HeldOutScorer,
    previous: Mapping[str, PixelMatches], settings: Settings,
) -> SpadeModel:
    """Thresholds (and learnt scales) from the calibration images' scores; their matches stored in the model's folder.

    With layer_normalise, each layer's spread is taken from the same matches' layer maps before the maps are made.
    """
    matched = calibration_matches(model, calibration_ids, features, held_out, previous)
    if model.card.settings.match_radius is None:  # restricted matches say nothing of where the full search matches
        model = dataclasses.replace(model, card=dataclasses.replace(model.card, alignment=_alignment(model, calibration_ids, features, matched)))
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


