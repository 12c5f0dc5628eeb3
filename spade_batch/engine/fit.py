"""fit on Ray: normal images stream through decode (CPU tasks) -> backbone actors -> feature part files;
then the gallery is written from the parts holding gallery images, and held-out images calibrate the thresholds
(scored from their stored features: in the driver on a single CPU-only node, else on model actors).
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import ray.data

from spade_batch.config import Settings
from spade_batch.engine.cpu_stages import RETRYABLE, Batch, object_column, read_images, write_feature_part
from spade_batch.engine.runtime import DECODE_TASK, OUTPUT_TASK, ModelStage, Progress, init_ray, stream
from spade_batch.engine.stages import CalibrationStage, ExtractStage, calibration_batch
from spade_batch.formats import storage
from spade_batch.formats.features import SCHEMA_VERSION as FEATURE_SCHEMA_VERSION
from spade_batch.formats.features import read_features
from spade_batch.formats.layout import ModelLayout, done_ids, part_files, read_columns, record_inputs
from spade_batch.formats.locks import holding_lock
from spade_batch.formats.manifest import Manifest, build_manifest
from spade_batch.formats.model import Centre, GalleryWriter, ModelCard, SpadeModel, build_model, cache_root
from spade_batch.method.calibrate import Normalisation, calibrate_from_samples, layer_scales
from spade_batch.method.detector import Extractor, Scorer, new_card, split_fit_ids
from spade_batch.method.trainset import size_outliers

log = logging.getLogger(__name__)

GALLERY_THREADS = 4
"""Part files read and written into the gallery at once: Parquet decoding and centring release the GIL."""


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
    warnings: list[str] = field(default_factory=list)
    seconds: dict[str, float] = field(default_factory=dict)


def run_fit(train_source: str, model_uri: str, settings: Settings) -> FitSummary:
    """Extract features of the normal images on Ray, build the model, calibrate it, save it."""
    options = settings.fsspec_options()
    started = time.perf_counter()
    if storage.exists(ModelLayout(model_uri).card, options) and not settings.overwrite:
        raise FileExistsError(f"a model already exists at {model_uri}; pass --overwrite to refit it")
    manifest = build_manifest(train_source, options)
    with holding_lock(ModelLayout(model_uri).lock, f"spade-batch fit into {model_uri}", options):
        return _fit_locked(manifest, model_uri, settings, started)


def _fit_locked(manifest: Manifest, model_uri: str, settings: Settings, started: float) -> FitSummary:
    """run_fit's work, once it holds the model location's lock."""
    options = settings.fsspec_options()
    init_ray(settings.ray_address)
    extractor = Extractor(settings, options)  # weights identity and layer shapes for the card
    features_uri = ModelLayout(model_uri).features
    if settings.overwrite:
        # The old card goes first: no reader may pair it with the new arrays being written.
        storage.remove(ModelLayout(model_uri).card, options)
        storage.remove(features_uri, options, recursive=True)
    # Part files of a killed fit are reused only for the same images and feature extractor.
    extraction = {"images": manifest.sha256(), "backbone": settings.backbone, "weights": extractor.weights_sha256,
                  "preprocessing": extractor.preprocessing.to_dict(), "feature_schema": FEATURE_SCHEMA_VERSION}
    record_inputs(features_uri, ModelLayout(model_uri).features_inputs, extraction, options)
    _extract(manifest.ids, manifest.uris, features_uri, extractor, settings)
    extracted = time.perf_counter()

    parts = part_files(features_uri, options)
    located, sizes = {}, {}
    for part, columns in read_columns(parts, ["id", "error", "height", "width"], options):
        for i, error, height, width in zip(columns["id"], columns["error"], columns["height"], columns["width"]):
            located[i] = (part, error)
            if error is None:
                sizes[i] = (height, width)
    failures = [{"id": i, "error": error} for i, (_, error) in sorted(located.items()) if error is not None]
    failures += [{"id": uri, "error": reason} for uri, reason in manifest.rejected]
    left_out = _size_outliers(sizes, settings)
    gallery_ids, calibration_ids = split_fit_ids(sorted(set(sizes) - {entry["id"] for entry in left_out}), settings)
    card = new_card(extractor, settings, len(gallery_ids), manifest.sha256(), failures)
    # A local model's gallery is written in place; a remote one's is staged on this node, then uploaded once.
    local = storage.is_local(model_uri)
    folder = storage.filesystem(model_uri, options)[1] if local else tempfile.mkdtemp(prefix="gallery-", dir=_staging_root())
    try:
        model = _write_gallery(folder, located, gallery_ids, card, settings)
        model.publish_arrays(model_uri, options)  # calibration actors load it from there; the card comes last
        if calibration_ids:
            model = _calibrate(model, model_uri, extractor, located, calibration_ids, settings)
        else:
            log.warning("fit: no images held out for calibration; thresholds stay unset (set calibration_fraction > 0)")
        model.write_card(model_uri, options)
    finally:
        if not local:
            shutil.rmtree(folder, ignore_errors=True)
    return FitSummary(
        model_uri=model_uri,
        train_images=len(manifest),
        gallery_images=len(gallery_ids),
        calibration_images=len(calibration_ids),
        failed_images=len(failures),
        failures=failures,
        thresholds=model.card.thresholds,
        left_out=left_out,
        warnings=list(model.card.calibration.get("warnings", [])),
        seconds={"extract": extracted - started, "total": time.perf_counter() - started},
    )


def _size_outliers(sizes: dict[str, tuple[int, int]], settings: Settings) -> list[dict[str, str]]:
    """The training images to leave out for their size (none with keep_size_outliers), each logged."""
    ids = sorted(sizes)
    outliers = size_outliers(ids, [sizes[i][0] for i in ids], [sizes[i][1] for i in ids])
    if not outliers:
        return []
    verb = "kept (keep_size_outliers)" if settings.keep_size_outliers else "left out of the gallery and calibration"
    for image_id, reason in outliers.items():
        log.warning("fit: training image %s %s: %s", image_id, verb, reason)
    return [] if settings.keep_size_outliers else [{"id": i, "reason": r} for i, r in outliers.items()]


def _extract(ids: tuple[str, ...], uris: tuple[str, ...], features_uri: str, extractor: Extractor, settings: Settings) -> None:
    """Feature part files for every image not yet in one; raises RetryableInputError if some stayed unreadable."""
    options = settings.fsspec_options()
    done = done_ids(features_uri, options)
    todo = [{"id": i, "uri": u} for i, u in zip(ids, uris) if i not in done]
    plan = ModelStage.plan(settings)
    log.info("fit: %d images, %d already extracted, %d to extract on %d model workers", len(ids), len(done), len(todo), plan.workers)
    if not todo:
        return
    dataset = (
        ray.data.from_items(todo, override_num_blocks=max(1, min(len(todo) // settings.batch_size, 10_000)))
        .map_batches(read_images, fn_kwargs={"preprocessing": extractor.preprocessing.to_dict(), "options": options,
                                                    "max_pixels": settings.max_pixels},
                     batch_size=settings.shard_size, batch_format="numpy", **DECODE_TASK)
        .map_batches(ExtractStage, fn_constructor_kwargs={"settings": settings}, batch_size=settings.batch_size,
                     batch_format="numpy", compute=plan.compute(), **plan.resources)
        .map_batches(write_feature_part,
                     fn_kwargs={"features_uri": features_uri, "layer_shapes": [vars(s) for s in extractor.layer_shapes], "options": options},
                     batch_size=settings.shard_size, batch_format="numpy", **OUTPUT_TASK)
    )
    retryable = []
    with Progress("extract", len(todo)) as progress:
        for batch in stream(dataset, progress):
            retryable += [f"{i}: {e}" for i, s, e in zip(batch["id"], batch["status"], batch["error"]) if s == RETRYABLE]
    if retryable:
        raise RetryableInputError(
            f"{len(retryable)} training images could not be read for a transient reason (first: {retryable[0]}); "
            "re-run the same command to retry exactly those"
        )


def _write_gallery(
    folder: str, located: dict[str, tuple[str, Any]], gallery_ids: list[str], card: ModelCard, settings: Settings
) -> SpadeModel:
    """The model in folder, its gallery written from the part files holding gallery images, several at a time
    (the cores are free by now)."""
    options = settings.fsspec_options()
    first = read_features([located[gallery_ids[0]][0]], options)
    row = first.ids.index(gallery_ids[0])
    centre = Centre.of_image(first.global_features[row], [layer[row] for layer in first.layers])
    writer = GalleryWriter(folder, gallery_ids, card.layer_shapes, card.global_dim, centre)

    def add(part: str) -> None:
        table = read_features([part], options)
        writer.add(table.ids, table.global_features, table.layers)

    with concurrent.futures.ThreadPoolExecutor(min(GALLERY_THREADS, os.cpu_count() or 1)) as pool:
        list(pool.map(add, sorted({located[image_id][0] for image_id in gallery_ids})))
    return build_model(writer, card, settings)


def _staging_root() -> str:
    root = os.path.join(cache_root(), "staging")
    os.makedirs(root, exist_ok=True)
    return root


def _calibrate(
    model: SpadeModel, model_uri: str, extractor: Extractor, located: dict[str, tuple[str, Any]], calibration_ids: list[str],
    settings: Settings,
) -> SpadeModel:
    """Thresholds from the held-out images' stored features (no second extraction).

    With layer_normalise the held-out images are searched twice: once for the layers' spreads, then
    for the thresholds of the maps those scales give.
    """
    by_part: dict[str, list[str]] = {}
    for image_id in calibration_ids:
        by_part.setdefault(located[image_id][0], []).append(image_id)
    items = [{"part": p, "ids": i} for p, i in sorted(by_part.items())]
    plan = ModelStage.plan(settings)
    actors = None if _calibrates_in_driver(plan, settings) else plan
    log.info("fit: calibrating on %d held-out images %s", len(calibration_ids),
             f"on {plan.workers} model actors" if actors else "in the driver (a single CPU-only node)")

    def batches(model: SpadeModel, moments: bool) -> Iterator[Batch]:
        return _calibration_batches(items, model, model_uri, extractor, settings, actors, moments)

    if settings.layer_normalise:
        moments = sum(batch["moments"].sum(axis=0) for batch in batches(model, moments=True))
        model = model.with_normalisation(Normalisation(layer_scales=layer_scales(moments)).to_dict())
    scored: dict[str, tuple[float, float, np.ndarray]] = {}
    with Progress("calibrate", len(calibration_ids)) as progress:
        for batch in batches(model, moments=False):
            progress.advance(len(batch["id"]))
            scored.update({str(i): (float(k), float(m), np.asarray(p)) for i, k, m, p in
                           zip(batch["id"], batch["knn_score"], batch["map_score"], batch["pixel_sample"])})
    ordered = [scored[i] for i in calibration_ids]
    model = calibrate_from_samples(
        model, np.array([k for k, _, _ in ordered]), np.array([m for _, m, _ in ordered]), [p for _, _, p in ordered], settings
    )
    for warning in model.card.calibration["warnings"]:
        log.warning("fit: calibration: %s", warning)
    return model


def _calibration_batches(
    items: list[dict[str, Any]], model: SpadeModel, model_uri: str, extractor: Extractor, settings: Settings,
    actors: ModelStage | None, moments: bool,
) -> Iterator[Batch]:
    """calibration_batch over the part files holding the held-out images, one part per call: on the
    model actors of `actors` (CalibrationStage), or in this process when it is None."""
    if actors is None:
        scorer = Scorer(model, extractor, settings.chunk_mib * 2**20, settings.precision)
        options = settings.fsspec_options()
        return (calibration_batch(scorer, {"part": np.array([item["part"]]), "ids": object_column([item["ids"]])}, options, moments)
                for item in items)
    return ray.data.from_items(items).map_batches(
        CalibrationStage,
        fn_constructor_kwargs={"model_uri": model_uri, "settings": settings, "card": dataclasses.asdict(model.card), "moments": moments},
        batch_size=1, batch_format="numpy", compute=actors.compute(), **actors.resources,
    ).iter_batches(batch_size=None, batch_format="numpy")


def _calibrates_in_driver(plan: ModelStage, settings: Settings) -> bool:
    """Whether the held-out images are scored in the driver: on a single node without GPUs and with
    model_workers automatic. There the driver computes on the same cores an actor would, with torch
    and the model already open, and spares a second actor pool's start (2 cores, 2,000 images: what
    follows extraction took 12.2-12.6 s with the pool, 6.6 s in the driver). With GPUs, several nodes
    or model_workers set, model actors do it."""
    nodes = [node for node in ray.nodes() if node["Alive"]]
    return len(nodes) == 1 and not plan.gpus and not settings.model_workers
