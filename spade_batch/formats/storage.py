"""Files named by URIs: list, read, atomic and exclusive write, join, remove, retries.

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

Every call is retried when it fails for a transient reason (throttling, 5xx,
connection reset, timeout; see :func:`is_transient`), with exponential
backoff, :data:`RETRY` attempts in all (s3fs and botocore retry inside one
attempt too). What still fails transiently raises
:class:`TransientStorageError`: a plain re-run retries it, and it never means
that the file is bad or missing.

The environment variable ``SPADE_BATCH_RETRY`` sets that policy, as
comma-separated ``key=value`` pairs of :class:`RetryPolicy`'s fields, e.g.
``SPADE_BATCH_RETRY="attempts=3,first_delay_s=0.01,max_delay_s=0.02"`` (a key
left out keeps its default; unset or empty: the defaults). Each process reads
it once, when it imports this module, and a malformed value is an error naming
the variable. Ray workers started by a local ``ray.init`` inherit the driver's
environment; on a cluster, set it on every node or in the job's
``runtime_env={"env_vars": ...}``.
"""

from __future__ import annotations

import contextlib
import errno
import io
import logging
import os
import random
import re
import shutil
import stat
import tempfile
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, BinaryIO, TypeVar

import aiohttp
import botocore.exceptions
import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from fsspec.exceptions import FSTimeoutError

StorageOptions = Mapping[str, Any] | None
T = TypeVar("T")

log = logging.getLogger(__name__)

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
        f"storage option {match.group(1)!r} is not one that {protocol}:// storage takes ({first_line(error)}); "
        "check its spelling in storage_options (--storage-options or the config file's storage: section)"
    )


class TransientStorageError(OSError):
    """A storage call that still failed for a transient reason after every retry.

    Throttling, a 5xx answer, a reset connection or a timeout: the object may
    be fine, the store was not. Re-running the same command retries it. The
    ``filename`` is the URI (passwords masked) and ``__cause__`` the last error.
    """


@dataclass(frozen=True)
class RetryPolicy:
    """Attempts per storage call, and the exponential backoff between them.

    The n-th wait (n = 1, 2, ...) is ``first_delay_s * 2 ** (n - 1)``, capped at
    ``max_delay_s``, times a random factor in [0.5, 1] so that workers
    throttled together do not retry together.
    """

    attempts: int = 4
    first_delay_s: float = 0.5
    max_delay_s: float = 8.0

    def __post_init__(self) -> None:
        if self.attempts < 1 or not 0 <= self.first_delay_s <= self.max_delay_s:
            raise ValueError(f"retry policy needs attempts >= 1 and 0 <= first_delay_s <= max_delay_s, got {self}")

    def delay(self, failed_attempts: int) -> float:
        """Seconds to wait after ``failed_attempts`` failures in a row."""
        return min(self.first_delay_s * 2 ** (failed_attempts - 1), self.max_delay_s) * random.uniform(0.5, 1.0)


RETRY_ENV = "SPADE_BATCH_RETRY"


def retry_policy_from(text: str | None) -> RetryPolicy:
    """The policy ``text`` (a ``SPADE_BATCH_RETRY`` value) asks for: ``key=value`` pairs, comma-separated,
    of ``attempts`` (an integer), ``first_delay_s`` and ``max_delay_s`` (finite seconds); ``None`` or
    blank: the defaults. ValueError naming the variable for anything else."""
    if text is None or not text.strip():
        return RetryPolicy()
    types = {"attempts": int, "first_delay_s": float, "max_delay_s": float}
    values: dict[str, Any] = {}
    for item in text.split(","):
        key, equals, value = (part.strip() for part in item.partition("="))
        if not equals or key not in types:
            raise ValueError(f"{RETRY_ENV}={text!r}: {item.strip()!r} is not attempts=N, first_delay_s=S or max_delay_s=S")
        if key in values:
            raise ValueError(f"{RETRY_ENV}={text!r}: {key} is given twice")
        try:
            values[key] = types[key](value)
        except ValueError:
            raise ValueError(f"{RETRY_ENV}={text!r}: {key} must be {'an integer' if key == 'attempts' else 'a number of seconds'}, "
                             f"got {value!r}") from None
        if not np.isfinite(values[key]):
            raise ValueError(f"{RETRY_ENV}={text!r}: {key} must be finite, got {value!r}")
    try:
        return RetryPolicy(**values)
    except ValueError as error:
        raise ValueError(f"{RETRY_ENV}={text!r}: {error}") from None


