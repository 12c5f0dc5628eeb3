"""Output layout and the resume contract: where each run writes, which ids are done, inputs.json.

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

    def mask(self, image_id: str) -> str:
        return storage.join(self.root, "masks", output_stem(image_id) + ".png")

    def map(self, image_id: str) -> str:
        return storage.join(self.root, "maps", output_stem(image_id) + ".npy")

    def overlay(self, image_id: str) -> str:
        return storage.join(self.root, "overlays", output_stem(image_id) + ".png")

    @property
    def scores(self) -> str:
        return storage.join(self.root, "scores")

    @property
    def run_json(self) -> str:
        return storage.join(self.root, "run.json")

    @property
    def inputs_json(self) -> str:
        return storage.join(self.root, "inputs.json")

    def clear(self, options: storage.StorageOptions) -> None:
        """Remove a previous run's outputs, masks too: none may stay behind beside a new run's."""
        for folder in ("scores", "masks", "maps", "overlays"):
            storage.remove(storage.join(self.root, folder), options, recursive=True)
        storage.remove(self.inputs_json, options)
        storage.remove(self.run_json, options)


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


FEATURES_FOLDER = "features"
"""Under a model folder: the feature part files fit extracted (formats.features)."""
