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

Ids are normalised (empty and ``.`` segments dropped, so ``a//./b.png`` is
``a/b.png``) and checked before any work: an image whose name cannot be
represented safely (empty, a ``..`` segment, control characters, not UTF-8,
a segment too long for a file name, a key the store cannot address
literally) or whose outputs would collide with another image's (same
:func:`output_stem`, or one's output file where the other needs a folder) is
not processed but listed in ``Manifest.rejected`` with the reason, so that it
gets an error row of its own and the run goes on. Of colliding images the
first by (id, canonical name first, URI) is kept. An entry listed twice with
the same URI is one image. Once the output location is known,
:func:`reject_long_outputs` rejects the images whose output paths would not fit
the store's limit (1,024 bytes for an S3 or GCS key, 4,000 for a local path).

Each image comes with the fingerprint its listing gives (:func:`listing.fingerprint`: an
ETag, or size and modification time), so a re-run sees an image whose content changed under
the same name. Entries of a manifest file are not listed: local ones are fingerprinted by a
stat, those on object storage not at all (that would cost a request per image).
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import os
import posixpath
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import pyarrow as pa
import pyarrow.parquet as pq
from fsspec.utils import glob_translate

from spade_batch.formats import listing, storage
from spade_batch.formats.images import IMAGE_SUFFIXES
from spade_batch.formats.storage import StorageOptions

MANIFEST_SUFFIXES = (".txt", ".csv", ".parquet")
OUTPUT_SUFFIXES = (".png", ".npy")
"""Suffixes of per-image outputs: masks/ and overlays/ ``<stem>.png``, maps/ ``<stem>.npy``."""
MAX_SEGMENT_BYTES = 250
"""Longest part of an id between slashes, in UTF-8 bytes: file systems allow 255, outputs add a suffix."""
MAX_KEY_BYTES = 1024
"""Longest object key S3 and GCS accept, in UTF-8 bytes (AWS answers 400 KeyTooLongError past it)."""
MAX_LOCAL_PATH_BYTES = 4000
"""Longest local output path: Linux allows 4,095 bytes, and a write goes through a temp file named longer."""
_KEY_LIMITED = ("s3", "s3a", "gs", "gcs")
_GLOB_CHARS = re.compile(r"[*?\[]")
_CONTROL_CHARS = re.compile(r"[\x00-\x1f\x7f]")


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
    rejected: tuple[tuple[str, str], ...] = ()
    """(uri, reason) of listed images that are not processed; each should become an error row."""
    fingerprints: tuple[str, ...] = ()
    """The fingerprint of each image (``fingerprints[i]`` of ``uris[i]``; "" where unknown), or () when none was taken."""

    def __post_init__(self) -> None:
        if len(self.ids) != len(self.uris):
            raise ValueError(f"manifest has {len(self.ids)} ids but {len(self.uris)} uris")
        if self.fingerprints and len(self.fingerprints) != len(self.ids):
            raise ValueError(f"manifest has {len(self.ids)} ids but {len(self.fingerprints)} fingerprints")
        first_uri: dict[str, str] = {}
        for id_, uri in zip(self.ids, self.uris):
            # Ids become output paths (masks/<id>.png), so they must stay below the output folder.
            if id_problem(id_) or id_ != normalize_id(id_):
                raise ValueError(f"image id {id_!r} of {uri} is not a relative path below {self.root}")
            if id_ in first_uri:
                raise ValueError(
                    f"image id {id_!r} appears twice under {self.root} ({first_uri[id_]} and {uri}); "
                    "list each image once"
                )
            first_uri[id_] = uri

    def __len__(self) -> int:
        return len(self.ids)

    def fingerprint_of(self) -> dict[str, str]:
        """id -> the image's fingerprint ("" where unknown)."""
        return dict(zip(self.ids, self.fingerprints or ("",) * len(self.ids)))

    def sha256(self) -> str:
        """Hex SHA-256 of the ordered (id, uri) list: the compact JSON ``[[id, uri], ...]`` in UTF-8.

        Rejected entries are not part of it: they have no outputs to resume. Fingerprints are not either: an
        image whose content changed is the same image of the same run, scored again (engine.score).
        """
        return pairs_sha256(self.ids, self.uris)

    def shards(self, shard_size: int) -> list[Manifest]:
        """Consecutive slices of at most ``shard_size`` images, in order; the last may be smaller.

        Shards carry no rejected entries: those belong to the whole manifest.
        """
        if shard_size < 1:
            raise ValueError(f"shard_size must be at least 1, got {shard_size}")
        return [
            Manifest(self.root, self.ids[i : i + shard_size], self.uris[i : i + shard_size],
                     fingerprints=self.fingerprints[i : i + shard_size])
            for i in range(0, len(self), shard_size)
        ]


def pairs_sha256(ids: Sequence[str], uris: Sequence[str]) -> str:
    """Hex SHA-256 of the (id, uri) list, in the given order: the compact JSON ``[[id, uri], ...]`` in UTF-8."""
    pairs = json.dumps(list(zip(ids, uris)), ensure_ascii=False, separators=(",", ":"))
    return hashlib.sha256(pairs.encode("utf-8")).hexdigest()