RETRY = retry_policy_from(os.environ.get(RETRY_ENV))
"""The policy every call in this module uses: by default about 7 s of waiting in all, on top of s3fs's
own retries; ``SPADE_BATCH_RETRY`` in the environment changes it (:func:`retry_policy_from`)."""

_TRANSIENT_ERRNOS = frozenset(
    {errno.EBUSY, errno.EAGAIN, errno.ETIMEDOUT, errno.ECONNRESET, errno.ECONNABORTED, errno.EPIPE, errno.EREMOTEIO}
)
_TRANSIENT_CODES = frozenset(
    {
        "SlowDown", "Throttling", "ThrottlingException", "ThrottledException", "RequestLimitExceeded",
        "TooManyRequestsException", "RequestThrottled", "RequestTimeout", "InternalError", "ServiceUnavailable",
    }
)
_PERMANENT = (FileNotFoundError, FileExistsError, PermissionError, IsADirectoryError, NotADirectoryError)
_TRANSIENT_TYPES = (
    TimeoutError,  # socket.timeout and asyncio.TimeoutError too
    ConnectionError,  # reset, aborted, refused, broken pipe
    FSTimeoutError,
    botocore.exceptions.HTTPClientError,  # connection closed, read timeout
    botocore.exceptions.ConnectionError,  # endpoint unreachable, connect timeout
    botocore.exceptions.IncompleteReadError,
    botocore.exceptions.ResponseStreamingError,
    aiohttp.ClientConnectionError,
    aiohttp.ClientPayloadError,
)


def is_transient(error: BaseException) -> bool:
    """True if ``error`` is a failure that a later retry may not meet: throttling, 5xx, reset, timeout.

    Looks through the chain of causes (s3fs turns a botocore error into an
    OSError caused by it). A missing file, a refused permission, a file that
    already exists, or bad content are never transient.
    """
    seen: set[int] = set()
    current: BaseException | None = error
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, TransientStorageError):
            return True
        if isinstance(current, _PERMANENT):
            return False
        if isinstance(current, _TRANSIENT_TYPES):
            return True
        if isinstance(current, botocore.exceptions.ClientError):
            response = current.response or {}
            status = response.get("ResponseMetadata", {}).get("HTTPStatusCode") or 0
            return response.get("Error", {}).get("Code") in _TRANSIENT_CODES or status >= 500 or status == 429
        if isinstance(current, OSError) and current.errno in _TRANSIENT_ERRNOS:
            return True
        current = current.__cause__ or current.__context__
    return False


def _retrying(action: Callable[[], T], uri: str, what: str) -> T:
    """``action()``, retried under :data:`RETRY` while it fails transiently; then TransientStorageError."""
    policy = RETRY
    for attempt in range(1, policy.attempts + 1):
        try:
            return action()
        except TypeError as error:  # a filesystem connects on its first call: a misspelt option fails here
            raise _option_error(error, uri) from error
        except Exception as error:
            if not is_transient(error):
                raise
            reason = f"{type(error).__name__}: {first_line(error)}"
            if attempt == policy.attempts:
                raise TransientStorageError(
                    errno.EAGAIN,
                    f"Cannot {what}: still failing for a transient reason after {attempt} attempts ({reason}); "
                    "the store is throttling, overloaded or unreachable. Re-run the same command to retry",
                    _redact(uri),
                ) from error
            delay = policy.delay(attempt)
            log.warning("%s %s: transient failure (%s); attempt %d of %d in %.1f s", what, _redact(uri), reason, attempt + 1, policy.attempts, delay)
            time.sleep(delay)
    raise AssertionError("unreachable: RetryPolicy.attempts >= 1")


def first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else "no message"


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
        raise ValueError(f"{_redact(uri)}: {problem}")
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
    """``uri`` in the form :func:`list_files` returns.

    Local paths become absolute, the scheme of a URL is kept, trailing slashes
    are dropped: ``normalize("s3://b/x/") == "s3://b/x"``.
    """
    return _to_uri(uri, filesystem(uri, options)[1])


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

    return _retrying(check, uri, "check")


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
                errno.ENOENT, "No such file (check the path; if it was listed, it was deleted since)", _redact(uri)
            ) from None

    return _retrying(read, uri, "read")


