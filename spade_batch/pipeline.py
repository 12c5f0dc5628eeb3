"""Ray orchestration of fit and score: manifest, shards, tasks, resume, progress.

A shard is the unit of work, retry and output. Fit writes one feature part file per shard; score
writes each shard's masks and then, last and atomically, its scores part file. A rerun skips the
shards whose part file exists, so a killed job resumes without duplicates. The fitted model is
`ray.put` once and every task reads it from the object store (zero-copy on the same node).
"""

from __future__ import annotations

import itertools
import json
import logging
import os
import posixpath
import resource
import sys
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import ray
import torch
from tqdm import tqdm

from spade_batch import __version__, calibrate, storage
from spade_batch.config import Settings
from spade_batch.detector import Extractor, ImageScore, Scorer
from spade_batch.features import read_features, write_features
from spade_batch.images import ImageError, Preprocessing, decode_image, resize_map
from spade_batch.manifest import Manifest, build_manifest
from spade_batch.model import CARD_NAME, ModelCard, SpadeModel, build_model, load_card
from spade_batch.report import overlay, png_bytes
from spade_batch.scores import ScoreRow, read_scores, write_scores

log = logging.getLogger(__name__)


def init_ray(address: str | None = None) -> None:
    """Join the cluster at `address` (or RAY_ADDRESS), else start a local Ray sized to this machine."""
    if ray.is_initialized():
        return
    address = address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, log_to_driver=True)
    else:
        ray.init(include_dashboard=False, log_to_driver=True)


def task_options(settings: Settings) -> dict[str, Any]:
    """Resources per shard task: gpus_per_task, or one GPU each when the cluster has GPUs now."""
    options: dict[str, Any] = {"num_cpus": settings.cpus_per_task, "max_retries": 2, "retry_exceptions": [OSError]}
    gpus = settings.gpus_per_task
    if gpus is None:
        gpus = 1.0 if ray.cluster_resources().get("GPU", 0) > 0 and settings.device != "cpu" else 0.0
    if gpus > 0:
        options["num_gpus"] = gpus
    return options


def part_name(index: int) -> str:
    return f"part-{index:05d}.parquet"


def load_images(manifest: Manifest, options: storage.StorageOptions) -> Iterator[tuple[str, str, np.ndarray | None, str | None]]:
    """(id, uri, H x W x 3 uint8 image or None, error or None) per manifest entry; bad input never raises."""
    for image_id, uri in zip(manifest.ids, manifest.uris):
        try:
            yield image_id, uri, decode_image(storage.read_bytes(uri, options), uri), None
        except (ImageError, OSError) as error:
            yield image_id, uri, None, f"{type(error).__name__}: {error}"


def batched(items: Iterable[Any], size: int) -> Iterator[list[Any]]:
    """Consecutive lists of `size` items (the last may be shorter), consuming lazily."""
    iterator = iter(items)
    while batch := list(itertools.islice(iterator, size)):
        yield batch


def run_tasks(remote_function: Any, calls: Sequence[tuple[tuple[Any, ...], int]], settings: Settings, description: str) -> list[Any]:
    """Run remote_function(*args) for each (args, image count), showing progress in images; results in call order.

    A terminal gets a progress bar; logs (e.g. `ray job logs`) get a line at most every 30 s.
    """
    task = remote_function.options(**task_options(settings))
    pending = {task.remote(*args): (position, count) for position, (args, count) in enumerate(calls)}
    results: list[Any] = [None] * len(calls)
    progress = Progress(description, sum(count for _, count in calls), len(calls))
    with progress:
        while pending:
            done, _ = ray.wait(list(pending), num_returns=1)
            position, count = pending.pop(done[0])
            results[position] = ray.get(done[0])
            progress.advance(count)
    return results


