"""Files named by URIs: where a URI points (join, normalise, compare), read, atomic and exclusive write, copy, remove.

A URI is a local path (``data/x.png``, ``/abs/x.png``), a ``file://`` URL or
an fsspec URL (``s3://bucket/key``, ``memory://...``). The filesystem is
chosen by the URI's scheme alone and the rest is the path, taken literally:
fsspec URL chaining (``a::b``) and URL options are never interpreted, so
``::``, ``?`` or ``#`` in a name are just characters of that name.
``options`` is the fsspec storage options dict for that filesystem, passed to
``fsspec.filesystem(protocol, **options)``; for S3 it holds s3fs's ``key``,
``secret``, ``client_kwargs={"endpoint_url": ...}`` and, for timeouts,
``config_kwargs={"connect_timeout": s, "read_timeout": s}`` (s3fs defaults:
5 s and 15 s). Options never appear in error messages, and user:password
parts of URIs are masked there.

Every call runs under the retry policy of :mod:`spade_batch.formats.retry` (a transient fault is retried, then a
TransientStorageError). Part files are :mod:`parquet_parts`; folder listings and fingerprints :mod:`listing`.
"""

from __future__ import annotations

import contextlib
import errno
import io
import os
import re
import shutil
import stat
import tempfile
from collections.abc import Callable, Mapping
from typing import Any, BinaryIO, TypeVar

import fsspec
import numpy as np

from spade_batch.formats import retry
from spade_batch.formats.text import first_line, redact

StorageOptions = Mapping[str, Any] | None
T = TypeVar("T")

_LOCAL_PROTOCOLS = (None, "file", "local")
_S3_PROTOCOLS = ("s3", "s3a")
_S3_VERSION_MARK = "?versionId="
# Two or more characters before "://", so a Windows drive letter is never a scheme.
_SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]+)://")

# The umask can only be read by setting it, so read it once at import time,
# before any worker threads exist. Temp files are created 0600; the final file
# gets the mode a plain open() would have given it.
_UMASK = os.umask(0o022)
os.umask(_UMASK)


class StorageOptionError(ValueError):
    """A storage option the filesystem does not take (a misspelt key of storage_options): the message names it."""


def _option_error(error: TypeError, uri: str) -> Exception:
    """A StorageOptionError naming the option that `error` (a filesystem's TypeError) refused; `error` itself
    when it is not about an option (a bug, not a setting)."""
    match = re.search(r"unexpected keyword argument '([^']+)'", str(error))
    if not match:
        return error
    protocol = split_uri(uri)[0] or "local"
    return StorageOptionError(
        f"storage option {match.group(1)!r} is not one that {protocol}:// storage takes ({first_line(error, 'no message')}); "
        "check its spelling in storage_options (--storage-options or the config file's storage: section)"
    )


def retrying(action: Callable[[], T], uri: str, what: str) -> T:
    """``action()``, a call on the store at ``uri``, under the retry policy (:func:`retry.retrying`). A filesystem
    connects on its first call, so a misspelt storage option fails here: a StorageOptionError naming it."""

    def attempt() -> T:
        try:
            return action()
        except TypeError as error:
            raise _option_error(error, uri) from error

    return retry.retrying(attempt, uri, what)


def split_uri(uri: str) -> tuple[str | None, str]:
    """``(scheme, rest)`` of ``uri``; ``(None, uri)`` for a plain path. Nothing else is parsed."""
    match = _SCHEME.match(uri)
    return (match.group(1), uri[match.end() :]) if match else (None, uri)


def name_problem(uri: str) -> str | None:
    """Why ``uri`` cannot be addressed literally by its filesystem, or None if it can.

    Today one case: an S3 key holding ``?versionId=``, which s3fs always reads
    as a version of another key.
    """
    protocol, rest = split_uri(uri)
    if protocol in _S3_PROTOCOLS and _S3_VERSION_MARK in rest:
        return f"the name holds {_S3_VERSION_MARK!r}, which s3fs reads as an object version; rename the object"
    return None


