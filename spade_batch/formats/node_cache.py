"""The node-local model cache ($SPADE_BATCH_CACHE, else <tmp>/spade-batch-cache): a remote model's arrays, copied
once per node and model and verified before they are renamed into place, and the stamps that remember which local
model folders' galleries this node has verified (by each file's size, mtime, ctime and inode), so that the actors of a
node hash a gallery once between them.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Sequence

from spade_batch.formats import storage
from spade_batch.formats.card import ModelCard
from spade_batch.formats.integrity import artifact_names, is_gallery, verify_files
from spade_batch.formats.layout import ModelLayout

log = logging.getLogger(__name__)


def cache_root() -> str:
    """Where node-local model copies live: $SPADE_BATCH_CACHE, else <tmp>/spade-batch-cache."""
    return os.environ.get("SPADE_BATCH_CACHE") or os.path.join(tempfile.gettempdir(), "spade-batch-cache")


def _files_key(*parts: str) -> str:
    return hashlib.sha256("\0".join(parts).encode()).hexdigest()[:24]


def _fingerprint(folder: str, names: Sequence[str]) -> dict[str, list[int]]:
    """What changes when a file is rewritten, replaced or touched: size, mtime, ctime and inode of each."""
    stats = {name: os.stat(os.path.join(folder, name)) for name in names}
    return {name: [st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino] for name, st in stats.items()}


def _stamp_path(folder: str, card: ModelCard) -> str:
    """Where this node records that the gallery files of the model in the local folder matched the card."""
    files = json.dumps({name: entry for name, entry in card.files.items() if is_gallery(name)}, sort_keys=True)
    return os.path.join(cache_root(), f"verified-{_files_key(os.path.abspath(folder), files)}.json")


def record_verified(folder: str, card: ModelCard) -> None:
    """Remember on this node that folder's gallery files match the card's checksums (best effort)."""
    if not card.files:
        return
    names = [name for name in artifact_names(card) if is_gallery(name)]
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
    names = [name for name in artifact_names(card) if is_gallery(name)]
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
                for name in artifact_names(card):
                    target = os.path.join(partial, name)
                    os.makedirs(os.path.dirname(target), exist_ok=True)
                    storage.get_file(ModelLayout(uri).file(name), target, options)
                verify_files(partial, card, uri)  # all of it, once: a copy that is in place has been verified
                os.replace(partial, folder)
            finally:
                with contextlib.suppress(FileNotFoundError):
                    shutil.rmtree(partial)
    return folder