def build_manifest(
    source: str, options: StorageOptions = None, suffixes: tuple[str, ...] = IMAGE_SUFFIXES
) -> Manifest:
    """The manifest of ``source`` (folder/prefix, glob or manifest file; see the module docstring).

    ``suffixes`` selects image files in folders and globs (case-insensitive);
    entries of a manifest file are taken as listed. Raises ValueError when
    nothing is found, FileNotFoundError for a missing manifest file; unsafe
    or colliding names never raise, they go to ``Manifest.rejected`` (so a
    manifest may hold no ids, only rejections). The same inputs always give
    the same manifest.
    """
    if _GLOB_CHARS.search(_path_part(source)):
        return _from_glob(source, options, suffixes)
    if is_manifest_file(source):
        return _from_manifest_file(source, options)
    return _from_folder(source, options, suffixes)


def is_manifest_file(source: str) -> bool:
    """Whether build_manifest reads source as a manifest file (its entries taken as written, nothing listed),
    rather than listing a folder/prefix or a glob's root."""
    return not _GLOB_CHARS.search(_path_part(source)) and source.lower().endswith(MANIFEST_SUFFIXES)


def _from_folder(source: str, options: StorageOptions, suffixes: tuple[str, ...]) -> Manifest:
    root = storage.normalize(source, options)
    entries = listing.list_entries(root, suffixes, options)
    if list(entries) == [root]:
        raise ValueError(
            f"{source} is a single file; give a folder/prefix, a glob, or a manifest file "
            f"({', '.join(MANIFEST_SUFFIXES)})"
        )
    if not entries:
        raise ValueError(f"no image files ({', '.join(suffixes)}) found under {source}; check the path")
    return _sorted_manifest(root, entries)


def _from_glob(source: str, options: StorageOptions, suffixes: tuple[str, ...]) -> Manifest:
    protocol, path = storage.split_uri(source)
    parts = path.split("/")
    first_glob = next(i for i, part in enumerate(parts) if _GLOB_CHARS.search(part))
    root_path = "/".join(parts[:first_glob]) or ("/" if path.startswith("/") else ".")
    root = storage.normalize(f"{protocol}://{root_path}" if protocol else root_path, options)
    pattern = re.compile(glob_translate(storage.normalize(source, options)))
    entries = {u: f for u, f in listing.list_entries(root, suffixes, options).items() if pattern.match(u)}
    if not entries:
        raise ValueError(f"no image files ({', '.join(suffixes)}) match {source}; check the pattern")
    return _sorted_manifest(root, entries)


def _from_manifest_file(source: str, options: StorageOptions) -> Manifest:
    entries = _read_entries(source, options)
    if not entries:
        raise ValueError(f"manifest file {source} lists no images; add one URI per image")
    folder = posixpath.dirname(storage.normalize(source, options))
    uris = [_resolve(entry, folder) for entry in entries]
    protocols = sorted({storage.split_uri(u)[0] or "local path" for u in uris})
    if len(protocols) > 1:
        raise ValueError(f"manifest file {source} mixes storage schemes ({', '.join(protocols)}); use one")
    # commonprefix compares lists element by element: the longest common run of folder names.
    common = os.path.commonprefix([_path_part(u).split("/")[:-1] for u in uris])
    root_path = "/" if common == [""] else "/".join(common)
    protocol = storage.split_uri(uris[0])[0]
    listed = {uri: _local_fingerprint(uri, options) for uri in uris}
    return _sorted_manifest(f"{protocol}://{root_path}" if protocol else root_path, listed)


def _local_fingerprint(uri: str, options: StorageOptions) -> str:
    """A local file's fingerprint (a stat, no request); "" for a remote one, or a file that is not there (its read says so)."""
    if not storage.is_local(uri):
        return ""
    try:
        return listing.fingerprint(listing.info(uri, options))
    except (OSError, ValueError):  # ValueError: a name os.stat refuses (a NUL byte); the manifest rejects it
        return ""


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
        parquet = pq.ParquetFile(pa.BufferReader(storage.read_bytes(source, options)))  # not io.BytesIO: see parquet_parts.read_part
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
    if storage.split_uri(entry)[0] is not None:
        return entry
    if entry.startswith("/"):
        return posixpath.normpath(entry)
    protocol, folder_path = storage.split_uri(folder)
    path = posixpath.normpath(posixpath.join(folder_path, entry))
    return f"{protocol}://{path}" if protocol else path


def _sorted_manifest(root: str, entries: Mapping[str, str]) -> Manifest:
    """The manifest of ``entries`` (URI -> fingerprint, all below ``root``), sorted by id, unsafe and colliding
    names rejected. An entry listed twice is one image (a mapping holds it once)."""
    root_path = _path_part(root).rstrip("/")
    candidates = []
    rejected = []
    for uri in entries:
        raw = _path_part(uri)[len(root_path) :]
        image_id = normalize_id(raw)
        problem = id_problem(image_id) or storage.name_problem(uri)
        if problem:
            rejected.append((uri, problem))
        else:
            candidates.append((image_id, image_id != raw.strip("/"), uri))
    kept: list[tuple[str, str]] = []
    claims = _OutputClaims()
    for image_id, _, uri in sorted(candidates):
        problem = claims.claim(image_id, uri)
        if problem:
            rejected.append((uri, problem))
        else:
            kept.append((image_id, uri))
    return Manifest(root, tuple(i for i, _ in kept), tuple(u for _, u in kept), tuple(sorted(rejected)),
                    tuple(entries[u] for _, u in kept))


