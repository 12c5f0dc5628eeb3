"""The fitted model artifact: card (spade.json), faiss image index, centre, pixel gallery.

Layout under MODEL_URI (names in layout.ModelLayout; spade.json is written last: a model without it is incomplete):

    spade.json            the card: settings, weights identity, shapes, thresholds, provenance
    train_ids.json        ids of the gallery images, in index order
    global.faiss          faiss index over the N x D centred global features (squared L2)
    centre.npz            the training-mean centre: "global" (D,) and one (C_l,) per layer, float32
    pyramid/<layer>.npy   N x (h * w) x C float16 centred pixel gallery per layer, channels last
    calibration.parquet   what each calibration image's pixels matched (calibration_matches.py): read by add only
    features/             the Parquet part files fit extracted (see features.py)

Features are stored and searched centred (minus a training mean). Squared distances do not change
under a common shift, but float32 |a|^2 - 2ab + |b|^2 on raw wide_resnet50_2 features (|a|^2 near
1e6) loses enough digits to change neighbour sets. Schema 1 models (uncentred) load with a zero
centre.

The gallery is written row by row (`GalleryWriter`), never held whole in memory, and read memory-
mapped: a scorer touches only the rows of the K images it retrieved.

The card records the size and SHA-256 of every other file (`ModelCard.files`), computed once when
the model is built. Loading checks them (`verify_files`): sizes and the small files' checksums at
every load (one stat and a few MB per process), the gallery's checksums once per node: when the
node-local copy of a remote model is downloaded (before it is renamed into place), or, for a local
model folder, the first time a process on the node loads it (a stamp in the cache remembers the
files it verified by size, mtime, ctime and inode). A file cut short, missing, or from another fit is
a ModelError naming it. Cards without checksums (older models) load unverified.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import functools
import hashlib
import json
import logging
import math
import os
import shutil
import tempfile
import time
import zipfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import faiss
import numpy as np

from spade_batch.config import Settings
from spade_batch.formats import listing, storage
from spade_batch.formats.card import CARD_NAME, CalibrationRecord, ModelCard, ModelError, Normalisation, Thresholds, load_card
from spade_batch.formats.features import LayerShape
from spade_batch.formats.layout import ModelLayout

log = logging.getLogger(__name__)

SHA256_CHUNK = 8 << 20
"""Bytes read at a time when hashing a model file (the gallery is hashed streaming, never held whole)."""
REMEDY = ("re-sync the whole model folder (every file with its spade.json) from where it was fitted, "
          "or fit the model again")


@dataclass(frozen=True)
class Centre:
    """The vector subtracted from every feature before any distance.

    Any fixed vector near the data keeps float32 distances exact to the digits that matter; fit
    uses the features of one gallery image (the first by id), so the centre does not depend on how
    the extraction was batched or resumed.

    Attributes:
        global_mean: D float32.
        layer_means: per layer, C_l float32.
    """

    global_mean: np.ndarray
    layer_means: list[np.ndarray]

    @classmethod
    def of_image(cls, global_feature: np.ndarray, layers: Sequence[np.ndarray]) -> Centre:
        """From one image: its D global feature, and per layer the mean of its P x C_l pixel features."""
        return cls(
            np.asarray(global_feature, np.float32),
            [np.asarray(layer, np.float32).mean(axis=0, dtype=np.float64).astype(np.float32) for layer in layers],
        )

    @classmethod
    def zero(cls, global_dim: int, shapes: Sequence[LayerShape]) -> Centre:
        return cls(np.zeros(global_dim, np.float32), [np.zeros(s.channels, np.float32) for s in shapes])


@dataclass
class SpadeModel:
    """A fitted SPADE model.

    Attributes:
        card: settings and provenance.
        train_ids: N gallery image ids, in index order.
        index: faiss squared-L2 index over the N x D centred global features.
        centre: subtracted from query features before searching.
        gallery: per layer, N x (h * w) x C float16 centred pixel features (channels last),
            memory-mapped from `folder`.
        folder: the local folder holding the artifact's files (all but the card).
    """

    card: ModelCard
    train_ids: list[str]
    index: faiss.Index
    centre: Centre
    gallery: list[np.ndarray]
    folder: str

    def with_thresholds(self, thresholds: Thresholds, calibration: CalibrationRecord) -> SpadeModel:
        card = dataclasses.replace(self.card, thresholds=thresholds, calibration=calibration)
        return dataclasses.replace(self, card=card)

    def with_normalisation(self, normalisation: Normalisation) -> SpadeModel:
        return dataclasses.replace(self, card=dataclasses.replace(self.card, normalisation=normalisation))

    def with_file(self, name: str) -> SpadeModel:
        """The model with one more file of its folder recorded in the card (size and SHA-256) and published with it,
        one that loading does not read (the calibration matches)."""
        path = os.path.join(self.folder, name)
        entry = {"bytes": os.path.getsize(path), "sha256": file_sha256(path)}
        return dataclasses.replace(self, card=dataclasses.replace(self.card, files={**self.card.files, name: entry}))

    @functools.cached_property
    def row_of(self) -> dict[str, int]:
        """Gallery image id -> its row in the index and the gallery files."""
        return {image_id: row for row, image_id in enumerate(self.train_ids)}

    @property
    def gallery_bytes(self) -> int:
        return sum(layer.nbytes for layer in self.gallery)

    def save(self, uri: str, options: storage.StorageOptions = None) -> None:
        """Write the artifact; an existing card is removed first, so no reader pairs it with new arrays.

        A file beyond the arrays that this folder lacks (a node-local copy holds no calibration matches) is
        left out, and out of the card written.
        """
        storage.remove(ModelLayout(uri).card, options)
        self.publish_arrays(uri, options)
        kept = {*_array_names(self.card), *self._extra_names()}
        files = {name: entry for name, entry in self.card.files.items() if name in kept}
        dataclasses.replace(self, card=dataclasses.replace(self.card, files=files)).write_card(uri, options)

    def publish_arrays(self, uri: str, options: storage.StorageOptions = None) -> None:
        """Copy the files of `folder` but the card to uri, streamed; nothing to do when uri is the folder."""
        if storage.is_local(uri) and os.path.abspath(storage.filesystem(uri, options)[1]) == os.path.abspath(self.folder):
            return
        for name in [*_array_names(self.card), *self._extra_names()]:
            storage.put_file(os.path.join(self.folder, name), ModelLayout(uri).file(name), options)

    def _extra_names(self) -> list[str]:
        """The files the card records beyond the arrays (with_file) that `folder` holds."""
        arrays = _array_names(self.card)
        return [name for name in self.card.files if name not in arrays and os.path.exists(os.path.join(self.folder, name))]

    def write_card(self, uri: str, options: storage.StorageOptions = None) -> None:
        """spade.json, last: its presence marks the model complete."""
        storage.write_text(ModelLayout(uri).card, self.card.to_json(), options)

    @classmethod
    def load(cls, uri: str, options: storage.StorageOptions = None, card: ModelCard | None = None) -> SpadeModel:
        """The model at uri, its gallery memory-mapped from a node-local copy (uri itself when local).

        card: use this card instead of uri's spade.json (fit's calibration, before the card is written).

        Every file is checked against the card's sizes and checksums (verify_model's checks, on the
        files the model is read from): a ModelError names one that does not match.
        """
        card = card or load_card(uri, options)
        if storage.is_local(uri):
            folder = storage.filesystem(uri, options)[1]
            verify_local_folder(folder, card, uri)
        else:
            folder = local_copy(uri, card, options)  # the gallery's checksums are verified when the copy is made
            verify_files(folder, card, uri, gallery=False)
        return _load_folder(folder, card, uri)


def _array_names(card: ModelCard) -> list[str]:
    """The artifact's files besides the card, relative to the model folder."""
    return ModelLayout.array_names([shape.name for shape in card.layer_shapes], centre=card.schema_version > 1)


