"""Where everything is written, and the resume contract: the one module that spells file and folder names.

`Outputs` is a scoring run's OUT_URI, `ModelLayout` a model's MODEL_URI, `EvaluationOutputs` evaluate's
OUT and `PlanOutputs` a nightly plan's PLAN_OUT; every reader and writer takes its paths from them.

Part files (scores or features) are written by whole batches, last and atomically, after
everything their rows point to; a part's name is the hash of its ids, so a retried batch
replaces its own part. An id is done when some part holds its row; a re-run computes only the
ids that are not done, so it never loses or duplicates a row.

A scoring run's parts are named after the run too (`part-<run>-<ids>.parquet`, run_token: a hash of
what inputs.json records), so the run reads only the parts it wrote: any other Parquet file in
scores/ (a stray copy, another run's part) is a stranger, reported and never read (Outputs.parts).

Outputs are never inputs: `find_output` finds the run, model or evaluation a listing of images holds or lies
inside, so that fit and add refuse to take a run's masks (or an evaluation's figures) for normal images.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from spade_batch.formats import listing, parquet_parts, storage
from spade_batch.formats.manifest import Manifest, is_manifest_file, output_stem

LOCK_NAME = ".spade-batch.lock"
"""The lock file's name inside an output location (a run's OUT_URI, a model's MODEL_URI)."""
INPUTS_NAME = "inputs.json"
"""What a resumable output (a run, a model's features) was computed from; see record_inputs."""
REPORT_NAME = "report.html"


def part_name(ids: Sequence[str], run: str | None = None) -> str:
    """part-<16 hex>.parquet, from the batch's ids: deterministic, so a retried batch overwrites its own part.

    run: a scoring run's run_token, named first (part-<run>-<16 hex>.parquet): the run's parts are those with it.
    """
    digest = hashlib.sha256(chr(0).join(ids).encode()).hexdigest()[:16]
    return f"part-{run}-{digest}.parquet" if run else f"part-{digest}.parquet"


def run_token(inputs: dict[str, Any]) -> str:
    """8 hex of the inputs a run records (record_inputs): the same for a run and its resumptions, not for another run."""
    return hashlib.sha256(json.dumps(inputs, sort_keys=True).encode()).hexdigest()[:8]


@dataclass(frozen=True)
class RunParts:
    """The Parquet files under a run's scores/: its own parts, and strangers (never read)."""

    own: list[str]
    strangers: list[str]


def part_files(folder: str, options: storage.StorageOptions) -> list[str]:
    """The part files under folder, sorted (none when folder does not exist)."""
    if not storage.exists(folder, options):
        return []
    return listing.list_files(folder, (".parquet",), options)


def read_columns(
    parts: Iterable[str], columns: list[str], options: storage.StorageOptions, schema: pa.Schema | None = None,
) -> Iterable[tuple[str, dict[str, list]]]:
    """(part uri, {column: values}) for each part, reading only those columns; with schema, a column of it
    that a part lacks (written before the column existed) reads as nulls."""
    for uri in parts:
        table = parquet_parts.read_part(uri, options, columns=columns, schema=schema)
        yield uri, {name: table.column(name).to_pylist() for name in columns}


def done_ids(folder: str, options: storage.StorageOptions) -> set[str]:
    """Ids that already have a row in a part file under folder."""
    return {i for _, columns in read_columns(part_files(folder, options), ["id"], options) for i in columns["id"]}


class _Name:
    """A file or folder under a layout's root, spelled once: read on the class it is the name relative to
    the root (`Outputs.run_json == "run.json"`), on an instance the path (`Outputs(out).run_json`)."""

    def __init__(self, name: str):
        self.name = name

    def __get__(self, layout: Any, owner: type | None = None) -> str:
        return self.name if layout is None else storage.join(layout.root, self.name)


