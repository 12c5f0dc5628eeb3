"""fit on Ray: normal images stream through decode (CPU tasks) -> backbone actors -> feature part files;
then the one fit recipe (method.recipe) builds the model from the parts: gallery, hold-out, calibration.
Held-out images are scored from their stored features, in the driver on a single CPU-only node, else on
model actors (ActorsHeldOut). add (engine.add) extracts and publishes through the same functions.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import ray.data

from spade_batch.config import Settings
from spade_batch.engine.cpu_stages import RETRYABLE, read_images, write_feature_part
from spade_batch.engine.runtime import CPU_TASK, ModelStage, Progress, actor_stage, init_ray, stream, task_stage
from spade_batch.engine.stages import CalibrationStage, ExtractStage, matches_of
from spade_batch.formats import storage
from spade_batch.formats.calibration_matches import PixelMatches
from spade_batch.formats.features import SCHEMA_VERSION as FEATURE_SCHEMA_VERSION
from spade_batch.formats.layout import ModelLayout, done_ids, part_files, record_inputs, refuse_outputs, refuse_shared_place
from spade_batch.formats.locks import holding_lock
from spade_batch.formats.manifest import Manifest, build_manifest, is_manifest_file
from spade_batch.formats.model import SpadeModel
from spade_batch.formats.node_cache import cache_root
from spade_batch.method.extractor import Extractor
from spade_batch.method.recipe import (
    CalibrationMatches,
    FitResult,
    HeldOutScorer,
    InProcessHeldOut,
    StoredFeatures,
    fit_from_features,
)

log = logging.getLogger(__name__)


class RetryableInputError(RuntimeError):
    """Some inputs could not be read for a transient reason; a plain re-run retries exactly those."""


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


def build_and_publish(uri: str, settings: Settings, build: Callable[[str], FitResult]) -> FitResult:
    """Run build(folder) (the recipe, its gallery files written into the local folder), then publish the model at uri:
    arrays, then the card, last.

    A local model's gallery is written in place; a remote one's is staged on this node, then uploaded once.
    """
    options = settings.fsspec_options()
    local = storage.is_local(uri)
    folder = storage.filesystem(uri, options)[1] if local else tempfile.mkdtemp(prefix="gallery-", dir=_staging_root())
    try:
        fitted = build(folder)
        fitted.model.publish_arrays(uri, options)
        fitted.model.write_card(uri, options)  # last: its presence marks the model complete
    finally:
        if not local:
            shutil.rmtree(folder, ignore_errors=True)
    return fitted


def extract(ids: Sequence[str], uris: Sequence[str], features_uri: str, extractor: Extractor, settings: Settings) -> int:
    """Feature part files for every image not yet in one; returns how many were extracted now.

    Raises RetryableInputError if some stayed unreadable for a transient reason.
    """
    options = settings.fsspec_options()
    done = done_ids(features_uri, options)
    todo = [{"id": i, "uri": u} for i, u in zip(ids, uris) if i not in done]
    actors = ModelStage.on_cluster(settings)
    log.info("extract: %d images, %d already extracted, %d to extract on %d model workers", len(ids), len(done), len(todo), actors.workers)
    if not todo:
        return 0
    dataset = (
        ray.data.from_items(todo, override_num_blocks=max(1, min(len(todo) // settings.batch_size, 10_000)))
        .map_batches(task_stage(read_images), fn_kwargs={"preprocessing": extractor.preprocessing, "options": options,
                                                    "max_pixels": settings.max_pixels, "hash_content": True},
                     batch_size=settings.shard_size, batch_format="numpy", **CPU_TASK)
        .map_batches(actor_stage(ExtractStage), fn_constructor_kwargs={"settings": settings}, batch_size=settings.batch_size,
                     batch_format="numpy", compute=actors.compute(), **actors.resources)
        .map_batches(task_stage(write_feature_part),
                     fn_kwargs={"features_uri": features_uri, "layer_shapes": [vars(s) for s in extractor.layer_shapes], "options": options},
                     batch_size=settings.shard_size, batch_format="numpy", **CPU_TASK)
    )
    retryable = []
    with Progress("extract", len(todo)) as progress:
        for batch in stream(dataset, progress):
            retryable += [f"{i}: {e}" for i, s, e in zip(batch["id"], batch["status"], batch["error"]) if s == RETRYABLE]
    raise_retryable(retryable)
    return len(todo)


def raise_retryable(retryable: list[str]) -> None:
    """RetryableInputError when some training images ("id: error") could not be read for a transient reason."""
    if retryable:
        raise RetryableInputError(
            f"{len(retryable)} training images could not be read for a transient reason (first: {retryable[0]}); "
            "re-run the same command to retry exactly those"
        )


def _staging_root() -> str:
    root = os.path.join(cache_root(), "staging")
    os.makedirs(root, exist_ok=True)
    return root


def held_out_scorer(features: StoredFeatures, extractor: Extractor, model_uri: str, settings: Settings) -> HeldOutScorer:
    """Where fit scores its held-out images: in the driver on a single CPU-only node, else on model actors."""
    actors = ModelStage.on_cluster(settings)
    if _calibrates_in_driver(actors, settings):
        log.info("fit: held-out images are scored in the driver (a single CPU-only node)")
        return _Counted(InProcessHeldOut(features, extractor, settings))
    log.info("fit: held-out images are scored on %d model actors", actors.workers)
    return _Counted(ActorsHeldOut(features, model_uri, settings, actors))


def _calibrates_in_driver(actors: ModelStage, settings: Settings) -> bool:
    """Whether the held-out images are scored in the driver: on a single node without GPUs and with
    model_workers automatic. There the driver computes on the same cores an actor would, with torch
    and the model already open, and spares a second actor pool's start (2 cores, 2,000 images: what
    follows extraction took 12.2-12.6 s with the pool, 6.6 s in the driver). With GPUs, several nodes
    or model_workers set, model actors do it."""
    nodes = [node for node in ray.nodes() if node["Alive"]]
    return len(nodes) == 1 and not actors.gpus and not settings.model_workers


@dataclass(frozen=True)
class ActorsHeldOut:
    """Searches calibration images on model actors (CalibrationStage), one part file per call.

    The actors load the model from model_uri, so its arrays are published there first; the card
    comes last (run_fit), so no reader takes the half-made model for a complete one.
    """

    features: StoredFeatures
    model_uri: str
    settings: Settings
    actors: ModelStage

    def matches(self, model: SpadeModel, ids: Sequence[str], previous: Mapping[str, PixelMatches]) -> Iterator[CalibrationMatches]:
        if not ids:
            return
        model.publish_arrays(self.model_uri, self.settings.fsspec_options())
        wanted = set(ids)
        items = [{"part": part, "ids": sorted(i for i, p in self.features.parts.items() if p == part and i in wanted)}
                 for part in self.features.parts_of(wanted)]
        batches = ray.data.from_items(items).map_batches(
            actor_stage(CalibrationStage),
            fn_constructor_kwargs={"model_uri": self.model_uri, "settings": self.settings, "card": model.card.to_dict(),
                                   "previous": dict(previous)},
            batch_size=1, batch_format="numpy", compute=self.actors.compute(), **self.actors.resources,
        ).iter_batches(batch_size=None, batch_format="numpy")
        for batch in batches:
            yield matches_of(batch, len(model.gallery))


@dataclass(frozen=True)
class _Counted:
    """A HeldOutScorer whose search shows progress."""

    inner: HeldOutScorer

    def matches(self, model: SpadeModel, ids: Sequence[str], previous: Mapping[str, PixelMatches]) -> Iterator[CalibrationMatches]:
        with Progress("calibrate", len(ids)) as progress:
            for batch in self.inner.matches(model, ids, previous):
                progress.advance(len(batch.ids))
                yield batch