def _write_arrays(folder: str, ids: list[str], index: faiss.Index, centre: Centre, shapes: Sequence[LayerShape]) -> None:
    """train ids, index and centre into folder (the gallery files are written by GalleryWriter)."""
    files = ModelLayout(folder)
    with open(files.train_ids, "w") as f:
        json.dump(ids, f)
    faiss.write_index(index, files.index)
    layers = {f"layer:{shape.name}": mean for shape, mean in zip(shapes, centre.layer_means)}
    np.savez(files.centre, **{"global": centre.global_mean, **layers})


_LOADS = [0]


def load_count() -> int:
    """How many times this process has loaded a model's arrays (each actor should do it once)."""
    return _LOADS[0]


def _load_folder(folder: str, card: ModelCard, source: str | None = None) -> SpadeModel:
    """The model whose arrays are in folder; source (default: folder) is the URI errors name, file by file."""
    _LOADS[0] += 1
    shapes = card.layer_shapes
    source = source or folder

    local, named = ModelLayout(folder), ModelLayout(source)

    def read(name: str, reader: Callable[[str], Any]) -> Any:
        try:
            return reader(local.file(name))
        except (OSError, ValueError, RuntimeError, KeyError, EOFError, zipfile.BadZipFile) as error:
            raise ModelError(f"model file {named.file(name)} is missing or damaged ({error}); fit the model again") from error

    train_ids = read(ModelLayout.train_ids, _read_json)
    index = read(ModelLayout.index, faiss.read_index)
    gallery = [read(ModelLayout.layer_name(s.name), lambda path: np.load(path, mmap_mode="r")) for s in shapes]
    centre = Centre.zero(card.global_dim, shapes) if card.schema_version == 1 else read(ModelLayout.centre, lambda path: _read_centre(path, shapes))
    if not isinstance(train_ids, list) or len(train_ids) != card.train_count:
        raise ModelError(f"model file {named.train_ids} does not list the {card.train_count} "
                         f"gallery images its {CARD_NAME} records; fit the model again")
    for shape, layer in zip(shapes, gallery):
        expected = (card.train_count, shape.height * shape.width, shape.channels)
        if layer.shape != expected:
            raise ModelError(f"model file {named.layer(shape.name)} holds {layer.shape}, "
                             f"its {CARD_NAME} records {expected}; fit the model again")
    if index.ntotal != card.train_count or index.d != card.global_dim:
        raise ModelError(f"model file {named.index} indexes {index.ntotal} x {index.d} features, "
                         f"its {CARD_NAME} records {card.train_count} x {card.global_dim}; fit the model again")
    return SpadeModel(card=card, train_ids=train_ids, index=index, centre=centre, gallery=gallery, folder=folder)