class Progress:
    """Images and shards done: a tqdm bar on a terminal, periodic log lines otherwise."""

    def __init__(self, description: str, images: int, shards: int, log_every_s: float = 30.0):
        self.description, self.images, self.shards = description, images, shards
        self.done_images = self.done_shards = 0
        self.started = self.logged = time.monotonic()
        self.log_every_s = log_every_s
        self.bar = tqdm(total=images, desc=description, unit="img") if sys.stderr.isatty() else None

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc: object) -> None:
        if self.bar is not None:
            self.bar.close()

    def advance(self, images: int) -> None:
        self.done_images += images
        self.done_shards += 1
        if self.bar is not None:
            self.bar.set_postfix_str(f"shards {self.done_shards}/{self.shards}", refresh=False)
            self.bar.update(images)
        elif time.monotonic() - self.logged >= self.log_every_s or self.done_shards == self.shards:
            self.logged = time.monotonic()
            rate = self.done_images / max(self.logged - self.started, 1e-9)
            log.info(
                "%s: %d/%d shards, %d/%d images, %.2f images/s",
                self.description, self.done_shards, self.shards, self.done_images, self.images, rate,
            )


# ---------------------------------------------------------------- fit


@ray.remote
def _extract_shard(shard: Manifest, settings: Settings, part_uri: str) -> None:
    options = settings.fsspec_options()
    extractor = Extractor(settings, options)
    loaded = list(load_images(shard, options))
    table = extractor.feature_table(
        [image for _, _, image, _ in loaded], shard.ids, shard.uris, [error for *_, error in loaded]
    )
    write_features(part_uri, table, options)


@ray.remote
def _calibration_shard(shard: Manifest, model: SpadeModel, settings: Settings) -> tuple[list[float], list[np.ndarray]]:
    options = settings.fsspec_options()
    extractor = Extractor(settings, options, preprocessing=Preprocessing.from_dict(model.card.preprocessing))
    scorer = Scorer(model, extractor, settings.chunk_mib * 2**20)
    images = (image for _, _, image, _ in load_images(shard, options) if image is not None)
    results = [result for batch in batched(images, settings.batch_size) for result in scorer.score(batch)]
    return [r.score for r in results], [calibrate.pixel_sample(r.anomaly_map) for r in results]


@dataclass
class FitSummary:
    model_uri: str
    train_images: int
    gallery_images: int
    calibration_images: int
    failed_images: int
    thresholds: dict[str, float | None]
    seconds: dict[str, float] = field(default_factory=dict)


def run_fit(train_source: str, model_uri: str, settings: Settings) -> FitSummary:
    """Extract features of the normal images on Ray, build the model, calibrate it, save it."""
    options = settings.fsspec_options()
    started = time.perf_counter()
    if storage.exists(storage.join(model_uri, CARD_NAME), options) and not settings.overwrite:
        raise FileExistsError(f"a model already exists at {model_uri}; pass --overwrite to refit it")
    manifest = build_manifest(train_source, options)
    init_ray(settings.ray_address)
    extractor = Extractor(settings, options, torch.device("cpu"))  # weights identity and layer shapes
    features_uri = storage.join(model_uri, "features")
    if settings.overwrite:
        storage.remove(features_uri, options, recursive=True)
    # Part files of a killed fit are reused only for the same images, shards and feature extractor.
    extraction = {
        "images": manifest.sha256(), "shard_size": settings.shard_size, "backbone": settings.backbone,
        "weights": extractor.weights_sha256, "preprocessing": extractor.preprocessing.to_dict(),
    }
    record_inputs(features_uri, storage.join(features_uri, "inputs.json"), extraction, options)
    shards = manifest.shards(settings.shard_size)
    parts = [storage.join(features_uri, part_name(index)) for index in range(len(shards))]
    calls = [((shard, settings, part), len(shard)) for shard, part in zip(shards, parts) if not storage.exists(part, options)]
    log.info("fit: %d images, %d shards, %d to extract -> %s", len(manifest), len(shards), len(calls), model_uri)
    run_tasks(_extract_shard, calls, settings, "extract")
    extracted = time.perf_counter()

    features = read_features(parts, options)
    held_out = np.array([calibrate.is_held_out(i, settings.calibration_fraction, settings.seed) for i in features.ids])
    model = build_model(
        features.select(~held_out), settings, extractor.preprocessing.to_dict(), extractor.weights_sha256, manifest.sha256()
    )
    calibration = features.select(held_out).valid()
    if len(calibration):
        model = _calibrate(model, Manifest(manifest.root, tuple(calibration.ids), tuple(calibration.uris)), settings)
    else:
        log.warning("fit: no images held out for calibration; thresholds stay unset (set calibration_fraction > 0)")
    model.save(model_uri, options)
    return FitSummary(
        model_uri=model_uri,
        train_images=len(manifest),
        gallery_images=model.card.train_count,
        calibration_images=len(calibration),
        failed_images=sum(error is not None for error in features.errors),
        thresholds=model.card.thresholds,
        seconds={"extract": extracted - started, "total": time.perf_counter() - started},
    )


