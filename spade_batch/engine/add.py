"""add on Ray: normal images join a model as its next version, by the one fit recipe (method.addition.Addition).

Of the images listed, those whose ids the current version holds are only read, to compare their
content hash with the one recorded at extraction (the same: skipped; other: an error naming the id);
the others stream through fit's extraction (engine.fit_steps.extract) into versions/<N>/features/. Then the
recipe runs over the stored features of every training image, old and new (no re-extraction), and
version N is published: arrays, then its card, last. A killed add resumes from its parts, like fit.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from dataclasses import dataclass
from typing import Any

import ray.data

from spade_batch.config import Settings
from spade_batch.engine.cpu_stages import read_hashes
from spade_batch.engine.fit_steps import build_and_publish, extract, held_out_scorer, raise_retryable
from spade_batch.engine.runtime import CPU_TASK, Progress, init_ray, stream, task_stage
from spade_batch.formats import storage
from spade_batch.formats.card import ModelCard
from spade_batch.formats.features import SCHEMA_VERSION as FEATURE_SCHEMA_VERSION
from spade_batch.formats.layout import ModelLayout, record_inputs
from spade_batch.formats.manifest import Manifest, pairs_sha256
from spade_batch.formats.versions import NextVersion, adding_version
from spade_batch.method.addition import Addition
from spade_batch.method.extractor import Extractor

log = logging.getLogger(__name__)


@dataclass
class AddSummary:
    """What an add did: what the version published (or the current one, when nothing is published) holds.

    Attributes:
        version: the version published (the current one when nothing was published).
        parent: the version the images were added to.
        images: listed; skipped: held by the parent already (failed ones not tried again included); read: new to it and
            read; added: of those, the images the version's gallery or calibration uses; extracted: by this run (a resumed
            run extracts only what its killed run did not).
        left_out: {"id", "reason"} of the images new to it, or used by the parent, that the version does not use (a size far
            from the rest's, or the content of another image); nothing is published when the gallery and calibration would
            not change.
        failures: {"id", "error"} of the listed images that could not be read (or were rejected by name), those the
            parent recorded as failed included; failed_before: how many of them it recorded.
        gallery_images, calibration_images, thresholds, warnings, near_duplicates (formats.card.NearDuplicates; {}: not
            recorded): of that version.
    """

    model_uri: str
    version: int
    parent: int
    images: int
    skipped: int
    added: int
    extracted: int
    gallery_images: int
    calibration_images: int
    thresholds: dict[str, float | None]
    warnings: list[str]
    seconds: float
    failures: list[dict[str, str]] = dataclasses.field(default_factory=list)
    suspects: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    """{"id", "score"} of the version's calibration images scoring far above the rest (card calibration.suspects)."""
    suspects_left_out: bool = False
    left_out: list[dict[str, str]] = dataclasses.field(default_factory=list)
    failed_before: int = 0
    near_duplicates: dict[str, Any] = dataclasses.field(default_factory=dict)
    read: int = 0

    @property
    def published(self) -> bool:
        return self.version != self.parent


def run_add(manifest: Manifest, model_uri: str, settings: Settings, explicit: frozenset[str] = frozenset()) -> AddSummary:
    """Add the manifest's normal images to the model at model_uri, holding its lock (one add or fit at a time).

    The model's method and calibration settings are used (ModelCard.training_settings); settings give the run's.
    """
    options = settings.fsspec_options()
    started = time.perf_counter()
    with adding_version(model_uri, f"spade-batch add to {model_uri}", options) as version:
        return _add_locked(manifest, version, settings, explicit, started)


def _add_locked(manifest: Manifest, version: NextVersion, settings: Settings, explicit: frozenset[str], started: float) -> AddSummary:
    """run_add's work, once it holds the model's lock."""
    options = settings.fsspec_options()
    addition = Addition.onto(version, options)
    settings = addition.card.training_settings(settings, explicit)
    init_ray(settings.ray_address)
    listed = dict(zip(manifest.ids, manifest.uris))
    known = {i: u for i, u in listed.items() if i in addition.trained.sources}  # held, or recorded as failed
    hashes = _content_hashes(known, settings)
    failed_before = addition.failed_before(listed, hashes)
    new = addition.new_ids({**{i: None for i in listed if i not in known}, **hashes}, failed_before)
    rejected = [{"id": uri, "error": reason} for uri, reason in manifest.rejected]
    outcome = _Outcome(addition, started, len(manifest), len(manifest) - len(new), failed_before, rejected)
    if not new:
        log.info("add: version %d of %s holds every image listed: nothing to add", addition.parent.number, addition.model_uri)
        return outcome.unchanged()

    extractor = Extractor(settings, options)  # as the extraction actors build theirs
    addition.check(extractor)
    target = addition.target
    uris = [listed[i] for i in new]
    # Part files of a killed add are reused only for the same images added to the same version; those of
    # other images are discarded: the version was never published, and this add holds the model's lock.
    inputs = {"parent": addition.parent.number, "images": pairs_sha256(new, uris), "weights": extractor.weights_sha256,
              "preprocessing": extractor.preprocessing.to_dict(), "feature_schema": FEATURE_SCHEMA_VERSION,
              **extractor.pixel_features}
    if settings.overwrite or _left_by_another_add(target, inputs, options):
        storage.remove(target.root, options, recursive=True)
    record_inputs(target.features, target.features_inputs, inputs, options)
    outcome.extracted = extract(new, uris, target.features, extractor, settings)

    features = addition.features()
    new_ids = set(new)
    outcome.failures += [entry for entry in features.failures if entry["id"] in new_ids]
    read = [i for i in new if i in features.sizes]
    outcome.read = len(read)
    selection = addition.select(features, settings)
    outcome.left_out = addition.left_out(selection, read, settings)
    if not addition.changes(selection, settings):
        storage.remove(target.root, options, recursive=True)
        if read:
            log.warning("add: the %d new images read leave the gallery and calibration of version %d as they are (left out: %d); "
                        "nothing published", len(read), addition.parent.number, len(outcome.left_out))
        else:
            log.error("add: none of the %d new images could be read; nothing published, version %d of %s stays current",
                      len(new), addition.parent.number, addition.model_uri)
        return outcome.unchanged()
    held_out = held_out_scorer(features, extractor, target.root, settings)
    fitted = build_and_publish(target.root, settings, lambda folder: addition.fit(
        features, extractor, settings, folder, (read, [listed[i] for i in read]), selection, rejected, held_out))
    log.info("add: published version %d of %s (%d images added to version %d)", addition.number, addition.model_uri, len(read), addition.parent.number)
    return outcome.published(fitted.model.card, [i for i in read if i in selection.used])


@dataclass
class _Outcome:
    """What an add has found so far, and its summary once it ends."""

    addition: Addition
    started: float
    listed: int
    skipped: int
    failed_before: list[dict[str, str]]
    rejected: list[dict[str, str]]
    extracted: int = 0
    read: int = 0
    left_out: list[dict[str, str]] = dataclasses.field(default_factory=list)
    failures: list[dict[str, str]] = dataclasses.field(default_factory=list)

    def unchanged(self) -> AddSummary:
        """Nothing published: the parent stays current."""
        return self._summary(self.addition.parent.number, self.addition.card, [])

    def published(self, card: ModelCard, added: list[str]) -> AddSummary:
        return self._summary(self.addition.number, card, added)

    def _summary(self, version: int, card: ModelCard, added: list[str]) -> AddSummary:
        return AddSummary(
            model_uri=self.addition.model_uri, version=version, parent=self.addition.parent.number, images=self.listed,
            skipped=self.skipped, added=len(added), extracted=self.extracted, gallery_images=card.train_count,
            calibration_images=card.calibration.count, thresholds=dataclasses.asdict(card.thresholds),
            warnings=list(card.calibration.warnings), seconds=time.perf_counter() - self.started,
            failures=[*self.rejected, *self.failures, *self.failed_before], left_out=self.left_out, failed_before=len(self.failed_before),
            near_duplicates=dataclasses.asdict(card.training.near_duplicates) if card.training else {}, read=self.read,
            suspects=list(card.calibration.suspects), suspects_left_out=card.calibration.suspects_left_out,
        )


def _left_by_another_add(target: ModelLayout, inputs: dict[str, object], options: storage.StorageOptions) -> bool:
    """Whether the unpublished version's folder holds the parts of an add of other images (or to another parent)."""
    if not storage.exists(target.features_inputs, options):
        return False
    if json.loads(storage.read_text(target.features_inputs, options)) == inputs:
        return False
    log.warning("add: discarding %s, left unpublished by an add of other images", target.root)
    return True


def _content_hashes(images: dict[str, str], settings: Settings) -> dict[str, str]:
    """id -> content_sha256 of these images (id -> uri), read by CPU tasks and never decoded.

    An image that cannot be read is left out (the model holds it already, or recorded it as failed), with a warning; raises
    RetryableInputError when some could not be read for a transient reason.
    """
    if not images:
        return {}
    items = [{"id": i, "uri": u} for i, u in images.items()]
    dataset = ray.data.from_items(items, override_num_blocks=max(1, min(len(items) // settings.shard_size, 10_000))).map_batches(
        task_stage(read_hashes), fn_kwargs={"options": settings.fsspec_options()}, batch_size=settings.shard_size,
        batch_format="numpy", **CPU_TASK)
    hashes, retryable, unreadable = {}, [], []
    with Progress("compare", len(items)) as progress:
        for batch in stream(dataset, progress):
            for image_id, sha256, error, transient in zip(batch["id"], batch["sha256"], batch["error"], batch["transient"]):
                if transient:
                    retryable.append(f"{image_id}: {error}")
                elif error:
                    unreadable.append(f"{image_id}: {error}")
                else:
                    hashes[str(image_id)] = str(sha256)
    raise_retryable(retryable)
    if unreadable:
        log.warning("add: %d images the model holds could not be read to compare them (first: %s); skipped", len(unreadable), unreadable[0])
    return hashes
