"""Files named by URIs: list, read, atomic write, join, remove.

A URI is a local path (``data/x.png``, ``/abs/x.png``), a ``file://`` URL or
any fsspec URL (``s3://bucket/key``, ``memory://...``). ``options`` is the
fsspec storage options dict for that filesystem, passed to
``fsspec.core.url_to_fs(uri, **options)``; for S3 it holds s3fs's ``key``,
``secret``, ``client_kwargs={"endpoint_url": ...}``. Options never appear in
error messages, and user:password parts of URIs are masked there.
"""

from __future__ import annotations

import contextlib
import errno
import io
import os
import re
import shutil
import tempfile
from collections.abc import Mapping
from typing import Any

import fsspec
import numpy as np
from fsspec.core import split_protocol, url_to_fs

StorageOptions = Mapping[str, Any] | None

_LOCAL_PROTOCOLS = (None, "file", "local")

# The umask can only be read by setting it, so read it once at import time,
# before any worker threads exist. Temp files are created 0600; the final file
# gets the mode a plain open() would have given it.
_UMASK = os.umask(0o022)
os.umask(_UMASK)


def filesystem(uri: str, options: StorageOptions = None) -> tuple[fsspec.AbstractFileSystem, str]:
    """The filesystem serving ``uri`` and the path of ``uri`` inside it.

    Local paths come back absolute, object-store paths as ``bucket/key``;
    trailing slashes are dropped.
    """
    return url_to_fs(uri, **dict(options or {}))


def is_local(uri: str) -> bool:
    """True for plain paths and ``file://`` / ``local://`` URLs."""
    return split_protocol(uri)[0] in _LOCAL_PROTOCOLS


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


def exists(uri: str, options: StorageOptions = None) -> bool:
    """True if ``uri`` names a file or a folder/prefix holding files."""
    fs, path = filesystem(uri, options)
    # A listing cached earlier in this process (s3fs keeps one) may be stale.
    fs.invalidate_cache(path)
    return fs.exists(path)


def read_bytes(uri: str, options: StorageOptions = None) -> bytes:
    """The whole content of the file ``uri``; a missing file is a FileNotFoundError naming it."""
    fs, path = filesystem(uri, options)
    try:
        return fs.cat_file(path)
    except FileNotFoundError:
        raise FileNotFoundError(errno.ENOENT, "No such file", _redact(uri)) from None


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
        _write_local_atomic(path, data)
        return
    try:
        fs.pipe_file(path, data)
    except FileNotFoundError as e:  # e.g. the bucket does not exist
        raise FileNotFoundError(errno.ENOENT, f"Cannot write ({e})", _redact(uri)) from None


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
    """All files under the folder/prefix ``uri``, recursively, sorted.

    Results are full URIs in the form of :func:`normalize` (same scheme as
    ``uri``; absolute paths for local input). ``suffixes`` keeps only names
    ending in one of them, ignoring case. A missing folder/prefix gives ``[]``
    (a missing bucket is a FileNotFoundError); a ``uri`` naming one file gives
    that file.
    """
    fs, path = filesystem(uri, options)
    try:
        found = fs.find(path)
    except FileNotFoundError as e:
        raise FileNotFoundError(errno.ENOENT, f"Cannot list ({e})", _redact(uri)) from None
    if suffixes is not None:
        wanted = tuple(s.lower() for s in suffixes)
        found = [p for p in found if p.lower().endswith(wanted)]
    return sorted(_to_uri(uri, p) for p in found)


def remove(uri: str, options: StorageOptions = None, recursive: bool = False) -> None:
    """Delete the file ``uri`` (or the whole folder/prefix if ``recursive``); missing is fine."""
    fs, path = filesystem(uri, options)
    with contextlib.suppress(FileNotFoundError):
        fs.rm(path, recursive=recursive)


def _to_uri(like: str, path: str) -> str:
    """``path`` (a path inside the filesystem of ``like``) as a URI with the scheme of ``like``."""
    protocol = split_protocol(like)[0]
    return path if protocol is None else f"{protocol}://{path}"


def _write_local_atomic(path: str, data: bytes) -> None:
    folder = os.path.dirname(path)
    os.makedirs(folder, exist_ok=True)
    # The ".tmp" suffix keeps half-written files out of suffix-filtered listings.
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=f".{os.path.basename(path)}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_UMASK)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def _redact(uri: str) -> str:
    """``uri`` with any ``user:password@`` part masked, for error messages."""
    return re.sub(r"^([A-Za-z][\w+.-]*://)[^/@]*@", r"\1***@", uri)


def put_file(local_path: str, uri: str, options: StorageOptions = None) -> None:
    """Copy the local file ``local_path`` to ``uri``, streamed (object stores get a multipart upload).

    Local targets are replaced atomically, like :func:`write_bytes`.
    """
    fs, path = filesystem(uri, options)
    if is_local(uri):
        folder = os.path.dirname(path)
        os.makedirs(folder, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=folder, prefix=f".{os.path.basename(path)}.", suffix=".tmp")
        os.close(fd)
        try:
            shutil.copyfile(local_path, tmp)
            os.chmod(tmp, 0o666 & ~_UMASK)
            os.replace(tmp, path)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
            raise
        return
    fs.put_file(local_path, path)


def get_file(uri: str, local_path: str, options: StorageOptions = None) -> None:
    """Copy the file ``uri`` to the local path ``local_path``, streamed; a missing file is a FileNotFoundError naming it."""
    fs, path = filesystem(uri, options)
    try:
        fs.get_file(path, local_path)
    except FileNotFoundError:
        raise FileNotFoundError(errno.ENOENT, "No such file", _redact(uri)) from None