def _calibrate(model: SpadeModel, calibration: Manifest, settings: Settings) -> SpadeModel:
    model_ref = ray.put(model)
    calls = [((shard, model_ref, settings), len(shard)) for shard in calibration.shards(settings.shard_size)]
    results = run_tasks(_calibration_shard, calls, settings, "calibrate")
    scores = np.array([score for shard_scores, _ in results for score in shard_scores])
    samples = [sample for _, shard_samples in results for sample in shard_samples]
    return calibrate.calibrate_from_samples(model, scores, samples, settings)


# ---------------------------------------------------------------- score


@dataclass(frozen=True)
class Outputs:
    """Where a scoring run writes, under OUT_URI."""

    root: str

    def mask(self, image_id: str) -> str:
        return storage.join(self.root, "masks", posixpath.splitext(image_id)[0] + ".png")

    def map(self, image_id: str) -> str:
        return storage.join(self.root, "maps", posixpath.splitext(image_id)[0] + ".npy")

    def overlay(self, image_id: str) -> str:
        return storage.join(self.root, "overlays", posixpath.splitext(image_id)[0] + ".png")

    def scores_part(self, index: int) -> str:
        return storage.join(self.root, "scores", part_name(index))

    @property
    def run_json(self) -> str:
        return storage.join(self.root, "run.json")

    @property
    def inputs_json(self) -> str:
        return storage.join(self.root, "inputs.json")


@dataclass(frozen=True)
class Thresholds:
    image: float | None
    pixel: float | None

    @classmethod
    def of(cls, card: ModelCard, settings: Settings) -> Thresholds:
        """The settings' overrides, else the model's calibrated thresholds."""
        image = settings.image_threshold if settings.image_threshold is not None else card.thresholds["image"]
        pixel = settings.pixel_threshold if settings.pixel_threshold is not None else card.thresholds["pixel"]
        return cls(image, pixel)


def _mask(anomaly_map: np.ndarray, threshold: float | None) -> np.ndarray:
    """H x W map -> H x W uint8: 0/255 at the threshold, or the map scaled to 0-255 per image without one."""
    if threshold is not None:
        return np.where(anomaly_map > threshold, 255, 0).astype(np.uint8)
    low, high = float(anomaly_map.min()), float(anomaly_map.max())
    return np.round(255 * (anomaly_map - low) / max(high - low, 1e-12)).astype(np.uint8)


