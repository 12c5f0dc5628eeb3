"""One run per output location: a lock file created atomically next to the outputs.

``acquire_lock(join(out_uri, LOCK_NAME), owner)`` creates the lock file with
:func:`spade_batch.formats.storage.create_exclusive`, so of concurrent runs exactly
one gets it; the others get a :class:`LockHeldError` that names the lock
file, its holder and since when. ``release_lock`` removes it at the end.

A run killed without releasing leaves a stale lock. When it was taken on this
host by a process that no longer exists, the next run breaks it by itself (a
killed driver resumes with a plain re-run). Otherwise breaking it is a manual,
deliberate step: check that no run is writing there, then delete the lock
file (``rm OUT/.spade-batch.lock``, ``aws s3 rm s3://.../.spade-batch.lock``)
and start the run again.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import logging
import os
import socket
import uuid
from collections.abc import Iterator
from dataclasses import asdict, dataclass, replace

from spade_batch.formats import storage
from spade_batch.formats.layout import LOCK_NAME as LOCK_NAME  # the name is spelled in layout.py
from spade_batch.formats.storage import StorageOptions

log = logging.getLogger(__name__)

_ATTEMPTS = 3


@dataclass(frozen=True)
class Lock:
    """A lock this process holds: the file's URI and what it records."""

    uri: str
    owner: str
    host: str
    pid: int
    since: str
    token: str


class LockHeldError(RuntimeError):
    """The lock is held by someone else; the message says by whom, since when, and how to break it."""

    def __init__(self, uri: str, holder: dict[str, object] | None) -> None:
        self.uri = uri
        self.holder = holder
        if holder is None:
            who = "an unknown holder (the lock file is unreadable)"
        else:
            who = f"{holder.get('owner')} on host {holder.get('host')} (pid {holder.get('pid')}) since {holder.get('since')}"
        super().__init__(
            f"{uri} is held by {who}: another run is writing there (to this output location or model). Wait for it to finish; "
            f"if it is no longer running (killed or crashed), delete {uri} and start this run again"
        )


def acquire_lock(uri: str, owner: str, options: StorageOptions = None) -> Lock:
    """Create the lock file ``uri`` for ``owner`` (e.g. the command and job id); raise LockHeldError if it exists.

    The file holds JSON: owner, host, pid, since (UTC, ISO 8601) and a unique
    token. It is read back after creation, so a store that ignores the
    conditional PUT (last writer wins) is caught too.
    """
    lock = Lock(
        uri=uri,
        owner=owner,
        host=socket.gethostname(),
        pid=os.getpid(),
        since=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        token=uuid.uuid4().hex,
    )
    for _ in range(_ATTEMPTS):
        storage.create_exclusive(uri, json.dumps(asdict(lock)).encode("utf-8"), options)
        # Read back rather than trust the answer: a retried PUT that had landed answers "exists",
        # and a store that ignores If-None-Match answers "created" to every writer.
        try:
            holder = _read_holder(uri, options)
        except FileNotFoundError:
            continue  # released between our create and our read: try again
        if holder is not None and holder.get("token") == lock.token:
            return lock
        if holder is None or not _dead_on_this_host(holder):
            raise LockHeldError(uri, holder)
        log.warning("%s was left by %s (pid %s on this host, no longer running); breaking it", uri, holder.get("owner"), holder.get("pid"))
        release_lock(replace(lock, token=str(holder.get("token"))), options)  # only if still that holder's
    raise LockHeldError(uri, None)


def release_lock(lock: Lock, options: StorageOptions = None) -> None:
    """Remove the lock file if it is still ``lock``'s; a lock broken and taken by another run is left alone."""
    with contextlib.suppress(FileNotFoundError):
        holder = _read_holder(lock.uri, options)
        if holder is not None and holder.get("token") == lock.token:
            storage.remove(lock.uri, options)
            return
        log.warning("%s no longer holds this run's lock (it was broken and maybe retaken); left it alone", lock.uri)


@contextlib.contextmanager
def holding_lock(uri: str, owner: str, options: StorageOptions = None) -> Iterator[Lock]:
    """``acquire_lock`` on entry, ``release_lock`` on exit (also when the body raises)."""
    lock = acquire_lock(uri, owner, options)
    try:
        yield lock
    finally:
        release_lock(lock, options)


def _dead_on_this_host(holder: dict[str, object]) -> bool:
    """True when the holder ran on this host and its process is gone."""
    pid = holder.get("pid")
    if holder.get("host") != socket.gethostname() or not isinstance(pid, int):
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    return False


def _read_holder(uri: str, options: StorageOptions) -> dict[str, object] | None:
    """The lock file's record; None if it is not a JSON object. FileNotFoundError if it is gone."""
    try:
        record = json.loads(storage.read_text(uri, options))
    except ValueError:
        return None
    return record if isinstance(record, dict) else None