def output_path_limit(uri: str) -> tuple[int, str, str]:
    """(bytes, what is measured, the store) of the longest path the store at uri takes: an object key, a local path."""
    protocol = storage.split_uri(uri)[0]
    if protocol in _KEY_LIMITED:
        return MAX_KEY_BYTES, "key", "S3" if protocol.startswith("s3") else "GCS"
    return MAX_LOCAL_PATH_BYTES, "path", "a local file system"


def _measured(uri: str) -> str:
    """The part of an output URI the store limits: an object's key (below the bucket), a local absolute path."""
    protocol, path = storage.split_uri(uri)
    if protocol in _KEY_LIMITED:
        return path.split("/", 1)[1] if "/" in path else ""
    return os.path.abspath(path) if protocol in (None, "file", "local") else path


def reject_long_outputs(manifest: Manifest, outputs_of: Callable[[str], Sequence[str]]) -> Manifest:
    """The manifest less the images an output path of which would not fit the store's limit, each
    rejected with the reason (an error row of its own; the others are processed).

    outputs_of: an id's output URIs (mask, map and overlay under the run's output folder).
    """
    kept: list[tuple[str, str]] = []
    rejected = list(manifest.rejected)
    fingerprints = manifest.fingerprint_of()
    for image_id, uri in zip(manifest.ids, manifest.uris):
        longest = max(outputs_of(image_id), key=lambda out: len(_measured(out).encode("utf-8")))
        size = len(_measured(longest).encode("utf-8"))
        limit, what, store = output_path_limit(longest)
        if size > limit:
            rejected.append((uri, f"its output {longest} would have a {size}-byte {what}, over the {limit:,} bytes "
                                  f"{store} allows; shorten the name, or the output location"))
        else:
            kept.append((image_id, uri))
    if len(kept) == len(manifest):
        return manifest
    return Manifest(manifest.root, tuple(i for i, _ in kept), tuple(u for _, u in kept), tuple(sorted(rejected)),
                    tuple(fingerprints[i] for i, _ in kept))


def normalize_id(raw: str) -> str:
    """``raw`` (a path below the root) with empty and ``.`` segments dropped: ``/a//./b.png`` -> ``a/b.png``."""
    return "/".join(part for part in raw.split("/") if part not in ("", "."))


def id_problem(image_id: str) -> str | None:
    """Why the normalised id ``image_id`` cannot name outputs safely, or None if it can."""
    if not image_id:
        return "the name is empty below the root; list files, not folders"
    if ".." in image_id.split("/"):
        return "the name has a '..' segment, which would put its outputs outside the output folder; rename it"
    if _CONTROL_CHARS.search(image_id):
        return f"the name {image_id!r} holds control characters; rename it"
    try:
        longest = max(len(part.encode("utf-8")) for part in image_id.split("/"))
    except UnicodeEncodeError:
        return f"the name {image_id!r} is not valid UTF-8; rename it"
    if longest > MAX_SEGMENT_BYTES:
        return f"a part of the name is {longest} bytes long, over the {MAX_SEGMENT_BYTES} that output file names allow; rename it"
    return None


def output_stem(image_id: str) -> str:
    """The path of an image's outputs below each output folder, without suffix: the id without its extension.

    ``masks/<stem>.png``, ``overlays/<stem>.png``, ``maps/<stem>.npy``. The
    manifest guarantees distinct stems, and no stem's output file where
    another's outputs need a folder.
    """
    return posixpath.splitext(image_id)[0]


class _OutputClaims:
    """Output paths (below an output folder) claimed so far, as files and as folders, with their claimant."""

    def __init__(self) -> None:
        self.files: dict[str, str] = {}
        self.folders: dict[str, str] = {}

    def claim(self, image_id: str, uri: str) -> str | None:
        """Claim the outputs of ``image_id``; or why they collide with an earlier claim (nothing claimed then)."""
        stem = output_stem(image_id)
        files = [stem + suffix for suffix in OUTPUT_SUFFIXES]
        parts = stem.split("/")
        folders = ["/".join(parts[:n]) for n in range(1, len(parts))]
        for path in files:
            if path in self.files:
                return f"its outputs (masks/{stem}.png) would overwrite those of {self.files[path]}; rename one of them"
            if path in self.folders:
                return f"its output masks/{path} would be a file where {self.folders[path]} needs a folder; rename one of them"
        for folder in folders:
            if folder in self.files:
                return f"its outputs need masks/{folder} to be a folder, but {self.files[folder]} writes a file there; rename one of them"
        self.files.update((path, uri) for path in files)
        self.folders.update((folder, uri) for folder in folders)
        return None


def _path_part(uri: str) -> str:
    return storage.split_uri(uri)[1]