def _write_outputs(
    image_id: str, image: np.ndarray, result: ImageScore, thresholds: Thresholds, outputs: Outputs, settings: Settings
) -> tuple[str, float | None]:
    """Mask (and maps/overlays on request) for one image; returns (mask uri, anomalous pixel fraction)."""
    options = settings.fsspec_options()
    height, width = image.shape[:2] if settings.preprocess == "full" else result.anomaly_map.shape
    full_map = resize_map(result.anomaly_map, height, width)
    mask = _mask(full_map, thresholds.pixel)
    storage.write_bytes(outputs.mask(image_id), png_bytes(mask), options)
    if settings.save_maps:
        storage.write_npy(outputs.map(image_id), result.anomaly_map.astype(np.float16), options)
    if settings.save_overlays and settings.preprocess == "full":
        high = thresholds.pixel * 2 if thresholds.pixel is not None else float(full_map.max())
        storage.write_bytes(outputs.overlay(image_id), png_bytes(overlay(image, full_map, 0.0, high)), options)
    fraction = float((mask > 0).mean()) if thresholds.pixel is not None else None
    return outputs.mask(image_id), fraction


@ray.remote
def _score_shard(shard: Manifest, part_uri: str, model: SpadeModel, settings: Settings, outputs: Outputs) -> float:
    """Score one shard; returns the worker process's peak resident memory so far, in MiB."""
    options = settings.fsspec_options()
    extractor = Extractor(settings, options, preprocessing=Preprocessing.from_dict(model.card.preprocessing))
    scorer = Scorer(model, extractor, settings.chunk_mib * 2**20)
    thresholds = Thresholds.of(model.card, settings)
    rows = []
    for batch in batched(load_images(shard, options), settings.batch_size):
        good = [(image_id, uri, image) for image_id, uri, image, _ in batch if image is not None]
        results = dict(zip((g[0] for g in good), scorer.score([image for *_, image in good])))
        for image_id, uri, image, error in batch:
            if image is None:
                rows.append(ScoreRow(id=image_id, uri=uri, error=error))
                continue
            result = results[image_id]
            mask_uri, fraction = _write_outputs(image_id, image, result, thresholds, outputs, settings)
            rows.append(
                ScoreRow(
                    id=image_id,
                    uri=uri,
                    image_score=result.score,
                    is_anomalous=None if thresholds.image is None else result.score > thresholds.image,
                    max_pixel_score=float(result.anomaly_map.max()),
                    anomalous_fraction=fraction,
                    mask_uri=mask_uri,
                    neighbour_ids=[model.train_ids[n] for n in result.neighbours],
                    height=image.shape[0],
                    width=image.shape[1],
                )
            )
    write_scores(part_uri, rows, options)  # last: its presence marks the shard complete
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


@dataclass
class ScoreSummary:
    out_uri: str
    model_uri: str
    images: int
    scored: int
    failed: int
    anomalous: int | None
    shards: int
    shards_resumed: int
    mask_kind: str
    thresholds: dict[str, float | None]
    seconds: float
    failures: list[dict[str, str]]
    versions: dict[str, str]
    settings: dict[str, Any]
    worker_peak_rss_mib: float | None = None


def check_inputs(outputs: Outputs, inputs: dict[str, Any], settings: Settings) -> None:
    """Refuse to resume into an output folder written for other images, model or settings."""
    options = settings.fsspec_options()
    if settings.overwrite:
        # Outputs of the replaced run, masks too: none may stay behind beside the new run's.
        for folder in ("scores", "masks", "maps", "overlays"):
            storage.remove(storage.join(outputs.root, folder), options, recursive=True)
        storage.remove(outputs.inputs_json, options)
    record_inputs(outputs.root, outputs.inputs_json, inputs, options)


def check_output_paths(manifest: Manifest) -> None:
    """Refuse images whose outputs would share a path: masks/<id without extension>.png."""
    first: dict[str, str] = {}
    for image_id in manifest.ids:
        stem = posixpath.splitext(image_id)[0]
        if stem in first:
            raise ValueError(
                f"{first[stem]} and {image_id} under {manifest.root} would write the same mask masks/{stem}.png; "
                "rename one of them or score them in separate runs"
            )
        first[stem] = image_id