@dataclass(frozen=True)
class Outputs:
    """Where a scoring run writes, under OUT_URI."""

    root: str

    masks, maps, overlays, scores = _Name("masks"), _Name("maps"), _Name("overlays"), _Name("scores")
    run_json = _Name("run.json")
    """The run's summary, written last: its presence marks the run finished."""
    inputs_json, report, lock = _Name(INPUTS_NAME), _Name(REPORT_NAME), _Name(LOCK_NAME)
    review = _Name("review.html")
    """The review page (`spade-batch review OUT`, reports.review_page): the flagged images, to mark normal or defect."""

    def mask(self, image_id: str) -> str:
        return storage.join(self.masks, output_stem(image_id) + ".png")

    def map(self, image_id: str) -> str:
        return storage.join(self.maps, output_stem(image_id) + ".npy")

    def overlay(self, image_id: str) -> str:
        return storage.join(self.overlays, output_stem(image_id) + ".png")

    def files(self, image_id: str) -> list[str]:
        """Every per-image output an image may get (mask, map, overlay)."""
        return [self.mask(image_id), self.map(image_id), self.overlay(image_id)]

    def token(self, options: storage.StorageOptions) -> str | None:
        """The run's run_token, from its inputs.json (None when there is none: a run older than inputs.json)."""
        if not storage.exists(self.inputs_json, options):
            return None
        return run_token(json.loads(storage.read_text(self.inputs_json, options)))

    def parts(self, options: storage.StorageOptions, token: str | None = None) -> RunParts:
        """The run's own part files and the strangers beside them in scores/ (token: default self.token()).

        Without a token (no inputs.json) every Parquet file is taken as the run's, as before parts were named.
        """
        token = token or self.token(options)
        files = part_files(self.scores, options)
        if token is None:
            return RunParts(files, [])
        own = re.compile(rf"part-{token}-[0-9a-f]{{16}}\.parquet")
        mine = [uri for uri in files if own.fullmatch(uri.rsplit("/", 1)[-1])]
        return RunParts(mine, [uri for uri in files if uri not in set(mine)])

    def drop_rows(self, parts: Iterable[str], ids: set[str], run: str, options: storage.StorageOptions) -> None:
        """Take the masks, maps and overlays of ids, then their rows, out of the run: they are scored again.

        A part holding some of those rows is written again without them (named after the ids it keeps),
        then removed. A run killed on the way leaves rows whose mask is gone, or the kept rows in two parts:
        its re-run finds the same ids to score again and drops them the same way.
        """
        for image_id in sorted(ids):
            for uri in self.files(image_id):
                storage.remove(uri, options)
        for uri in parts:
            table = parquet_parts.read_part(uri, options)
            kept = table.filter(pc.invert(pc.is_in(table["id"], pa.array(sorted(ids), pa.string()))))
            if kept.num_rows == table.num_rows:
                continue
            if kept.num_rows:
                parquet_parts.write_part(storage.join(self.scores, part_name(kept["id"].to_pylist(), run)), kept, options)
            storage.remove(uri, options)

    def clear(self, options: storage.StorageOptions) -> None:
        """Remove a previous run's outputs, masks and report too: none may stay behind beside a new run's.

        The lock is left alone: the run that clears holds it.
        """
        for folder in (self.scores, self.masks, self.maps, self.overlays):
            storage.remove(folder, options, recursive=True)
        for uri in (self.inputs_json, self.run_json, self.report, self.review):
            storage.remove(uri, options)


@dataclass(frozen=True)
class ModelLayout:
    """Where a model's files are, under MODEL_URI (or the local folder that holds a copy of its arrays).

    On the class, the names relative to the root (the artifact's files are copied by them).
    """

    root: str

    card = _Name("spade.json")
    """The card, written last: its presence marks the model complete."""
    train_ids, index, centre, pyramid = _Name("train_ids.json"), _Name("global.faiss"), _Name("centre.npz"), _Name("pyramid")
    calibration_matches = _Name("calibration.parquet")
    """What each calibration image's pixels matched (formats.calibration_matches): add re-searches only what its grown gallery changes."""
    features = _Name("features")
    """The Parquet feature parts (features.py) of the images this version brought: fit's all, an add's new ones; a re-run resumes from them."""
    features_inputs, lock = _Name(f"features/{INPUTS_NAME}"), _Name(LOCK_NAME)
    versions = _Name("versions")
    """versions/<N>/: the versions add published (formats.versions), each a model folder of this layout."""
    current = _Name("current.json")
    """Which version `spade-batch model current` made current, and the newest then (formats.versions)."""

    def version(self, number: int) -> ModelLayout:
        """The folder of version `number`: version 1 (fit's) is the root itself, the others versions/<N>/."""
        return self if number == 1 else ModelLayout(storage.join(self.versions, str(number)))

    @classmethod
    def layer_name(cls, layer: str) -> str:
        """pyramid/<layer>.npy: a layer's pixel gallery, relative to the root."""
        return f"{cls.pyramid}/{layer}.npy"

    @classmethod
    def array_names(cls, layers: Iterable[str], centre: bool = True) -> list[str]:
        """The files besides the card, relative to the root (schema 1 models have no centre)."""
        return [cls.train_ids, cls.index, *([cls.centre] if centre else []), *(cls.layer_name(layer) for layer in layers)]

    def file(self, name: str) -> str:
        """A file given by its name relative to the root."""
        return storage.join(self.root, name)

    def layer(self, layer: str) -> str:
        return self.file(self.layer_name(layer))


@dataclass(frozen=True)
class EvaluationOutputs:
    """Where evaluate writes, under OUT: the test image list, a scoring run, metrics, figures and the page."""

    root: str

    test_images, metrics_json, report = _Name("test_images.txt"), _Name("metrics.json"), _Name(REPORT_NAME)
    roc, pro, histogram = _Name("roc.png"), _Name("pro.png"), _Name("score_histogram.png")
    best, worst = _Name("examples_best.png"), _Name("examples_worst.png")

    @property
    def run(self) -> Outputs:
        """The scoring run of the test images."""
        return Outputs(storage.join(self.root, Outputs.scores))