def _read_json(path: str) -> Any:
    with open(path) as f:
        return json.load(f)


def _read_centre(path: str, shapes: Sequence[LayerShape]) -> Centre:
    with np.load(path) as saved:
        return Centre(saved["global"], [saved[f"layer:{s.name}"] for s in shapes])


def file_sha256(path: str) -> str:
    """Hex SHA-256 of a local file, read SHA256_CHUNK bytes at a time."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(SHA256_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def checksum_files(folder: str, card: ModelCard) -> dict[str, dict[str, Any]]:
    """ModelCard.files for the model files in folder: each one's size and SHA-256."""
    return {name: {"bytes": os.path.getsize(os.path.join(folder, name)), "sha256": file_sha256(os.path.join(folder, name))}
            for name in _array_names(card)}


def _is_gallery(name: str) -> bool:
    return name.startswith(ModelLayout.pyramid + "/")


def verify_files(folder: str, card: ModelCard, source: str | None = None, gallery: bool = True, small: bool = True) -> None:
    """Check the model files in the local folder against the card: every file's size, the SHA-256 of the
    gallery's files (gallery) and of the others (small; the gallery is most of the bytes). Nothing to
    check for a card without checksums. source (default: folder) is the URI the errors name."""
    if not card.files:
        return
    named = ModelLayout(source or folder)
    for name in _array_names(card):
        path = os.path.join(folder, name)
        try:
            size = os.path.getsize(path)
        except OSError as error:
            raise ModelError(f"model file {named.file(name)} is missing ({error.strerror}); {REMEDY}") from error
        expected = _recorded(card, named, name)
        _check_size(named, name, size, expected)
        if (gallery if _is_gallery(name) else small) and file_sha256(path) != expected["sha256"]:
            raise _checksum_error(named, name)


