"""Where everything is written, and the resume contract: the one module that spells file and folder names.

`Outputs` is a scoring run's OUT_URI, `ModelLayout` a model's MODEL_URI, `EvaluationOutputs` evaluate's
OUT and `PlanOutputs` a nightly plan's PLAN_OUT; every reader and writer takes its paths from them.

Part files (scores or features) are written by whole batches, last and atomically, after
everything their rows point to; a part's name is the hash of its ids, so a retried batch
replaces its own part. An id is done when some part holds its row; a re-run computes only the
ids that are not done, so it never loses or duplicates a row.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from spade_batch.formats import storage
from spade_batch.formats.manifest import output_stem

LOCK_NAME = ".spade-batch.lock"
"""The lock file's name inside an output location (a run's OUT_URI, a model's MODEL_URI)."""
INPUTS_NAME = "inputs.json"
"""What a resumable output (a run, a model's features) was computed from; see record_inputs."""
REPORT_NAME = "report.html"


def part_name(ids: Sequence[str]) -> str:
    """part-<16 hex>.parquet, from the batch's ids: deterministic, so a retried batch overwrites its own part."""
    return f"part-{hashlib.sha256(chr(0).join(ids).encode()).hexdigest()[:16]}.parquet"


def part_files(folder: str, options: storage.StorageOptions) -> list[str]:
    """The part files under folder, sorted (none when folder does not exist)."""
    if not storage.exists(folder, options):
        return []
    return storage.list_files(folder, (".parquet",), options)


def read_columns(parts: Iterable[str], columns: list[str], options: storage.StorageOptions) -> Iterable[tuple[str, dict[str, list]]]:
    """(part uri, {column: values}) for each part, reading only those columns."""
    for uri in parts:
        table = storage.read_part(uri, options, columns=columns)
        yield uri, {name: table.column(name).to_pylist() for name in columns}


def done_ids(folder: str, options: storage.StorageOptions) -> set[str]:
    """Ids that already have a row in a part file under folder."""
    return {i for _, columns in read_columns(part_files(folder, options), ["id"], options) for i in columns["id"]}


@dataclass(frozen=True)
class Outputs:
    """Where a scoring run writes, under OUT_URI."""

    root: str

    MASKS, MAPS, OVERLAYS, SCORES = "masks", "maps", "overlays", "scores"
    RUN_NAME = "run.json"

    def mask(self, image_id: str) -> str:
        return storage.join(self.masks, output_stem(image_id) + ".png")

    def map(self, image_id: str) -> str:
        return storage.join(self.root, self.MAPS, output_stem(image_id) + ".npy")

    def overlay(self, image_id: str) -> str:
        return storage.join(self.root, self.OVERLAYS, output_stem(image_id) + ".png")

    @property
    def masks(self) -> str:
        return storage.join(self.root, self.MASKS)

    @property
    def scores(self) -> str:
        return storage.join(self.root, self.SCORES)

    @property
    def run_json(self) -> str:
        """The run's summary, written last: its presence marks the run finished."""
        return storage.join(self.root, self.RUN_NAME)

    @property
    def inputs_json(self) -> str:
        return storage.join(self.root, INPUTS_NAME)

    @property
    def report(self) -> str:
        return storage.join(self.root, REPORT_NAME)

    @property
    def lock(self) -> str:
        return storage.join(self.root, LOCK_NAME)

    def clear(self, options: storage.StorageOptions) -> None:
        """Remove a previous run's outputs, masks and report too: none may stay behind beside a new run's.

        The lock is left alone: the run that clears holds it.
        """
        for folder in (self.SCORES, self.MASKS, self.MAPS, self.OVERLAYS):
            storage.remove(storage.join(self.root, folder), options, recursive=True)
        for uri in (self.inputs_json, self.run_json, self.report):
            storage.remove(uri, options)


@dataclass(frozen=True)
class ModelLayout:
    """Where a model's files are, under MODEL_URI (or the local folder that holds a copy of its arrays).

    The class attributes are the names relative to the root (the artifact's files are copied by them).
    """

    root: str

    CARD = "spade.json"
    TRAIN_IDS, INDEX, CENTRE, PYRAMID = "train_ids.json", "global.faiss", "centre.npz", "pyramid"
    FEATURES = "features"

    @classmethod
    def layer_name(cls, layer: str) -> str:
        """pyramid/<layer>.npy: a layer's pixel gallery, relative to the root."""
        return f"{cls.PYRAMID}/{layer}.npy"

    @classmethod
    def array_names(cls, layers: Iterable[str], centre: bool = True) -> list[str]:
        """The files besides the card, relative to the root (schema 1 models have no centre)."""
        return [cls.TRAIN_IDS, cls.INDEX, *([cls.CENTRE] if centre else []), *(cls.layer_name(layer) for layer in layers)]

    def file(self, name: str) -> str:
        """A file given by its name relative to the root."""
        return storage.join(self.root, name)

    @property
    def card(self) -> str:
        """The card, written last: its presence marks the model complete."""
        return self.file(self.CARD)

    @property
    def pyramid(self) -> str:
        return self.file(self.PYRAMID)

    def layer(self, layer: str) -> str:
        return self.file(self.layer_name(layer))

    @property
    def index(self) -> str:
        return self.file(self.INDEX)

    @property
    def features(self) -> str:
        """fit's Parquet feature parts (features.py); a re-run resumes from them."""
        return self.file(self.FEATURES)

    @property
    def features_inputs(self) -> str:
        return storage.join(self.features, INPUTS_NAME)

    @property
    def lock(self) -> str:
        return self.file(LOCK_NAME)


@dataclass(frozen=True)
class EvaluationOutputs:
    """Where evaluate writes, under OUT: the test image list, a scoring run, metrics, figures and the page."""

    root: str

    ROC, PRO, HISTOGRAM, BEST, WORST = "roc.png", "pro.png", "score_histogram.png", "examples_best.png", "examples_worst.png"

    @property
    def test_images(self) -> str:
        return storage.join(self.root, "test_images.txt")

    @property
    def run(self) -> Outputs:
        """The scoring run of the test images."""
        return Outputs(storage.join(self.root, Outputs.SCORES))

    @property
    def metrics_json(self) -> str:
        return storage.join(self.root, "metrics.json")

    def figure(self, name: str) -> str:
        return storage.join(self.root, name)

    @property
    def report(self) -> str:
        return storage.join(self.root, REPORT_NAME)


@dataclass(frozen=True)
class PlanOutputs:
    """Where a nightly plan writes its own files, under PLAN_OUT (each line's run writes under its own out)."""

    root: str

    @property
    def report(self) -> str:
        return storage.join(self.root, REPORT_NAME)

    @property
    def plan_json(self) -> str:
        return storage.join(self.root, "plan.json")


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
