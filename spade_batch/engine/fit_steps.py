"""The steps fit and add both run on Ray: the extraction stream (decode tasks, backbone actors, feature part files), the
calibration images searched on model actors or in the driver, and the model built in a local folder and published
(arrays, then the card). engine.fit and engine.add call them; neither reaches into the other.
"""

from __future__ import annotations

import logging
import math
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass

import ray.data

from spade_batch.config import Settings
from spade_batch.engine.cpu_stages import RETRYABLE, read_images, write_feature_part
from spade_batch.engine.runtime import CPU_TASK, ModelStage, Progress, stream, task_stage
from spade_batch.engine.stages import CalibrationStage, ExtractStage, matches_of
from spade_batch.formats import storage
from spade_batch.formats.calibration_matches import PixelMatches
from spade_batch.formats.feature_index import StoredFeatures
from spade_batch.formats.layout import done_ids
from spade_batch.formats.model import SpadeModel
from spade_batch.formats.node_cache import cache_root
from spade_batch.method.calibration_search import CalibrationMatches, HeldOutScorer, InProcessHeldOut
from spade_batch.method.extractor import Extractor
from spade_batch.method.recipe import FitResult

log = logging.getLogger(__name__)


class RetryableInputError(RuntimeError):
    """Some inputs could not be read for a transient reason; a plain re-run retries exactly those."""


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
    actors = ModelStage.on_cluster(settings).for_run(math.ceil(len(todo) / settings.batch_size), len(todo))
    log.info("extract: %d images, %d already extracted, %d to extract on %d model workers", len(ids), len(done), len(todo), actors.workers)
    if not todo:
        return 0
    dataset = (
        ray.data.from_items(todo, override_num_blocks=max(1, min(len(todo) // settings.batch_size, 10_000)))
        .map_batches(task_stage(read_images), fn_kwargs={"preprocessing": extractor.preprocessing, "options": options,
                                                    "max_pixels": settings.max_pixels, "hash_content": True},
                     batch_size=settings.shard_size, batch_format="numpy", **CPU_TASK)
        .map_batches(**actors.map_arguments(ExtractStage, {"settings": settings}), batch_size=settings.batch_size, batch_format="numpy")
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
        actors = self.actors.for_run(len(items), len(ids))  # a batch per part
        batches = ray.data.from_items(items).map_batches(
            **actors.map_arguments(CalibrationStage, {"model_uri": self.model_uri, "settings": self.settings,
                                                      "card": model.card.to_dict(), "previous": dict(previous)}),
            batch_size=1, batch_format="numpy",
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
