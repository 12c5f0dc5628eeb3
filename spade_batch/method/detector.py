"""The in-process API: fit on images, add images, score images. No Ray; storage only for the model's own files.

    from spade_batch.method.detector import add, fit, score
    model = fit(normal_images, Settings(backbone="resnet18", weights="random", k=5))
    grown = add(model.folder, more_normal_images)  # version 2, in model.folder/versions/2
    results = score(grown, test_images)            # list[ImageScore]

fit extracts features shard by shard into part files under the model folder, then runs the one fit
recipe (recipe.fit_from_features) that the Ray pipeline runs too, so both give the same model; add
extracts only the images the model does not hold and runs the same recipe over all of them.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from collections.abc import Sequence

import numpy as np

from spade_batch.config import Settings
from spade_batch.formats.feature_index import StoredFeatures
from spade_batch.formats.features import FeatureTable, content_sha256, write_features
from spade_batch.formats.layout import ModelLayout, part_files, part_name
from spade_batch.formats.model import SpadeModel
from spade_batch.formats.versions import NextVersion, adding_version
from spade_batch.method.addition import Addition
from spade_batch.method.extractor import Extractor, Features
from spade_batch.method.recipe import fit_from_features
from spade_batch.method.score_rules import ImageScore
from spade_batch.method.scorer import Scorer

__all__ = ["Extractor", "Features", "ImageScore", "Scorer", "add", "extract_features", "fit", "score"]

log = logging.getLogger(__name__)


def fit(images: Sequence[np.ndarray], settings: Settings, ids: Sequence[str] | None = None, folder: str | None = None) -> SpadeModel:
    """Fit on normal H x W x 3 uint8 images, as the pipeline does on the same images and ids.

    The thresholds are calibrated as settings.calibration_images says: by default each gallery image (at most
    calibration_sample of them) scored against the others (leave_one_out); with held_out, calibration_fraction of
    the images (by id hash) are kept out of the gallery for it. Images whose size is far from the rest are left out
    (keep_size_outliers keeps them).
    The features, gallery files and card go to the local `folder` (a new temp folder by default): a
    complete model there, version 1 (`add` grows it); `model.save(uri)` publishes it elsewhere.
    """
    ids = _ids(images, ids)
    folder = folder or tempfile.mkdtemp(prefix="spade-model-")
    extractor = Extractor(settings)
    layout = ModelLayout(folder)
    extract_features(extractor, images, ids, layout.features, settings.shard_size)
    model = fit_from_features(StoredFeatures.index(part_files(layout.features, None)), extractor, settings, folder).model
    model.write_card(folder)
    return model


def add(folder: str, images: Sequence[np.ndarray], ids: Sequence[str] | None = None, settings: Settings | None = None) -> SpadeModel:
    """Add normal H x W x 3 uint8 images to the model in the local `folder` (fit(..., folder=...)), as `spade-batch add` does.

    Only images whose ids the current version does not hold are extracted; an id it holds is skipped
    (same pixels) or refused (other pixels: ValueError naming it). The model's method and calibration
    settings are kept (settings give the device and batch size). The grown model, the one recipe over
    every training image, is published as the next version in folder/versions/<N>/ and returned; with
    nothing new, or when the gallery and calibration would not change (images left out for their size, or
    with the content of images the model holds under other ids), nothing is published and the current
    version is returned. It holds the model's lock, as `spade-batch add` does:
    an add or fit already under way there makes it raise LockHeldError.
    """
    ids = _ids(images, ids)
    with adding_version(folder, f"add to {folder} (in process)") as version:
        return _add_locked(version, images, ids, settings)


def _add_locked(version: NextVersion, images: Sequence[np.ndarray], ids: list[str], settings: Settings | None) -> SpadeModel:
    """add's work, once it holds the model's lock."""
    addition = Addition.onto(version)
    settings = addition.card.training_settings(settings or Settings())
    hashes = {image_id: content_sha256(image) for image_id, image in zip(ids, images)}
    new = set(addition.new_ids(hashes, addition.failed_before(ids, hashes)))
    if not new:
        return SpadeModel.load(addition.parent.uri)
    extractor = Extractor(settings)
    addition.check(extractor)
    added = [i for i, image_id in enumerate(ids) if image_id in new]
    added_ids, target = [ids[i] for i in added], addition.target.root
    shutil.rmtree(target, ignore_errors=True)  # what an earlier add left unpublished there
    extract_features(extractor, [images[i] for i in added], added_ids, ModelLayout(target).features, settings.shard_size)
    features = addition.features()
    selection = addition.select(features, settings)
    if not addition.changes(selection, settings):
        shutil.rmtree(target, ignore_errors=True)
        log.warning("add: the %d new images leave the gallery and calibration of version %d as they are (%s); nothing published",
                    len(added_ids), addition.parent.number,
                    "; ".join(f"{e['id']}: {e['reason']}" for e in addition.left_out(selection, added_ids, settings)[:3]))
        return SpadeModel.load(addition.parent.uri)
    model = addition.fit(features, extractor, settings, target, (added_ids, added_ids), selection).model
    model.write_card(target)  # last: the version is published
    return model


def _ids(images: Sequence[np.ndarray], ids: Sequence[str] | None) -> list[str]:
    """The images' ids: those given (one per image), else 000000, 000001, ..."""
    ids = list(ids) if ids is not None else [f"{i:06d}" for i in range(len(images))]
    if len(ids) != len(images):
        raise ValueError(f"{len(ids)} ids given for {len(images)} images")
    return ids


def extract_features(extractor: Extractor, images: Sequence[np.ndarray], ids: list[str], features_folder: str, shard_size: int) -> None:
    """Feature part files of these images in features_folder, shard_size images each."""
    for start in range(0, len(images), shard_size):
        shard = range(start, min(start + shard_size, len(images)))
        table = _feature_table(extractor, [images[i] for i in shard], [ids[i] for i in shard])
        write_features(os.path.join(features_folder, part_name(table.ids)), table)


def _feature_table(extractor: Extractor, images: Sequence[np.ndarray], ids: list[str]) -> FeatureTable:
    """The features of some H x W x 3 uint8 images, as a part file stores them."""
    features = extractor.forward(np.stack([extractor.prepare(image) for image in images]))
    return FeatureTable(
        ids=ids,
        uris=ids,
        heights=np.array([image.shape[0] for image in images], np.int32),
        widths=np.array([image.shape[1] for image in images], np.int32),
        global_features=features.global_features.cpu().numpy(),
        layers=features.pixel_rows(),
        layer_shapes=extractor.layer_shapes,
        errors=[None] * len(ids),
        sha256=[content_sha256(image) for image in images],
    )


def score(model: SpadeModel, images: Sequence[np.ndarray], settings: Settings | None = None) -> list[ImageScore]:
    """Score H x W x 3 uint8 images; settings give the device and batch size, the model keys are the model's own."""
    settings = model.card.settings_for(settings or Settings())
    extractor = Extractor(settings, preprocessing=model.card.preprocessing)
    return Scorer(model, extractor, settings.chunk_bytes, settings.precision).score(images)