def record_inputs(root: str, inputs_uri: str, inputs: dict[str, Any], options: storage.StorageOptions) -> None:
    """Write inputs to inputs_uri; if an earlier run under root recorded other inputs there, refuse to resume it."""
    if storage.exists(inputs_uri, options):
        previous = json.loads(storage.read_text(inputs_uri, options))
        if previous != inputs:
            changed = sorted(key for key in inputs if previous.get(key) != inputs[key])
            raise FileExistsError(
                f"{root} holds a run with other {', '.join(changed)}; "
                "pass --overwrite to replace it or choose another output URI"
            )
    storage.write_text(inputs_uri, json.dumps(inputs, indent=2), options)


def run_score(model_uri: str, images_source: str, out_uri: str, settings: Settings, explicit: frozenset[str] = frozenset()) -> ScoreSummary:
    """Score an image set on Ray against the model at model_uri; writes masks, scores and run.json under out_uri."""
    options = settings.fsspec_options()
    started = time.perf_counter()
    card = load_card(model_uri, options)  # the gallery is loaded only once the request is known to be valid
    card.check_compatible(settings, explicit)
    settings = settings.replace(**card.settings)
    if settings.preprocess != "full":
        log.warning("score: '%s' preprocessing leaves the image border unscored; masks are written at the working size", settings.preprocess)
    manifest = build_manifest(images_source, options)
    check_output_paths(manifest)
    outputs = Outputs(out_uri)
    thresholds = Thresholds.of(card, settings)
    check_inputs(
        outputs,
        {"images": manifest.sha256(), "model": card.created, "thresholds": asdict(thresholds),
         "shard_size": settings.shard_size, "save_maps": settings.save_maps, "save_overlays": settings.save_overlays},
        settings,
    )
    init_ray(settings.ray_address)
    shards = manifest.shards(settings.shard_size)
    model_ref = ray.put(SpadeModel.load(model_uri, options))
    calls = [
        ((shard, outputs.scores_part(index), model_ref, settings, outputs), len(shard))
        for index, shard in enumerate(shards)
        if not storage.exists(outputs.scores_part(index), options)
    ]
    log.info("score: %d images, %d shards, %d to score -> %s", len(manifest), len(shards), len(calls), out_uri)
    peak_rss_mib = run_tasks(_score_shard, calls, settings, "score")
    summary = _summarise(model_uri, manifest, len(shards), len(shards) - len(calls), thresholds, outputs, settings, started)
    summary.worker_peak_rss_mib = max(peak_rss_mib, default=None)
    storage.write_text(outputs.run_json, json.dumps(asdict(summary), indent=2), options)
    return summary


def _summarise(
    model_uri: str, manifest: Manifest, shards: int, resumed: int, thresholds: Thresholds,
    outputs: Outputs, settings: Settings, started: float,
) -> ScoreSummary:
    table = read_scores([outputs.scores_part(index) for index in range(shards)], settings.fsspec_options())
    errors = table.column("error").to_pylist()
    flags = table.column("is_anomalous").to_pylist()
    failures = [{"id": i, "error": e} for i, e in zip(table.column("id").to_pylist(), errors) if e is not None]
    return ScoreSummary(
        out_uri=outputs.root,
        model_uri=model_uri,
        images=len(manifest),
        scored=len(errors) - len(failures),
        failed=len(failures),
        anomalous=None if thresholds.image is None else sum(bool(flag) for flag in flags),
        shards=shards,
        shards_resumed=resumed,
        mask_kind=("binary" if thresholds.pixel is not None else "scaled_map_per_image (no pixel threshold known)")
        + ("" if settings.preprocess == "full" else f", at the working size ({settings.preprocess} preprocessing)"),
        thresholds=asdict(thresholds),
        seconds=time.perf_counter() - started,
        failures=failures[:1000],
        versions={"spade_batch": __version__, "torch": torch.__version__, "ray": ray.__version__},
        settings=settings.to_dict(redact=True),
    )