def _recorded(card: ModelCard, named: ModelLayout, name: str) -> dict[str, Any]:
    if name not in card.files:
        raise ModelError(f"{named.card} records no checksum of {name}; the card is damaged: {REMEDY}")
    return card.files[name]


def _check_size(named: ModelLayout, name: str, size: int, expected: dict[str, Any]) -> None:
    if size != expected["bytes"]:
        raise ModelError(f"model file {named.file(name)} is {size} bytes, its {CARD_NAME} records {expected['bytes']}: "
                         f"it is cut short or from another fit; {REMEDY}")


def _checksum_error(named: ModelLayout, name: str) -> ModelError:
    return ModelError(f"model file {named.file(name)} does not match the checksum its {CARD_NAME} records: "
                      f"it is damaged or from another fit; {REMEDY}")


def _files_key(*parts: str) -> str:
    return hashlib.sha256("\0".join(parts).encode()).hexdigest()[:24]


def _fingerprint(folder: str, names: Sequence[str]) -> dict[str, list[int]]:
    """What changes when a file is rewritten, replaced or touched: size, mtime, ctime and inode of each."""
    stats = {name: os.stat(os.path.join(folder, name)) for name in names}
    return {name: [st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino] for name, st in stats.items()}


def _stamp_path(folder: str, card: ModelCard) -> str:
    """Where this node records that the gallery files of the model in the local folder matched the card."""
    files = json.dumps({name: entry for name, entry in card.files.items() if _is_gallery(name)}, sort_keys=True)
    return os.path.join(cache_root(), f"verified-{_files_key(os.path.abspath(folder), files)}.json")


def record_verified(folder: str, card: ModelCard) -> None:
    """Remember on this node that folder's gallery files match the card's checksums (best effort)."""
    if not card.files:
        return
    names = [name for name in _array_names(card) if _is_gallery(name)]
    stamp = _stamp_path(folder, card)
    try:
        os.makedirs(os.path.dirname(stamp), exist_ok=True)
        partial = f"{stamp}.{os.getpid()}.partial"
        with open(partial, "w") as f:
            json.dump(_fingerprint(folder, names), f)
        os.replace(partial, stamp)
    except OSError as error:  # an unwritable cache costs a re-verification per load, nothing more
        log.debug("model: cannot record the verification of %s (%s)", folder, error)


def verify_local_folder(folder: str, card: ModelCard, source: str | None = None) -> None:
    """verify_files for a model read in place: sizes and small files at every load, the gallery's
    checksums once per node (until one of its files changes), under a lock so that the actors of a
    node hash it once between them."""
    verify_files(folder, card, source, gallery=False)
    if not card.files:
        return
    names = [name for name in _array_names(card) if _is_gallery(name)]
    stamp = _stamp_path(folder, card)

    def verified() -> bool:
        try:
            with open(stamp) as f:
                return json.load(f) == json.loads(json.dumps(_fingerprint(folder, names)))
        except (OSError, ValueError):
            return False

    if verified():
        return
    with contextlib.ExitStack() as stack:
        with contextlib.suppress(OSError):
            os.makedirs(os.path.dirname(stamp), exist_ok=True)
            lock = stack.enter_context(open(f"{stamp}.lock", "w"))
            fcntl.flock(lock, fcntl.LOCK_EX)
        if verified():  # another process on this node verified it while this one waited
            return
        started = time.perf_counter()
        verify_files(folder, card, source, gallery=True, small=False)
        log.info("model: verified the checksums of %s (%.1f GB) in %.1f s", source or folder,
                 sum(card.files[name]["bytes"] for name in names) / 1e9, time.perf_counter() - started)
        record_verified(folder, card)