class DamagedPartError(ValueError):
    """A part file (features or scores, one per batch) that cannot be read; the message names it and what to do."""


def damaged_part(uri: str, error: BaseException) -> DamagedPartError:
    return DamagedPartError(
        f"part file {_redact(uri)} is damaged ({type(error).__name__}: {first_line(error)}); "
        "delete it and re-run the same command: the images it held are processed again"
    )


def read_part(uri: str, options: StorageOptions = None, columns: list[str] | None = None, schema: pa.Schema | None = None) -> pa.Table:
    """The Parquet table of a part file a run wrote: only `columns` when given, read as `schema` when given.

    Parts are written atomically, so a damaged one was damaged afterwards (a copy cut short, flipped
    bits, an edit by hand): that raises DamagedPartError. Pages are checked against the CRC the
    writers store with them, so damage that leaves the file readable Parquet is caught too.
    """
    data = read_bytes(uri, options)
    try:
        # An Arrow buffer, not io.BytesIO: after a threaded read through a Python file object, pyarrow's thread pool
        # can abort the interpreter at exit ("terminate called without an active exception", apache/arrow#50482).
        return pq.read_table(pa.BufferReader(data), columns=columns, schema=schema, page_checksum_verification=True)
    except (pa.ArrowException, OSError, ValueError) as error:
        raise damaged_part(uri, error) from error


def write_part(uri: str, table: pa.Table, options: StorageOptions = None) -> None:
    """Write a part file atomically (see :func:`write_bytes`), its pages with the CRCs :func:`read_part` checks."""
    buffer = io.BytesIO()
    pq.write_table(table, buffer, write_page_checksum=True)
    write_bytes(uri, buffer.getvalue(), options)


def read_text(uri: str, options: StorageOptions = None) -> str:
    """The file ``uri`` decoded as UTF-8; undecodable bytes are a ValueError naming it."""
    data = read_bytes(uri, options)
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"{_redact(uri)} is not UTF-8 text ({e.reason} at byte {e.start})") from None


def write_bytes(uri: str, data: bytes, options: StorageOptions = None) -> None:
    """Write ``data`` to ``uri`` atomically, replacing any existing file.

    A reader sees either the old file or the whole new one, never a part.
    Local files go to a temp file in the same folder, are fsynced, then
    renamed over the target (parent folders are created). Object stores get a
    single PUT, which is atomic already.
    """
    fs, path = filesystem(uri, options)
    if is_local(uri):
        _retrying(lambda: _replace_local(path, _write_temp(path, data)), uri, "write")
        return

    def put() -> None:
        try:
            fs.pipe_file(path, data)
        except FileNotFoundError as e:  # e.g. the bucket does not exist
            raise FileNotFoundError(errno.ENOENT, f"Cannot write ({e})", _redact(uri)) from None

    _retrying(put, uri, "write")


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
        return _retrying(lambda: _link_local(path, _write_temp(path, data)), uri, "create")

    def put() -> bool:
        try:
            fs.pipe_file(path, data, mode="create")
        except FileExistsError:
            return False
        except FileNotFoundError as e:  # e.g. the bucket does not exist
            raise FileNotFoundError(errno.ENOENT, f"Cannot create ({e})", _redact(uri)) from None
        return True

    return _retrying(put, uri, "create")


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


def list_files(
    uri: str, suffixes: tuple[str, ...] | None = None, options: StorageOptions = None
) -> list[str]:
    """All files under the folder/prefix ``uri``, recursively, sorted: the URIs of :func:`list_entries`."""
    return list(list_entries(uri, suffixes, options))


