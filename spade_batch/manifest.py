"""The manifest: the sorted list of images a job processes, and its shards.

A source is one of:

* a folder or prefix (``s3://b/normal/``, ``data/good``): listed recursively
  for image files; ids are paths relative to it;
* a glob (``s3://b/*/good/*.png``, ``data/**/*.jpg``): ``*`` stays inside one
  folder level, ``**`` spans levels; the root is the part before the first
  component holding ``*``, ``?`` or ``[``;
* a manifest file: ``.txt`` (one URI per line; blank lines and ``#`` comments
  skipped), ``.csv`` or ``.parquet`` with a ``uri`` column. Relative entries
  are relative to the manifest's folder; the root is the longest common folder
  of the URIs.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import os
import posixpath
import re
from dataclasses import dataclass

import pyarrow.parquet as pq
from fsspec.core import split_protocol
from fsspec.utils import glob_translate

from spade_batch import storage
from spade_batch.images import IMAGE_SUFFIXES
from spade_batch.storage import StorageOptions

MANIFEST_SUFFIXES = (".txt", ".csv", ".parquet")
_GLOB_CHARS = re.compile(r"[*?\[]")


@dataclass(frozen=True)
class Manifest:
    """Images to process: ``ids[i]`` names the image at ``uris[i]``.

    ``root`` is the URI the ids are relative to; an id is the image's path
    below ``root`` with ``/`` separators, stable across runs, so outputs can be
    written under it (``masks/<id>.png``). :func:`build_manifest` sorts by id.
    """

    root: str
    ids: tuple[str, ...]
    uris: tuple[str, ...]

    def __post_init__(self) -> None:
        if len(self.ids) != len(self.uris):
            raise ValueError(f"manifest has {len(self.ids)} ids but {len(self.uris)} uris")
        first_uri: dict[str, str] = {}
        for id_, uri in zip(self.ids, self.uris):
            # Ids become output paths (masks/<id>.png), so they must stay below the output folder.
            if not id_ or id_.startswith("/") or ".." in id_.split("/"):
                raise ValueError(f"image id {id_!r} of {uri} is not a relative path below {self.root}")
            if id_ in first_uri:
                raise ValueError(
                    f"image id {id_!r} appears twice under {self.root} ({first_uri[id_]} and {uri}); "
                    "list each image once"
                )
            first_uri[id_] = uri

    def __len__(self) -> int:
        return len(self.ids)

    def sha256(self) -> str:
        """Hex SHA-256 of the ordered (id, uri) list: the compact JSON ``[[id, uri], ...]`` in UTF-8."""
        pairs = json.dumps(list(zip(self.ids, self.uris)), ensure_ascii=False, separators=(",", ":"))
        return hashlib.sha256(pairs.encode("utf-8")).hexdigest()

    def shards(self, shard_size: int) -> list[Manifest]:
        """Consecutive slices of at most ``shard_size`` images, in order; the last may be smaller."""
        if shard_size < 1:
            raise ValueError(f"shard_size must be at least 1, got {shard_size}")
        return [
            Manifest(self.root, self.ids[i : i + shard_size], self.uris[i : i + shard_size])
            for i in range(0, len(self), shard_size)
        ]


def build_manifest(
    source: str, options: StorageOptions = None, suffixes: tuple[str, ...] = IMAGE_SUFFIXES
) -> Manifest:
    """The manifest of ``source`` (folder/prefix, glob or manifest file; see the module docstring).

    ``suffixes`` selects image files in folders and globs (case-insensitive);
    entries of a manifest file are taken as listed. Raises ValueError when
    nothing is found or an image is listed twice, FileNotFoundError for a
    missing manifest file. The same inputs always give the same manifest.
    """
    if _GLOB_CHARS.search(_path_part(source)):
        return _from_glob(source, options, suffixes)
    if source.lower().endswith(MANIFEST_SUFFIXES):
        return _from_manifest_file(source, options)
    return _from_folder(source, options, suffixes)


def _from_folder(source: str, options: StorageOptions, suffixes: tuple[str, ...]) -> Manifest:
    root = storage.normalize(source, options)
    uris = storage.list_files(root, suffixes, options)
    if uris == [root]:
        raise ValueError(
            f"{source} is a single file; give a folder/prefix, a glob, or a manifest file "
            f"({', '.join(MANIFEST_SUFFIXES)})"
        )
    if not uris:
        raise ValueError(f"no image files ({', '.join(suffixes)}) found under {source}; check the path")
    return _sorted_manifest(root, uris)


def _from_glob(source: str, options: StorageOptions, suffixes: tuple[str, ...]) -> Manifest:
    protocol, path = split_protocol(source)
    parts = path.split("/")
    first_glob = next(i for i, part in enumerate(parts) if _GLOB_CHARS.search(part))
    root_path = "/".join(parts[:first_glob]) or ("/" if path.startswith("/") else ".")
    root = storage.normalize(f"{protocol}://{root_path}" if protocol else root_path, options)
    pattern = re.compile(glob_translate(storage.normalize(source, options)))
    uris = [u for u in storage.list_files(root, suffixes, options) if pattern.match(u)]
    if not uris:
        raise ValueError(f"no image files ({', '.join(suffixes)}) match {source}; check the pattern")
    return _sorted_manifest(root, uris)


def _from_manifest_file(source: str, options: StorageOptions) -> Manifest:
    entries = _read_entries(source, options)
    if not entries:
        raise ValueError(f"manifest file {source} lists no images; add one URI per image")
    folder = posixpath.dirname(storage.normalize(source, options))
    uris = [_resolve(entry, folder) for entry in entries]
    protocols = sorted({split_protocol(u)[0] or "local path" for u in uris})
    if len(protocols) > 1:
        raise ValueError(f"manifest file {source} mixes storage schemes ({', '.join(protocols)}); use one")
    # commonprefix compares lists element by element: the longest common run of folder names.
    common = os.path.commonprefix([_path_part(u).split("/")[:-1] for u in uris])
    root_path = "/" if common == [""] else "/".join(common)
    protocol = split_protocol(uris[0])[0]
    return _sorted_manifest(f"{protocol}://{root_path}" if protocol else root_path, uris)


def _read_entries(source: str, options: StorageOptions) -> list[str]:
    """The URIs a manifest file lists, as written (stripped), in file order."""
    kind = source.lower().rsplit(".", 1)[-1]
    if kind == "txt":
        lines = (line.strip() for line in storage.read_text(source, options).splitlines())
        return [line for line in lines if line and not line.startswith("#")]
    if kind == "csv":
        text = storage.read_text(source, options).removeprefix("\ufeff")  # spreadsheet byte-order mark
        reader = csv.DictReader(io.StringIO(text))
        _require_uri_column(source, reader.fieldnames or [])
        column = [row["uri"] for row in reader]
    else:
        parquet = pq.ParquetFile(io.BytesIO(storage.read_bytes(source, options)))
        _require_uri_column(source, parquet.schema_arrow.names)
        column = parquet.read(columns=["uri"]).column("uri").to_pylist()
    for row, value in enumerate(column, start=1):
        if not isinstance(value, str) or not value.strip():
            raise ValueError(
                f"manifest file {source}: row {row} has uri {value!r}; give every row a URI or drop the row"
            )
    return [value.strip() for value in column]


def _require_uri_column(source: str, columns: list[str]) -> None:
    if "uri" not in columns:
        raise ValueError(f"manifest file {source} has no 'uri' column (columns: {', '.join(columns) or 'none'})")


def _resolve(entry: str, folder: str) -> str:
    """``entry`` as a URI: relative paths are taken relative to ``folder`` (a normalized URI).

    Local paths are normalized (``a/../b`` -> ``b``); URLs are kept as written,
    since ``..`` in an object key is part of the key.
    """
    if split_protocol(entry)[0] is not None:
        return entry
    if entry.startswith("/"):
        return posixpath.normpath(entry)
    protocol, folder_path = split_protocol(folder)
    path = posixpath.normpath(posixpath.join(folder_path, entry))
    return f"{protocol}://{path}" if protocol else path


def _sorted_manifest(root: str, uris: list[str]) -> Manifest:
    """The manifest of ``uris`` (all below ``root``), sorted by id."""
    root_path = _path_part(root).rstrip("/")
    pairs = sorted((_path_part(uri)[len(root_path) :].lstrip("/"), uri) for uri in uris)
    return Manifest(root, tuple(id_ for id_, _ in pairs), tuple(uri for _, uri in pairs))


def _path_part(uri: str) -> str:
    return split_protocol(uri)[1]