def verify_model(uri: str, card: ModelCard, options: storage.StorageOptions = None) -> None:
    """What the driver checks before any image is read: the model at uri matches its card.

    A local model: verify_local_folder (the gallery's checksums once per node). A remote one: every
    file's size (one request each) and the small files' checksums (a few MB); the gallery's checksums
    are verified where the actors' node-local copy is made (local_copy).
    """
    if storage.is_local(uri):
        verify_local_folder(storage.filesystem(uri, options)[1], card, uri)
        return
    if not card.files:
        return
    named = ModelLayout(uri)
    for name in _array_names(card):
        expected = _recorded(card, named, name)
        try:
            size = int(listing.info(named.file(name), options)["size"])
        except FileNotFoundError as error:
            raise ModelError(f"model file {named.file(name)} is missing; {REMEDY}") from error
        _check_size(named, name, size, expected)
        if not _is_gallery(name) and hashlib.sha256(storage.read_bytes(named.file(name), options)).hexdigest() != expected["sha256"]:
            raise _checksum_error(named, name)


def cache_root() -> str:
    """Where node-local model copies live: $SPADE_BATCH_CACHE, else <tmp>/spade-batch-cache."""
    return os.environ.get("SPADE_BATCH_CACHE") or os.path.join(tempfile.gettempdir(), "spade-batch-cache")