def list_entries(uri: str, suffixes: tuple[str, ...] | None = None, options: StorageOptions = None) -> dict[str, str]:
    """All files under the folder/prefix ``uri``, recursively, sorted, each with its :func:`fingerprint`.

    Results are full URIs in the form of :func:`normalize` (same scheme as
    ``uri``; absolute paths for local input). ``suffixes`` keeps only names
    ending in one of them, ignoring case. A missing folder/prefix gives ``{}``
    (a missing bucket is a FileNotFoundError); a ``uri`` naming one file gives
    that file. The fingerprints come with the listing: no request per file.
    """
    fs, path = filesystem(uri, options)

    def find() -> dict[str, dict[str, Any]]:
        try:
            return fs.find(path, detail=True)
        except FileNotFoundError as e:
            raise FileNotFoundError(errno.ENOENT, f"Cannot list ({e})", _redact(uri)) from None

    found = _retrying(find, uri, "list")
    if suffixes is not None:
        wanted = tuple(s.lower() for s in suffixes)
        found = {p: info for p, info in found.items() if p.lower().endswith(wanted)}
    return {_to_uri(uri, p): fingerprint(found[p]) for p in sorted(found)}


_MODIFIED = ("mtime", "LastModified", "last_modified", "updated")
"""Keys of a modification time in the file info of fsspec's filesystems (local, S3, Azure, GCS)."""


def fingerprint(info: Mapping[str, Any]) -> str:
    """A cheap sign of a file's content, from its fsspec info (a listing's entry): the ETag an object store
    gives it, else its size and modification time; "" when the info holds neither (never treated as a change).

    Another content under the same name gives another fingerprint (an ETag is the content's hash; a local
    rewrite moves the modification time); rewriting the same bytes may too, which costs a re-score, nothing more.
    """
    etag = info.get("ETag") or info.get("etag")
    if etag:
        return f"etag {str(etag).strip(chr(34))}"
    modified = next((info[key] for key in _MODIFIED if info.get(key) is not None), None)
    if info.get("size") is None or modified is None:
        return ""
    return f"size {info['size']} modified {modified}"


def info(uri: str, options: StorageOptions = None) -> dict[str, Any]:
    """The fsspec info of the file ``uri`` (size, and what :func:`fingerprint` reads): one request on an
    object store, a stat locally. A missing file is a FileNotFoundError naming it."""
    fs, path = filesystem(uri, options)

    def look() -> dict[str, Any]:
        fs.invalidate_cache(path)  # a listing cached earlier in this process (s3fs keeps one) may be stale
        try:
            return fs.info(path)
        except FileNotFoundError:
            raise FileNotFoundError(errno.ENOENT, "No such file", _redact(uri)) from None

    return _retrying(look, uri, "check")


def remove(uri: str, options: StorageOptions = None, recursive: bool = False) -> None:
    """Delete the file ``uri`` (or the whole folder/prefix if ``recursive``); missing is fine."""
    fs, path = filesystem(uri, options)

    def rm() -> None:
        with contextlib.suppress(FileNotFoundError):
            fs.rm(path, recursive=recursive)

    _retrying(rm, uri, "remove")


def _to_uri(like: str, path: str) -> str:
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
            raise IsADirectoryError(errno.EISDIR, "Is a folder, not a file; give a file", _redact(uri))
        raise OSError(errno.EINVAL, "Not a regular file (a FIFO, device or socket); remove it from the image set", _redact(uri))
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


def _redact(uri: str) -> str:
    """``uri`` with any ``user:password@`` part masked, for error messages."""
    return re.sub(r"^([A-Za-z][\w+.-]*://)[^/@]*@", r"\1***@", uri)


def put_file(local_path: str, uri: str, options: StorageOptions = None) -> None:
    """Copy the local file ``local_path`` to ``uri``, streamed (object stores get a multipart upload).

    Local targets are replaced atomically, like :func:`write_bytes`; transient faults are retried.
    """
    fs, path = filesystem(uri, options)
    if is_local(uri):

        def copy() -> None:
            with open(local_path, "rb") as source:
                _replace_local(path, _write_temp(path, source))

        _retrying(copy, uri, "write")
        return
    _retrying(lambda: fs.put_file(local_path, path), uri, "write")


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

        _retrying(link, target, "write")
        return
    _retrying(lambda: fs.copy(source_path, path), target, "write")


def get_file(uri: str, local_path: str, options: StorageOptions = None) -> None:
    """Copy the file ``uri`` to the local path ``local_path``, streamed; a missing file is a FileNotFoundError naming it."""
    fs, path = filesystem(uri, options)
    try:
        _retrying(lambda: fs.get_file(path, local_path), uri, "read")
    except FileNotFoundError:
        raise FileNotFoundError(errno.ENOENT, "No such file", _redact(uri)) from None
