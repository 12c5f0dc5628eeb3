"""score on Ray: an archive streams through decode (CPU tasks) -> model actors -> outputs (CPU tasks).

Ray Data's streaming executor gives backpressure (memory stays bounded for any archive size), actor
reuse (the backbone and gallery load once per actor), retries and CPU/device overlap. The driver
holds only the manifest and counters.

A re-run scores the images with no row yet, and scores again an image whose row is out of date: its
file changed since (the listing's fingerprint differs from the row's), or its mask is gone. Their old
rows, masks and maps are taken out first (Outputs.drop_rows), so each image keeps one row.
"""

from __future__ import annotations

import datetime
import json
import logging
import math
import time
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import ray
import ray.data
import torch

from spade_batch import __version__
from spade_batch.config import Settings
from spade_batch.engine.cpu_stages import RETRYABLE, read_images, write_score_outputs
from spade_batch.engine.runtime import CPU_TASK, ModelStage, Progress, init_ray, stream, task_stage
from spade_batch.engine.stages import ScoreStage
from spade_batch.formats import listing, storage
from spade_batch.formats.card import ModelCard, Thresholds, load_card
from spade_batch.formats.images import Preprocessing, crop_summary
from spade_batch.formats.layout import Outputs, part_name, read_columns, record_inputs, refuse_shared_place, run_token
from spade_batch.formats.locks import holding_lock
from spade_batch.formats.manifest import Manifest, build_manifest, reject_long_outputs
from spade_batch.formats.model import verify_model
from spade_batch.formats.score_table import SCHEMA, ScoreRow, write_scores
from spade_batch.formats.versions import ModelVersion, resolve

log = logging.getLogger(__name__)

MAX_LISTED = 1000
"""At most this many failures (and retryable ids) are listed in run.json; the counts are complete."""


@dataclass
class Workers:
    """Per model actor: its node, the images it scored and the loads its process did."""

    by_worker: dict[str, dict[str, Any]] = field(default_factory=dict)

    def add(self, batch: dict[str, np.ndarray]) -> None:
        for worker, node, backbone, gallery in zip(batch["worker"], batch["node"], batch["backbone_loads"], batch["gallery_loads"]):
            entry = self.by_worker.setdefault(str(worker), {"node": str(node), "images": 0, "backbone_loads": 0, "gallery_loads": 0})
            entry["images"] += 1
            entry["backbone_loads"] = max(entry["backbone_loads"], int(backbone))
            entry["gallery_loads"] = max(entry["gallery_loads"], int(gallery))


@dataclass
class ScoreSummary:
    out_uri: str
    model_uri: str
    model_version: int
    """The model version scored against (formats.versions): the one resolved at the run's start, kept by its resumption."""
    images: int
    scored: int
    failed: int
    retryable: int
    anomalous: int | None
    resumed: int
    changed: int
    """Images whose file changed since their row was written (another fingerprint): scored again, their row,
    mask and map replaced."""
    restored: int
    """Scored images whose mask was gone: scored again, so their row points at a mask that exists."""
    mask_kind: str
    thresholds: dict[str, float | None]
    seconds: float
    images_per_second: float
    failures: list[dict[str, str]]
    retryable_failures: list[dict[str, str]]
    strangers: list[str]
    """Parquet files in scores/ that this run did not write: never read (see layout.Outputs.parts)."""
    workers: dict[str, dict[str, Any]]
    model_workers: int
    versions: dict[str, str]
    settings: dict[str, Any]
    paper_crop: dict[str, Any] | None = None
    """With 'paper' preprocessing: the share of each scored image's area the centre crop drops (images.crop_summary)."""
    started: str = ""
    """When this invocation began the run (UTC, ISO 8601): `nightly --plan` tells tonight's run.json from an older one by it."""