def local_copy(uri: str, card: ModelCard, options: storage.StorageOptions = None) -> str:
    """A node-local folder holding the model's arrays, downloaded once per node and model.

    Processes on one node share the copy: a file lock serialises the download, which lands in a
    temporary folder renamed into place, so no reader ever sees half a copy. A refit (new
    `card.created`) gets a new folder. The copy's checksums are verified before it is renamed into
    place (a ModelError names a file that does not match the card, and nothing is kept).
    """
    key = _files_key(storage.normalize(uri, options), card.created, json.dumps(card.files, sort_keys=True))
    root = cache_root()
    os.makedirs(root, exist_ok=True)
    folder = os.path.join(root, key)
    with open(os.path.join(root, f"{key}.lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not os.path.isdir(folder):
            partial = tempfile.mkdtemp(prefix=f"{key}.", suffix=".partial", dir=root)
            try:
                for name in _array_names(card):
                    target = os.path.join(partial, name)
                    os.makedirs(os.path.dirname(target), exist_ok=True)
                    storage.get_file(ModelLayout(uri).file(name), target, options)
                verify_files(partial, card, uri)  # all of it, once: a copy that is in place has been verified
                os.replace(partial, folder)
            finally:
                with contextlib.suppress(FileNotFoundError):
                    shutil.rmtree(partial)
    return folder


def build_index(global_features: np.ndarray, kind: str = "flat", lists: int = 0, seed: int = 0, k: int = 1) -> faiss.Index:
    """Squared-L2 faiss index over N x D float32 features: exact (flat) or IVF (approximate).

    An IVF index probes a quarter of its lists, and always enough lists that any query finds k
    vectors (faiss pads a short result with id -1).
    """
    vectors = np.ascontiguousarray(global_features, dtype=np.float32)
    count, dim = vectors.shape
    if kind == "flat":
        index = faiss.IndexFlatL2(dim)
        index.add(vectors)
        return index
    lists = lists or max(1, min(count // 39, int(4 * math.sqrt(count))))
    index = faiss.IndexIVFFlat(faiss.IndexFlatL2(dim), dim, lists, faiss.METRIC_L2)
    index.cp.seed = seed
    index.train(vectors)
    index.add(vectors)
    smallest_first = np.cumsum(np.sort([index.invlists.list_size(i) for i in range(lists)]))
    covering = int(np.searchsorted(smallest_first, k)) + 1  # no `covering` lists together hold fewer than k
    index.nprobe = min(lists, max(1, lists // 4, covering))
    return index


class GalleryWriter:
    """Writes gallery rows into <folder>/pyramid/<layer>.npy, centred, in any order and in pieces.

    The gallery ids are known up front and sorted: row i of every file is ids[i], wherever and
    whenever its features arrive, so the artifact does not depend on batching or resume. Rows are
    written with positioned writes (no memory map), so memory stays at one batch whatever the
    gallery size, and several threads may add different images at once.
    """

    rows_per_write = 64
    """Images centred and written together: bounds add's float32 copy (resnet18 at 128 px: 29 MB)."""

    def __init__(self, folder: str, ids: Sequence[str], layer_shapes: Sequence[LayerShape], global_dim: int, centre: Centre):
        self.folder, self.ids, self.shapes, self.centre = folder, sorted(ids), list(layer_shapes), centre
        self.position = {image_id: row for row, image_id in enumerate(self.ids)}
        if len(self.position) != len(self.ids):
            raise ValueError("gallery ids must be unique")
        self.written = np.zeros(len(self.ids), dtype=bool)
        self.global_features = np.zeros((len(self.ids), global_dim), np.float32)
        files = ModelLayout(folder)
        os.makedirs(files.pyramid, exist_ok=True)
        self.files, self.row_bytes, self.offsets = [], [], []
        for shape in self.shapes:
            handle = open(files.layer(shape.name), "w+b")
            header = {"descr": np.lib.format.dtype_to_descr(np.dtype(np.float16)), "fortran_order": False,
                      "shape": (len(self.ids), shape.height * shape.width, shape.channels)}
            np.lib.format.write_array_header_2_0(handle, header)
            self.offsets.append(handle.tell())
            self.row_bytes.append(2 * shape.height * shape.width * shape.channels)
            handle.truncate(self.offsets[-1] + self.row_bytes[-1] * len(self.ids))
            handle.flush()
            self.files.append(handle)

    def add(self, ids: Sequence[str], global_features: np.ndarray, layers: Sequence[np.ndarray]) -> None:
        """Write the rows of those of n images that belong to the gallery (others are skipped).

        Args:
            ids: n image ids.
            global_features: n x D.
            layers: per layer, n x P x C_l (any float dtype).
        """
        rows = np.array([self.position.get(image_id, -1) for image_id in ids], dtype=np.int64)
        sources = np.flatnonzero(rows >= 0)
        for start in range(0, len(sources), self.rows_per_write):
            chunk = sources[start : start + self.rows_per_write]
            self._write(rows[chunk], global_features[chunk], [layer[chunk] for layer in layers])

    def _write(self, rows: np.ndarray, global_features: np.ndarray, layers: Sequence[np.ndarray]) -> None:
        """Centre b images and write them to gallery rows `rows` (b int64), a run of consecutive rows per write."""
        self.global_features[rows] = global_features - self.centre.global_mean
        runs = np.split(np.arange(len(rows)), np.flatnonzero(np.diff(rows) != 1) + 1)
        for handle, offset, size, layer, mean in zip(self.files, self.offsets, self.row_bytes, layers, self.centre.layer_means):
            values = _centred_float16(layer, mean)
            for run in runs:
                os.pwrite(handle.fileno(), memoryview(values[run[0] : run[-1] + 1]).cast("B"), offset + int(rows[run[0]]) * size)
        self.written[rows] = True

    def close(self) -> tuple[list[str], np.ndarray]:
        """(gallery ids, N x D centred global features) once every row is written."""
        for handle in self.files:
            handle.close()
        if not self.written.all():
            missing = [image_id for image_id, done in zip(self.ids, self.written) if not done]
            raise ValueError(f"{len(missing)} gallery images were never written, e.g. {missing[:3]}")
        return self.ids, self.global_features


def _centred_float16(values: np.ndarray, mean: np.ndarray) -> np.ndarray:
    """b x P x C float values minus the C mean (in float32), as C-contiguous float16."""
    import torch  # 10x numpy's float16 casts; imported here so that loading a model needs no torch

    centred = torch.from_numpy(np.asarray(values)).float() - torch.from_numpy(mean)
    return centred.to(torch.float16).contiguous().numpy()


def build_model(writer: GalleryWriter, card: ModelCard, settings: Settings) -> SpadeModel:
    """The model whose gallery `writer` has written: index over the centred global features, arrays mapped."""
    ids, global_features = writer.close()
    # k + 1: leave-one-out calibration searches one neighbour more, its own row then dropped.
    index = build_index(global_features, settings.index, settings.ivf_lists, settings.seed, settings.k + 1)
    _write_arrays(writer.folder, ids, index, writer.centre, writer.shapes)
    started = time.perf_counter()
    card = dataclasses.replace(card, files=checksum_files(writer.folder, card))
    log.info("fit: checksummed %.2f GB of model files in %.1f s",
             sum(entry["bytes"] for entry in card.files.values()) / 1e9, time.perf_counter() - started)
    record_verified(writer.folder, card)
    return _load_folder(writer.folder, card)