@dataclass(frozen=True)
class PlanOutputs:
    """Where a nightly plan writes its own files, under PLAN_OUT (each line's run writes under its own out)."""

    root: str

    report, plan_json = _Name(REPORT_NAME), _Name("plan.json")


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


def output_kind(folder: str, has: Callable[[str], bool]) -> str | None:
    """What spade-batch output folder is: "a model" (its spade.json, or a killed fit's features/inputs.json), "a run"
    (inputs.json or run.json beside masks/ or scores/), "an evaluation" (test_images.txt or metrics.json beside
    scores/), or None. has(uri): whether a file or folder is there."""
    model, run, evaluation = ModelLayout(folder), Outputs(folder), EvaluationOutputs(folder)
    if has(model.card) or has(model.features_inputs):
        return "a model"
    if (has(run.inputs_json) or has(run.run_json)) and (has(run.masks) or has(run.scores)):
        return "a run"
    if (has(evaluation.test_images) or has(evaluation.metrics_json)) and has(evaluation.run.root):
        return "an evaluation"
    return None


def find_output(manifest: Manifest, listed: bool, options: storage.StorageOptions) -> tuple[str, str] | None:
    """(folder, kind: output_kind) of the spade-batch output nearest the top that holds an image of the manifest or
    lies above its root; with listed (a folder or glob: everything below the root is its listing), any output below the
    root too. None when there is none.

    Below a listed root, one listing of it answers (no request per folder); above it, and for the entries of a
    manifest file, a few existence checks per folder.
    """
    probe = _Probe(options)
    if listed:
        files = set(listing.list_entries(manifest.root, None, options))
        below = {manifest.root, *(folder for uri in files for folder in _ancestors(uri) if _within(folder, manifest.root))}
        for folder in sorted(below, key=len):
            kind = output_kind(folder, lambda uri: uri in files or uri in below)
            if kind:
                return folder, kind
        above = _ancestors(manifest.root)
    else:
        above = list({folder for uri in manifest.uris for folder in _ancestors(uri)})
    for folder in sorted(above, key=len):
        kind = output_kind(folder, probe)
        if kind:
            return folder, kind
    return None


def refuse_outputs(what: str, manifest: Manifest, listed: bool, command: str, options: storage.StorageOptions) -> None:
    """Raise ValueError naming the output find_output finds among the images `what` (e.g. "--images URI") gives command:
    a run's masks, a model's files or an evaluation's figures are never normal images."""
    found = find_output(manifest, listed, options)
    if found is None:
        return
    folder, kind = found
    if not listed:
        relation = "lists images inside"
    else:
        relation = "is" if folder == manifest.root else "holds" if _within(folder, manifest.root) else "lies inside"
    raise ValueError(
        f"{what} {relation} {kind} written by spade-batch ({folder}): its files are outputs, never normal images; "
        f"give {command} a folder of images only (move the output out of it, or give the images' own folder)"
    )


def refuse_shared_place(output: tuple[str, str], images: tuple[str, str], root: str, written: str) -> None:
    """ValueError when an output location and the listing of a job's images share a place (the same, one inside the
    other): what it writes (`written`, e.g. "the run's masks") would be listed as images by the next run, so a re-run
    could not resume and the next night would take them in. output, images: (flag, URI as given); root: the listing's
    root. The entries of a manifest file are taken as written (nothing is listed): never refused."""
    (output_flag, output_uri), (images_flag, source) = output, images
    relation = "" if is_manifest_file(source) else storage.relation(output_uri, root)
    if relation:
        raise ValueError(
            f"{output_flag} {output_uri} {relation} {images_flag} {source}: {written} would be listed as images "
            f"(a re-run could not resume, and the next run would take them in); give {output_flag} a place apart from the images"
        )


@dataclass
class _Probe:
    """storage.exists, each URI asked once."""

    options: storage.StorageOptions
    seen: dict[str, bool] = field(default_factory=dict)

    def __call__(self, uri: str) -> bool:
        if uri not in self.seen:
            self.seen[uri] = storage.exists(uri, self.options)
        return self.seen[uri]


def _ancestors(uri: str) -> list[str]:
    """The folders holding uri, nearest first, up to a bucket or the file system's root."""
    protocol, path = storage.split_uri(uri)
    parts = path.rstrip("/").split("/")
    prefix = f"{protocol}://" if protocol else ""
    return [prefix + ("/".join(parts[:n]) or "/") for n in range(len(parts) - 1, 0, -1)]


def _within(uri: str, root: str) -> bool:
    """Whether uri is root or below it (both in storage.normalize's form)."""
    return uri == root or uri.startswith(root.rstrip("/") + "/")