def filesystem(uri: str, options: StorageOptions = None) -> tuple[fsspec.AbstractFileSystem, str]:
    """The filesystem serving ``uri`` and the path of ``uri`` inside it.

    Local paths come back absolute and normalised, object-store paths as
    ``bucket/key`` exactly as written; trailing slashes are dropped. Only the
    scheme picks the filesystem: no chaining, no options read from the URI.
    An S3 key holding ``?versionId=`` is a ValueError: s3fs would read
    another object (see :func:`name_problem`).
    """
    protocol, rest = split_uri(uri)
    if protocol in _LOCAL_PROTOCOLS:
        path = os.path.abspath(rest)
        return fsspec.filesystem("file"), path
    problem = name_problem(uri)
    if problem:
        raise ValueError(f"{redact(uri)}: {problem}")
    try:
        fs = fsspec.filesystem(protocol, **dict(options or {}))
    except TypeError as error:
        raise _option_error(error, uri) from error
    return fs, fs._strip_protocol(f"{protocol}://{rest}")


def is_local(uri: str) -> bool:
    """True for plain paths and ``file://`` / ``local://`` URLs."""
    return split_uri(uri)[0] in _LOCAL_PROTOCOLS


def join(base: str, *parts: str) -> str:
    """Join URI or path components with single ``/`` separators.

    ``join("s3://b/model", "features", "part-00001.parquet")`` gives
    ``"s3://b/model/features/part-00001.parquet"``; ``join("/data", "x.png")``
    gives ``"/data/x.png"``. Slashes around each part are dropped, and empty
    parts are skipped.
    """
    out = base
    for part in parts:
        part = part.strip("/")
        if not part:
            continue
        out = part if not out else (out if out.endswith("/") else out + "/") + part
    return out


def normalize(uri: str, options: StorageOptions = None) -> str:
    """``uri`` in the form :func:`listing.list_files` returns.

    Local paths become absolute, the scheme of a URL is kept, trailing slashes
    are dropped: ``normalize("s3://b/x/") == "s3://b/x"``.
    """
    return to_uri(uri, filesystem(uri, options)[1])


def location(uri: str) -> str:
    """The place ``uri`` names, spelt one way for every spelling of it, to tell whether two URIs name the
    same place or one lies inside the other (``location(a).startswith(location(b) + "/")``).

    A local path (plain or ``file://``) is resolved: absolute, ``..`` and symlinks followed. An object
    store's path is taken literally under its scheme, ``s3a`` spelt ``s3``. Trailing slashes are
    dropped. No filesystem is opened, so no option is needed: ``s3://b/x`` on two endpoints is one place.
    """
    protocol, rest = split_uri(uri)
    if protocol in _LOCAL_PROTOCOLS:
        return os.path.realpath(rest)
    return f"{'s3' if protocol in _S3_PROTOCOLS else protocol}://{rest.rstrip('/')}"


def relation(uri: str, other: str) -> str:
    """How the place uri names stands to other's (:func:`location`): "is the same place as", "is inside",
    "holds", or "" when they are apart."""
    place, other_place = location(uri), location(other)
    if place == other_place:
        return "is the same place as"
    if place.startswith(other_place.rstrip("/") + "/"):
        return "is inside"
    if other_place.startswith(place.rstrip("/") + "/"):
        return "holds"
    return ""


def exists(uri: str, options: StorageOptions = None) -> bool:
    """True if ``uri`` names a file or a folder/prefix holding files."""
    fs, path = filesystem(uri, options)

    def check() -> bool:
        # A listing cached earlier in this process (s3fs keeps one) may be stale.
        fs.invalidate_cache(path)
        return fs.exists(path)

    return retrying(check, uri, "check")


def read_bytes(uri: str, options: StorageOptions = None) -> bytes:
    """The whole content of the file ``uri``.

    A missing file is a FileNotFoundError naming it; a local path that is not
    a regular file (a folder, FIFO, device or socket) is an OSError naming it,
    raised without waiting on it. Transient failures are retried, then raise
    :class:`TransientStorageError`.
    """
    fs, path = filesystem(uri, options)

    def read() -> bytes:
        try:
            return _read_local(path, uri) if is_local(uri) else fs.cat_file(path)
        except FileNotFoundError:
            raise FileNotFoundError(
                errno.ENOENT, "No such file (check the path; if it was listed, it was deleted since)", redact(uri)
            ) from None

    return retrying(read, uri, "read")


