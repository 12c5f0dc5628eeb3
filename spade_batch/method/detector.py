"""The in-process API: fit on images, score images. No Ray; storage only for the model's own files.

    from spade_batch.method.detector import fit, score
    model = fit(normal_images, Settings(backbone="resnet18", weights="random", k=5))
    results = score(model, test_images)          # list[ImageScore]

fit extracts features shard by shard into part files under the model folder, then runs the one fit
recipe (recipe.fit_from_features) that the Ray pipeline runs too, so both give the same model.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Sequence

import numpy as np

from spade_batch.config import Settings
from spade_batch.formats.features import FeatureTable, write_features
from spade_batch.formats.layout import ModelLayout, part_files, part_name
from spade_batch.formats.model import SpadeModel
from spade_batch.method.extractor import Extractor, Features
from spade_batch.method.recipe import StoredFeatures, fit_from_features
from spade_batch.method.scorer import Scorer
from spade_batch.method.scoring import ImageScore

__all__ = ["Extractor", "Features", "ImageScore", "Scorer", "fit", "score"]


def fit(images: Sequence[np.ndarray], settings: Settings, ids: Sequence[str] | None = None, folder: str | None = None) -> SpadeModel:
    """Fit on normal H x W x 3 uint8 images, as the pipeline does on the same images and ids.

    settings.calibration_fraction of the images (by id hash) are held out of the gallery to calibrate
    the thresholds; images whose size is far from the rest are left out (keep_size_outliers keeps them).
    The features and gallery files go to the local `folder` (a new temp folder by default);
    `model.save(uri)` publishes the model.
    """
    ids = list(ids) if ids is not None else [f"{i:06d}" for i in range(len(images))]
    if len(ids) != len(images):
        raise ValueError(f"{len(ids)} ids given for {len(images)} images")
    folder = folder or tempfile.mkdtemp(prefix="spade-model-")
    extractor = Extractor(settings)
    features_folder = ModelLayout(folder).features
    for start in range(0, len(images), settings.shard_size):
        shard = range(start, min(start + settings.shard_size, len(images)))
        table = _feature_table(extractor, [images[i] for i in shard], [ids[i] for i in shard])
        write_features(os.path.join(features_folder, part_name(table.ids)), table)
    return fit_from_features(StoredFeatures.index(part_files(features_folder, None)), extractor, settings, folder, "in-process").model


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
    )


def score(model: SpadeModel, images: Sequence[np.ndarray], settings: Settings | None = None) -> list[ImageScore]:
    """Score H x W x 3 uint8 images; settings give the device and batch size, the model keys are the model's own."""
    settings = model.card.settings_for(settings or Settings())
    extractor = Extractor(settings, preprocessing=model.card.preprocessing)
    return Scorer(model, extractor, settings.chunk_mib * 2**20, settings.precision).score(images)
