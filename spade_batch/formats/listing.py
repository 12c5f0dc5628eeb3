"""What a folder or prefix holds: its files, recursively, each with a cheap sign of its content (a fingerprint: the
ETag, or size and modification time), as one listing gives them; and one file's info."""

from __future__ import annotations

import errno
from collections.abc import Mapping
from typing import Any

from spade_batch.formats import storage
from spade_batch.formats.text import redact


def list_files(
    uri: str, suffixes: tuple[str, ...] | None = None, options: storage.StorageOptions = None
) -> list[str]:
    """All files under the folder/prefix ``uri``, recursively, sorted: the URIs of :func:`list_entries`."""
    return list(list_entries(uri, suffixes, options))


def list_entries(uri: str, suffixes: tuple[str, ...] | None = None, options: storage.StorageOptions = None) -> dict[str, str]:
    """All files under the folder/prefix ``uri``, recursively, sorted, each with its :func:`fingerprint`.

    Results are full URIs in the form of :func:`storage.normalize` (same scheme as
    ``uri``; absolute paths for local input). ``suffixes`` keeps only names
    ending in one of them, ignoring case. A missing folder/prefix gives ``{}``
    (a missing bucket is a FileNotFoundError); a ``uri`` naming one file gives
    that file. The fingerprints come with the listing: no request per file.
    """
    fs, path = storage.filesystem(uri, options)

    def find() -> dict[str, dict[str, Any]]:
        try:
            return fs.find(path, detail=True)
        except FileNotFoundError as e:
            raise FileNotFoundError(errno.ENOENT, f"Cannot list ({e})", redact(uri)) from None

    found = storage.retrying(find, uri, "list")
    if suffixes is not None:
        wanted = tuple(s.lower() for s in suffixes)
        found = {p: info for p, info in found.items() if p.lower().endswith(wanted)}
    return {storage.to_uri(uri, p): fingerprint(found[p]) for p in sorted(found)}


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


def info(uri: str, options: storage.StorageOptions = None) -> dict[str, Any]:
    """The fsspec info of the file ``uri`` (size, and what :func:`fingerprint` reads): one request on an
    object store, a stat locally. A missing file is a FileNotFoundError naming it."""
    fs, path = storage.filesystem(uri, options)

    def look() -> dict[str, Any]:
        fs.invalidate_cache(path)  # a listing cached earlier in this process (s3fs keeps one) may be stale
        try:
            return fs.info(path)
        except FileNotFoundError:
            raise FileNotFoundError(errno.ENOENT, "No such file", redact(uri)) from None

    return storage.retrying(look, uri, "check")