def read_text(uri: str, options: StorageOptions = None) -> str:
    """The file ``uri`` decoded as UTF-8; undecodable bytes are a ValueError naming it."""
    data = read_bytes(uri, options)
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"{redact(uri)} is not UTF-8 text ({e.reason} at byte {e.start})") from None


def write_bytes(uri: str, data: bytes, options: StorageOptions = None) -> None:
    """Write ``data`` to ``uri`` atomically, replacing any existing file.

    A reader sees either the old file or the whole new one, never a part.
    Local files go to a temp file in the same folder, are fsynced, then
    renamed over the target (parent folders are created). Object stores get a
    single PUT, which is atomic already.
    """
    fs, path = filesystem(uri, options)
    if is_local(uri):
        retrying(lambda: _replace_local(path, _write_temp(path, data)), uri, "write")
        return

    def put() -> None:
        try:
            fs.pipe_file(path, data)
        except FileNotFoundError as e:  # e.g. the bucket does not exist
            raise FileNotFoundError(errno.ENOENT, f"Cannot write ({e})", redact(uri)) from None

    retrying(put, uri, "write")


def create_exclusive(uri: str, data: bytes, options: StorageOptions = None) -> bool:
    """Create the file ``uri`` holding ``data`` unless it exists; True if this call created it.

    Atomic: of any number of concurrent callers (threads, processes, hosts)
    exactly one gets True, and a reader sees the whole content or no file.
    Local files are written to a temp file and hard-linked into place
    (``link`` fails if the name exists). Object stores get a conditional PUT
    (``If-None-Match: *``, s3fs ``mode="create"``): AWS S3, MinIO and moto
    honour it. A store that ignores the condition lets the last writer win;
    :func:`spade_batch.formats.locks.acquire_lock` reads its lock back to catch that.
    A retried PUT whose first try did land answers False: callers that need
    to know compare the content (the lock keeps a unique token for this).
    """
    fs, path = filesystem(uri, options)
    if is_local(uri):
        return retrying(lambda: _link_local(path, _write_temp(path, data)), uri, "create")

    def put() -> bool:
        try:
            fs.pipe_file(path, data, mode="create")
        except FileExistsError:
            return False
        except FileNotFoundError as e:  # e.g. the bucket does not exist
            raise FileNotFoundError(errno.ENOENT, f"Cannot create ({e})", redact(uri)) from None
        return True

    return retrying(put, uri, "create")


def write_text(uri: str, text: str, options: StorageOptions = None) -> None:
    """Write ``text`` as UTF-8, atomically (see :func:`write_bytes`)."""
    write_bytes(uri, text.encode("utf-8"), options)


def write_npy(uri: str, array: np.ndarray, options: StorageOptions = None) -> None:
    """Write an array as a .npy file, atomically (see :func:`write_bytes`)."""
    buffer = io.BytesIO()
    np.save(buffer, array)
    write_bytes(uri, buffer.getvalue(), options)


def read_npy(uri: str, options: StorageOptions = None) -> np.ndarray:
    return np.load(io.BytesIO(read_bytes(uri, options)))


def remove(uri: str, options: StorageOptions = None, recursive: bool = False) -> None:
    """Delete the file ``uri`` (or the whole folder/prefix if ``recursive``); missing is fine."""
    fs, path = filesystem(uri, options)

    def rm() -> None:
        with contextlib.suppress(FileNotFoundError):
            fs.rm(path, recursive=recursive)

    retrying(rm, uri, "remove")


def to_uri(like: str, path: str) -> str:
    """``path`` (a path inside the filesystem of ``like``) as a URI with the scheme of ``like``."""
    protocol = split_uri(like)[0]
    return path if protocol is None else f"{protocol}://{path}"


