"""A model's numbered versions under MODEL_URI, and which one is current.

Version 1 is what fit wrote, at the root (a model from before versions is version 1 as it is). Each
`add` publishes the next number at versions/<N>/: a complete model folder (layout.ModelLayout) whose
features/ holds the parts of the images it added, and whose card names its parent. A version exists
once its spade.json is written, last and atomically: a reader never sees half of one. Nothing is
ever deleted.

The current version is the newest, unless `spade-batch model current` made another one current:
current.json records that choice with the newest version at the time, so the choice holds until a
newer version is published. Writing current.json is atomic too.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import re
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

from spade_batch import __version__
from spade_batch.formats import listing, storage
from spade_batch.formats.card import ModelCard, VersionRecord, load_card
from spade_batch.formats.layout import ModelLayout, part_files
from spade_batch.formats.locks import holding_lock
from spade_batch.formats.manifest import pairs_sha256

_VERSION_CARD = re.compile(rf"(\d+)/{re.escape(ModelLayout.card)}")


@dataclass(frozen=True)
class ModelVersion:
    """One published version: its number and the URI of its folder (what SpadeModel.load and load_card take)."""

    number: int
    uri: str


def version_numbers(model_uri: str, options: storage.StorageOptions = None) -> list[int]:
    """The published versions, ascending (empty when there is no model at model_uri)."""
    layout = ModelLayout(model_uri)
    if not storage.exists(layout.card, options):
        return []
    folder = storage.normalize(layout.versions, options)
    names = (uri[len(folder) + 1 :] for uri in listing.list_files(folder, (".json",), options))
    return [1, *sorted(int(match.group(1)) for name in names if (match := _VERSION_CARD.fullmatch(name)) and int(match.group(1)) > 1)]


def current_number(model_uri: str, options: storage.StorageOptions = None) -> int:
    """The current version: the newest, or the one made current since the newest was published."""
    numbers = _published(model_uri, options)
    layout = ModelLayout(model_uri)
    if storage.exists(layout.current, options):
        chosen = json.loads(storage.read_text(layout.current, options))
        if chosen.get("newest") == numbers[-1] and chosen.get("version") in numbers:
            return int(chosen["version"])
    return numbers[-1]


def resolve(model_uri: str, number: int | None = None, options: storage.StorageOptions = None) -> ModelVersion:
    """Version `number` of the model (default: the current one); an unpublished number is a ValueError naming those there are."""
    numbers = _published(model_uri, options)
    if number is None:
        number = current_number(model_uri, options)
    elif number not in numbers:
        raise ValueError(f"model {model_uri} has no version {number}; its versions are {', '.join(map(str, numbers))}")
    return ModelVersion(number, ModelLayout(model_uri).version(number).root)


def make_current(model_uri: str, number: int, options: storage.StorageOptions = None) -> ModelVersion:
    """Make version `number` current (until a newer version is published); nothing is deleted.

    It holds the model's lock for the moment it writes: while an add (or fit) runs there, it raises LockHeldError,
    since that add would publish a newer version seconds later and the choice would be silently gone.
    """
    with holding_model_lock(model_uri, f"spade-batch model current {model_uri} {number}", options):
        version = resolve(model_uri, number, options)
        newest = _published(model_uri, options)[-1]
        storage.write_text(ModelLayout(model_uri).current, json.dumps({"version": number, "newest": newest}), options)
    return version


@contextmanager
def holding_model_lock(model_uri: str, owner: str, options: storage.StorageOptions = None) -> Iterator[None]:
    """Hold the lock of the existing model at model_uri (add, model current): one writer at a time.

    Where there is no model, FileNotFoundError names the URI before the lock file would create a folder there.
    """
    _published(model_uri, options)
    with holding_lock(ModelLayout(model_uri).lock, owner, options):
        yield


@dataclass(frozen=True)
class NextVersion:
    """The version an add publishes, planned under the model's lock: the model's root, the current version (the
    parent) and its card, the feature parts of the parent and its ancestors (oldest version first), and its number."""

    model_uri: str
    parent: ModelVersion
    card: ModelCard
    parts: list[str]
    number: int


@contextmanager
def adding_version(model_uri: str, owner: str, options: storage.StorageOptions = None) -> Iterator[NextVersion]:
    """Hold the model's lock (one add or fit at a time; else LockHeldError naming its holder) and plan the next
    version: the one add publishes, one past the newest, on the current one."""
    with holding_model_lock(model_uri, owner, options):
        parent = resolve(model_uri, None, options)
        parts = [part for version in lineage(model_uri, parent.number, options)
                 for part in part_files(ModelLayout(version.uri).features, options)]
        yield NextVersion(model_uri, parent, load_card(parent.uri, options), parts, next_number(model_uri, options))


def next_number(model_uri: str, options: storage.StorageOptions = None) -> int:
    """The number the next add publishes: one past the newest."""
    return _published(model_uri, options)[-1] + 1


def publish_same_arrays(model_uri: str, parent: ModelVersion, card: ModelCard, options: storage.StorageOptions = None) -> ModelVersion:
    """Publish `card` (the parent's with other thresholds) as the next version, holding the parent's arrays unchanged.

    Every file the card records is copied from the parent's folder with storage.copy_file (a hard link on a local
    disk, a server-side copy on an object store: no byte passes through this process), so the version is an ordinary,
    self-contained model folder that brought no images; its card is written last. The caller holds the model's lock.
    """
    number = next_number(model_uri, options)
    source, target = ModelLayout(parent.uri), ModelLayout(model_uri).version(number)
    storage.remove(target.root, options, recursive=True)  # what a killed publish left (no card: never published)
    for name in card.files:
        storage.copy_file(source.file(name), target.file(name), options)
    record = VersionRecord(number=number, parent=parent.number, images_added=0, added_sha256=pairs_sha256([], []))
    made = datetime.datetime.now(datetime.timezone.utc).isoformat()
    storage.write_text(target.card, dataclasses.replace(card, version=record, created=made, package_version=__version__).to_json(), options)
    return ModelVersion(number, target.root)


def lineage(model_uri: str, number: int, options: storage.StorageOptions = None) -> list[ModelVersion]:
    """Version `number` and its ancestors, oldest (version 1) first: whose features/ together hold its training images."""
    chain = [resolve(model_uri, number, options)]
    while (parent := load_card(chain[-1].uri, options).version.parent) is not None:
        chain.append(resolve(model_uri, parent, options))
    return chain[::-1]


def _published(model_uri: str, options: storage.StorageOptions) -> list[int]:
    numbers = version_numbers(model_uri, options)
    if not numbers:
        raise FileNotFoundError(f"no model at {model_uri}: {ModelLayout.card} is missing; run `spade-batch fit` first")
    return numbers