def score_dataset(
    todo: list[dict[str, str]], model_uri: str, settings: Settings, outputs: Outputs, thresholds: Thresholds,
    preprocessing: Preprocessing, actors: ModelStage, stage: type = ScoreStage, run: str | None = None,
) -> ray.data.Dataset:
    """The lazy dataset that scores `todo` ({"id", "uri"} rows) and writes their outputs; yields small status rows."""
    options = settings.fsspec_options()
    blocks = max(1, min(len(todo) // max(1, settings.batch_size), 10_000))
    return (
        ray.data.from_items(todo, override_num_blocks=blocks)
        .map_batches(task_stage(read_images), fn_kwargs={"preprocessing": preprocessing, "options": options,
                                                    "max_pixels": settings.max_pixels, "hash_content": False},
                     batch_size=settings.shard_size, batch_format="numpy", **CPU_TASK)
        .map_batches(**actors.map_arguments(stage, {"model_uri": model_uri, "settings": settings}),
                     batch_size=settings.batch_size, batch_format="numpy")
        .map_batches(task_stage(write_score_outputs),
                     fn_kwargs={"out_root": outputs.root, "thresholds": thresholds, "settings": settings,
                                "run": run},
                     batch_size=settings.shard_size, batch_format="numpy", **CPU_TASK)
    )


def run_score(
    model_uri: str, images_source: str, out_uri: str, settings: Settings, explicit: frozenset[str] = frozenset(),
    stage: type = ScoreStage, actors: ModelStage | None = None, model_version: int | None = None,
) -> ScoreSummary:
    """Score an image set on Ray against the model at model_uri; writes masks, scores and run.json under out_uri.

    model_version: the version to score against; default: the one the run at out_uri recorded when it started
    (a resumption keeps it), else the current one. Whatever is published meanwhile, the run keeps that version.
    stage, actors: the model stage's callable class and its actors (default: ModelStage.on_cluster(settings));
    benchmarks replace them by a simulated device.
    """
    options = settings.fsspec_options()
    started, began = time.perf_counter(), datetime.datetime.now(datetime.timezone.utc).isoformat()
    out_uri = storage.normalize(out_uri, options)  # rows name their masks by it: absolute, wherever a re-run starts
    outputs = Outputs(out_uri)
    version = resolve(model_uri, _recorded_version(outputs, settings) if model_version is None else model_version, options)
    card = load_card(version.uri, options)  # the gallery is loaded by the actors, once the request is known to be valid
    settings = card.training_settings(settings, explicit)  # the model's method and calibration: run.json records what applies
    verify_model(version.uri, card, options)  # a damaged or mixed model is refused before any image is read
    manifest = reject_long_outputs(build_manifest(images_source, options), outputs.files)
    refuse_shared_place(("--out", out_uri), ("--images", images_source), manifest.root, "the run's masks")
    with holding_lock(outputs.lock, f"spade-batch score into {out_uri}", options):
        summary = _score_locked(model_uri, version, card, manifest, outputs, settings, stage, actors, started, began)
    if summary.paper_crop or settings.preprocess != "full":  # once per run, with what the crop dropped when any image was scored
        crop = summary.paper_crop["message"] if summary.paper_crop else "paper preprocessing leaves the image border unscored"
        log.warning("score: %s%s", crop, "; masks are written at the working size" if settings.preprocess != "full" else "")
    if summary.retryable:
        log.error("score: %d images could not be read for a transient reason (e.g. %s); re-run the same command to retry exactly those",
                  summary.retryable, summary.retryable_failures[0]["error"])
    return summary


def _recorded_version(outputs: Outputs, settings: Settings) -> int | None:
    """The model version the run at outputs recorded when it started (None: no run there, or --overwrite replaces it)."""
    options = settings.fsspec_options()
    if settings.overwrite or not storage.exists(outputs.inputs_json, options):
        return None
    return json.loads(storage.read_text(outputs.inputs_json, options)).get("model_version")


def _score_locked(
    model_uri: str, version: ModelVersion, card: ModelCard, manifest: Manifest, outputs: Outputs, settings: Settings,
    stage: type, actors: ModelStage | None, started: float, began: str,
) -> ScoreSummary:
    """run_score's work, once it holds the output location's lock (started: perf_counter; began: wall clock, ISO)."""
    options = settings.fsspec_options()
    thresholds = Thresholds.of(card, settings)
    if settings.overwrite:
        outputs.clear(options)
    inputs = {"images": manifest.sha256(), "model": card.created, "model_version": version.number, "thresholds": asdict(thresholds),
              "save_maps": settings.save_maps, "save_overlays": settings.save_overlays}
    record_inputs(outputs.root, outputs.inputs_json, inputs, options)
    run = run_token(inputs)
    init_ray(settings.ray_address)
    _record_rejected(manifest.rejected, outputs, options, run)
    parts = outputs.parts(options, run)
    if parts.strangers:
        log.warning("score: %d Parquet files in %s are not this run's parts (e.g. %s); they are not read: remove them",
                    len(parts.strangers), outputs.scores, parts.strangers[0])
    done, again = _out_of_date(manifest, outputs, parts.own, options)
    if again.changed:
        log.warning("score: %d images changed since they were scored (e.g. %s); scoring them again: their rows, masks "
                    "and maps are replaced", len(again.changed), again.changed[0])
    if again.restored:
        log.warning("score: %d scored images have lost their mask (e.g. %s); scoring them again", len(again.restored),
                    outputs.mask(again.restored[0]))
    if again.changed or again.restored:
        outputs.drop_rows(parts.own, {*again.changed, *again.restored}, run, options)
    fingerprints = manifest.fingerprint_of()
    todo = [{"id": i, "uri": u, "fingerprint": fingerprints[i]} for i, u in zip(manifest.ids, manifest.uris) if i not in done]
    images = len(manifest) + len(manifest.rejected)
    actors = (actors or ModelStage.on_cluster(settings)).for_run(math.ceil(len(todo) / settings.batch_size), len(todo))
    log.info("score: %d images, %d already done, %d to score on %d model workers -> %s",
             len(manifest), len(manifest) - len(todo), len(todo), actors.workers, outputs.root)
    workers, retryable = Workers(), []
    if todo:
        dataset = score_dataset(todo, version.uri, settings, outputs, thresholds, card.preprocessing, actors, stage, run)
        with Progress("score", len(todo)) as progress:
            for batch in stream(dataset, progress):
                workers.add(batch)
                retryable += [{"id": str(i), "error": str(e)} for i, s, e in zip(batch["id"], batch["status"], batch["error"]) if s == RETRYABLE]
    seconds = time.perf_counter() - started
    summary = _summarise(model_uri, version.number, images, len(manifest) - len(todo), retryable, thresholds, outputs, settings,
                         seconds, card.preprocessing, run, again)
    summary.workers, summary.model_workers, summary.started = workers.by_worker, actors.workers, began
    storage.write_text(outputs.run_json, json.dumps(asdict(summary), indent=2), options)
    return summary


@dataclass(frozen=True)
class OutOfDate:
    """Images with a row that are scored again: their file changed since (changed), or their mask is gone (restored)."""

    changed: list[str]
    restored: list[str]


def _out_of_date(manifest: Manifest, outputs: Outputs, parts: list[str], options: storage.StorageOptions) -> tuple[set[str], OutOfDate]:
    """The ids whose row is up to date (done), and those whose row is not (OutOfDate), from the run's parts.

    A row without a fingerprint (written before they were kept), or an image whose listing gives none,
    counts as unchanged. Masks are checked against one listing of masks/, not a request per image.
    """
    now = manifest.fingerprint_of()
    masks = set(listing.list_files(outputs.masks, None, options))
    rows, changed, restored = set(), set(), set()
    for _, columns in read_columns(parts, ["id", "error", "fingerprint"], options, schema=SCHEMA):
        for image_id, error, fingerprint in zip(columns["id"], columns["error"], columns["fingerprint"]):
            rows.add(image_id)
            if fingerprint and now.get(image_id) and fingerprint != now[image_id]:
                changed.add(image_id)
            elif error is None and outputs.mask(image_id) not in masks:
                restored.add(image_id)
    return rows - changed - restored, OutOfDate(sorted(changed), sorted(restored - changed))


def _record_rejected(rejected: tuple[tuple[str, str], ...], outputs: Outputs, options: storage.StorageOptions, run: str) -> None:
    """An error row for each listed object whose name cannot be an output path (its id is its URI)."""
    if rejected:
        rows = [ScoreRow(id=uri, uri=uri, error=f"name rejected: {reason}") for uri, reason in rejected]
        write_scores(storage.join(outputs.scores, part_name([row.id for row in rows], run)), rows, options)


def _summarise(
    model_uri: str, model_version: int, images: int, resumed: int, retryable: list[dict[str, str]], thresholds: Thresholds,
    outputs: Outputs, settings: Settings, seconds: float, spec: Preprocessing, run: str, again: OutOfDate,
) -> ScoreSummary:
    """Counts over the run's own part files (this run's and resumed ones), read a few columns at a time;
    an id is counted once, whatever holds it twice."""
    options = settings.fsspec_options()
    scored = anomalous = 0
    failures: list[dict[str, str]] = []
    failed = 0
    sizes: list[tuple[int, int]] = []  # kept for paper preprocessing only, to measure its crop
    seen: set[str] = set()
    parts = outputs.parts(options, run)
    columns_read = ["id", "error", "is_anomalous", "height", "width"]
    for _, columns in read_columns(parts.own, columns_read, options):
        for image_id, error, flag, height, width in zip(*(columns[name] for name in columns_read)):
            if image_id in seen:
                continue
            seen.add(image_id)
            if error is None:
                scored += 1
                anomalous += bool(flag)
                if spec.mode != "full":
                    sizes.append((height, width))
            else:
                failed += 1
                if len(failures) < MAX_LISTED:
                    failures.append({"id": image_id, "error": error})
    return ScoreSummary(
        out_uri=outputs.root,
        model_uri=model_uri,
        model_version=model_version,
        images=images,
        scored=scored,
        failed=failed,
        retryable=len(retryable),
        anomalous=None if thresholds.image is None else anomalous,
        resumed=resumed,
        changed=len(again.changed),
        restored=len(again.restored),
        mask_kind=("binary" if thresholds.pixel is not None else "scaled_map_per_image (no pixel threshold known)")
        + ("" if settings.preprocess == "full" else f", at the working size ({settings.preprocess} preprocessing)"),
        thresholds=asdict(thresholds),
        seconds=seconds,
        images_per_second=(images - resumed) / max(seconds, 1e-9),
        failures=sorted(failures, key=lambda f: f["id"]),
        retryable_failures=retryable[:MAX_LISTED],
        strangers=parts.strangers[:MAX_LISTED],
        workers={},
        model_workers=0,
        versions={"spade_batch": __version__, "torch": torch.__version__, "ray": ray.__version__},
        settings=settings.to_dict(redact=True),
        paper_crop=crop_summary(sizes, spec),
    )