def _read_local(path: str, uri: str) -> bytes:
    """The content of the regular file ``path``; anything else is refused before it can block."""
    # O_NONBLOCK: opening a FIFO without a writer would otherwise wait forever.
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    try:
        mode = os.fstat(fd).st_mode
    except BaseException:
        os.close(fd)
        raise
    if not stat.S_ISREG(mode):
        os.close(fd)
        if stat.S_ISDIR(mode):
            raise IsADirectoryError(errno.EISDIR, "Is a folder, not a file; give a file", redact(uri))
        raise OSError(errno.EINVAL, "Not a regular file (a FIFO, device or socket); remove it from the image set", redact(uri))
    with os.fdopen(fd, "rb") as f:
        return f.read()


def _write_temp(path: str, data: bytes | BinaryIO) -> str:
    """A complete, fsynced temp file holding ``data`` (bytes, or a file to copy) in the folder of ``path``."""
    folder = os.path.dirname(path)
    os.makedirs(folder, exist_ok=True)
    # The ".tmp" suffix keeps half-written files out of suffix-filtered listings.
    try:
        fd, tmp = tempfile.mkstemp(dir=folder, prefix=f".{os.path.basename(path)}.", suffix=".tmp")
    except OSError as error:  # a folder that cannot be written: name it, not a temp file that never existed
        raise type(error)(error.errno, error.strerror, folder) from None
    try:
        with os.fdopen(fd, "wb") as f:
            if hasattr(data, "read"):
                shutil.copyfileobj(data, f)
            else:
                f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_UMASK)
    except BaseException:
        _unlink_quietly(tmp)
        raise
    return tmp


def _replace_local(path: str, tmp: str) -> None:
    try:
        os.replace(tmp, path)
    except BaseException:
        _unlink_quietly(tmp)
        raise


def _link_local(path: str, tmp: str) -> bool:
    try:
        os.link(tmp, path)
    except FileExistsError:
        return False
    finally:
        _unlink_quietly(tmp)
    return True


def _unlink_quietly(path: str) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)


def put_file(local_path: str, uri: str, options: StorageOptions = None) -> None:
    """Copy the local file ``local_path`` to ``uri``, streamed (object stores get a multipart upload).

    Local targets are replaced atomically, like :func:`write_bytes`; transient faults are retried.
    """
    fs, path = filesystem(uri, options)
    if is_local(uri):

        def copy() -> None:
            with open(local_path, "rb") as source:
                _replace_local(path, _write_temp(path, source))

        retrying(copy, uri, "write")
        return
    retrying(lambda: fs.put_file(local_path, path), uri, "write")


def copy_file(source: str, target: str, options: StorageOptions = None) -> None:
    """Copy the file ``source`` to ``target`` on the same store, without bringing its bytes through this process where
    the store allows: a local target is a hard link to the source (a copy across file systems), put in place
    atomically; an object store copies server-side. For files never rewritten in place (a model version's arrays).
    """
    fs, path = filesystem(target, options)
    source_path = filesystem(source, options)[1]
    if is_local(target):

        def link() -> None:
            os.makedirs(os.path.dirname(path), exist_ok=True)
            tmp = os.path.join(os.path.dirname(path), f".{os.path.basename(path)}.{os.getpid()}.link.tmp")
            _unlink_quietly(tmp)
            try:
                os.link(source_path, tmp)
            except OSError:  # another file system, or one without hard links
                with open(source_path, "rb") as data:
                    tmp = _write_temp(path, data)
            _replace_local(path, tmp)

        retrying(link, target, "write")
        return
    retrying(lambda: fs.copy(source_path, path), target, "write")


def get_file(uri: str, local_path: str, options: StorageOptions = None) -> None:
    """Copy the file ``uri`` to the local path ``local_path``, streamed; a missing file is a FileNotFoundError naming it."""
    fs, path = filesystem(uri, options)
    try:
        retrying(lambda: fs.get_file(path, local_path), uri, "read")
    except FileNotFoundError:
        raise FileNotFoundError(errno.ENOENT, "No such file", redact(uri)) from None
