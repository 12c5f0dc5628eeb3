"""fit on Ray: normal images stream through decode (CPU tasks) -> backbone actors -> feature part files;
then the one fit recipe (method.recipe) builds the model from the parts: gallery, hold-out, calibration.
Held-out images are scored from their stored features, in the driver on a single CPU-only node, else on
model actors (ActorsHeldOut). The steps it shares with add (engine.add) are engine.fit_steps.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from dataclasses import dataclass, field
from typing import Any

from spade_batch.config import Settings
from spade_batch.engine.fit_steps import build_and_publish, extract, held_out_scorer
from spade_batch.engine.runtime import init_ray
from spade_batch.formats import storage
from spade_batch.formats.feature_index import StoredFeatures
from spade_batch.formats.features import SCHEMA_VERSION as FEATURE_SCHEMA_VERSION
from spade_batch.formats.layout import ModelLayout, part_files, record_inputs, refuse_outputs, refuse_shared_place
from spade_batch.formats.locks import holding_lock
from spade_batch.formats.manifest import Manifest, build_manifest, is_manifest_file
from spade_batch.method.extractor import Extractor
from spade_batch.method.recipe import fit_from_features

log = logging.getLogger(__name__)


@dataclass
class FitSummary:
    model_uri: str
    train_images: int
    gallery_images: int
    calibration_images: int
    failed_images: int
    failures: list[dict[str, str]]
    thresholds: dict[str, float | None]
    left_out: list[dict[str, str]] = field(default_factory=list)
    """Readable training images kept out of the gallery and calibration (sizes far from the rest), with why."""
    duplicates: list[dict[str, str]] = field(default_factory=list)
    """{"id", "kept"}: readable training images with the content of another (kept), used once."""
    near_duplicates: dict[str, Any] = field(default_factory=dict)
    """How many calibration images have a near-copy in the gallery (formats.card.NearDuplicates)."""
    warnings: list[str] = field(default_factory=list)
    seconds: dict[str, float] = field(default_factory=dict)
    suspects: list[dict[str, Any]] = field(default_factory=list)
    """{"id", "score"} of the calibration images scoring far above the rest (card calibration.suspects)."""
    suspects_left_out: bool = False


def run_fit(train_source: str, model_uri: str, settings: Settings) -> FitSummary:
    """Extract features of the normal images on Ray, build the model, calibrate it, save it."""
    options = settings.fsspec_options()
    started = time.perf_counter()
    if storage.exists(ModelLayout(model_uri).card, options) and not settings.overwrite:
        raise FileExistsError(f"a model already exists at {model_uri}; pass --overwrite to refit it")
    manifest = build_manifest(train_source, options)
    refuse_outputs(f"--train {train_source}", manifest, not is_manifest_file(train_source), "fit", options)
    refuse_shared_place(("--model", model_uri), ("--train", train_source), manifest.root, "the model's files")
    with holding_lock(ModelLayout(model_uri).lock, f"spade-batch fit into {model_uri}", options):
        return _fit_locked(manifest, model_uri, settings, started)


def _fit_locked(manifest: Manifest, model_uri: str, settings: Settings, started: float) -> FitSummary:
    """run_fit's work, once it holds the model location's lock."""
    options = settings.fsspec_options()
    init_ray(settings.ray_address)
    extractor = Extractor(settings, options)  # weights identity and layer shapes for the card
    layout = ModelLayout(model_uri)
    if settings.overwrite:
        # The old card goes first: no reader may pair it with the new arrays being written; then every version added to it.
        storage.remove(layout.card, options)
        storage.remove(layout.current, options)
        storage.remove(layout.versions, options, recursive=True)
        storage.remove(layout.features, options, recursive=True)
    # Part files of a killed fit are reused only for the same images and feature extractor.
    extraction = {"images": manifest.sha256(), "backbone": settings.backbone, "weights": extractor.weights_sha256,
                  "preprocessing": extractor.preprocessing.to_dict(), "feature_schema": FEATURE_SCHEMA_VERSION,
                  **extractor.pixel_features}
    record_inputs(layout.features, layout.features_inputs, extraction, options)
    extract(manifest.ids, manifest.uris, layout.features, extractor, settings)
    extracted = time.perf_counter()

    features = StoredFeatures.index(part_files(layout.features, options), options)
    rejected = [{"id": uri, "error": reason} for uri, reason in manifest.rejected]
    held_out = held_out_scorer(features, extractor, model_uri, settings)
    fitted = build_and_publish(model_uri, settings, lambda folder: fit_from_features(features, extractor, settings, folder, rejected, held_out))
    card = fitted.model.card
    return FitSummary(
        model_uri=model_uri,
        train_images=len(manifest),
        gallery_images=len(fitted.gallery_ids),
        calibration_images=len(fitted.calibration_ids),
        failed_images=len(card.failed_train_images),
        failures=card.failed_train_images,
        thresholds=dataclasses.asdict(card.thresholds),
        left_out=fitted.left_out,
        duplicates=fitted.selection.duplicates,
        near_duplicates=dataclasses.asdict(card.training.near_duplicates) if card.training else {},
        warnings=list(card.calibration.warnings),
        seconds={"extract": extracted - started, "total": time.perf_counter() - started},
        suspects=list(card.calibration.suspects),
        suspects_left_out=card.calibration.suspects_left_out,
    )


