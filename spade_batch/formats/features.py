"""Parquet schema of extracted features (MODEL_URI/features/part-NNNNN.parquet).

One row per image:

| column      | type                                   | meaning                                        |
|-------------|----------------------------------------|------------------------------------------------|
| id          | string                                 | image id (path relative to the image-set root) |
| uri         | string                                 | where the image was read                       |
| height      | int32                                  | original image height, pixels                  |
| width       | int32                                  | original image width, pixels                   |
| global      | fixed_size_binary[4 * D]               | pooled last-block feature, float32             |
| <layer>     | fixed_size_binary[2 * h * w * C]       | one per pyramid layer, float16, channels last  |
| error       | string                                 | why the image was skipped; features are null   |
| sha256      | string                                 | content_sha256 of the image: what `add` compares when an id comes again (null in parts written before it was recorded) |

Feature values are little-endian bytes, one value per row: `np.frombuffer(row, "<f2").reshape(h, w, C)`.
Stored as lists of floats instead, Parquet would encode a repetition level for every one of the
~100,000 values a row holds: writing a part took twice the CPU and reading it three times.

The schema metadata key `spade_batch` holds JSON: {"schema_version", "layers": [{"name", "height",
"width", "channels"}], "global_dim"}.
"""

from __future__ import annotations

import hashlib
import io
import json
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from spade_batch.formats import parquet_parts, storage

SCHEMA_VERSION = 2
INDEX_SCHEMA = pa.schema([("id", pa.string()), ("uri", pa.string()), ("error", pa.string()), ("height", pa.int32()),
                          ("width", pa.int32()), ("sha256", pa.string())])
"""The small columns of a part that say which images it holds (parts without sha256 read it as null)."""


def content_sha256(content: bytes | np.ndarray) -> str:
    """Hex SHA-256 of an image: its file's bytes, or (in process, where an image has no file) its H x W x 3 uint8 array."""
    if isinstance(content, np.ndarray):
        content = np.ascontiguousarray(content, np.uint8).tobytes() + repr(content.shape).encode()
    return hashlib.sha256(content).hexdigest()


@dataclass(frozen=True)
class LayerShape:
    name: str
    height: int
    width: int
    channels: int

    @property
    def size(self) -> int:
        return self.height * self.width * self.channels


@dataclass
class FeatureTable:
    """Features of a list of images, in manifest order.

    Attributes:
        ids, uris: per image.
        heights, widths: N int32 original sizes in pixels (0 for failed images).
        global_features: N x D float32 (rows of failed images are zero).
        layers: per pyramid layer, N x (h * w) x C float16, channels last (failed rows zero; views of
            the Arrow buffers when read from a part without failed rows).
        layer_shapes: per layer (name, h, w, C).
        errors: per image, None or why it was skipped.
        sha256: per image, its content_sha256 (None: unknown, failed images included).
    """

    ids: list[str]
    uris: list[str]
    heights: np.ndarray
    widths: np.ndarray
    global_features: np.ndarray
    layers: list[np.ndarray]
    layer_shapes: list[LayerShape]
    errors: list[str | None]
    sha256: list[str | None]

    def __len__(self) -> int:
        return len(self.ids)

    def select(self, keep: np.ndarray) -> FeatureTable:
        """The rows where the N bool array `keep` is True, in order."""
        return FeatureTable(
            ids=[i for i, k in zip(self.ids, keep) if k],
            uris=[u for u, k in zip(self.uris, keep) if k],
            heights=self.heights[keep],
            widths=self.widths[keep],
            global_features=self.global_features[keep],
            layers=[layer[keep] for layer in self.layers],
            layer_shapes=self.layer_shapes,
            errors=[e for e, k in zip(self.errors, keep) if k],
            sha256=[h for h, k in zip(self.sha256, keep) if k],
        )

    def valid(self) -> FeatureTable:
        """Only the images that were decoded and extracted."""
        return self.select(np.array([error is None for error in self.errors], dtype=bool))


def to_arrow(features: FeatureTable) -> pa.Table:
    failed = np.array([error is not None for error in features.errors], dtype=bool)
    columns: dict[str, pa.Array] = {
        "id": pa.array(features.ids, pa.string()),
        "uri": pa.array(features.uris, pa.string()),
        "height": pa.array(features.heights.astype(np.int32)),
        "width": pa.array(features.widths.astype(np.int32)),
        "global": _binary_rows(np.asarray(features.global_features, "<f4"), failed),
    }
    for shape, layer in zip(features.layer_shapes, features.layers):
        columns[shape.name] = _binary_rows(np.asarray(layer, "<f2"), failed)
    columns["error"] = pa.array(features.errors, pa.string())
    columns["sha256"] = pa.array(features.sha256, pa.string())
    metadata = {
        "schema_version": SCHEMA_VERSION,
        "layers": [vars(shape) for shape in features.layer_shapes],
        "global_dim": int(features.global_features.shape[1]),
    }
    return pa.table(columns).replace_schema_metadata({"spade_batch": json.dumps(metadata)})


def _binary_rows(values: np.ndarray, null_rows: np.ndarray) -> pa.Array:
    """N x ... array -> N fixed-size binary values, its rows' bytes (no copy); null where null_rows."""
    rows = np.ascontiguousarray(values).reshape(len(values), -1)
    validity = pa.array(~null_rows).buffers()[1] if null_rows.any() else None
    return pa.FixedSizeBinaryArray.from_buffers(pa.binary(rows.shape[1] * rows.itemsize), len(rows), [validity, pa.py_buffer(rows)])


def from_arrow(table: pa.Table) -> FeatureTable:
    metadata = json.loads(table.schema.metadata[b"spade_batch"])
    if metadata["schema_version"] != SCHEMA_VERSION:
        raise ValueError(f"feature schema version {metadata['schema_version']} is not {SCHEMA_VERSION}; re-run fit")
    shapes = [LayerShape(**layer) for layer in metadata["layers"]]
    count = table.num_rows
    return FeatureTable(
        ids=table.column("id").to_pylist(),
        uris=table.column("uri").to_pylist(),
        heights=table.column("height").to_numpy(),
        widths=table.column("width").to_numpy(),
        global_features=_values(table, "global", "<f4", metadata["global_dim"]).copy(),
        layers=[_values(table, s.name, "<f2", s.size).reshape(count, s.height * s.width, s.channels) for s in shapes],
        layer_shapes=shapes,
        errors=table.column("error").to_pylist(),
        sha256=table.column("sha256").to_pylist() if "sha256" in table.column_names else [None] * count,
    )


def _values(table: pa.Table, name: str, dtype: str, width: int) -> np.ndarray:
    """N x width array of a fixed-size binary column; null rows (failed images) are zero.

    Without null rows this is a view of the Arrow buffer: copying a part's ~15 MB into fresh pages
    cost as much as decoding it.
    """
    chunked = table.column(name)
    column = chunked.chunk(0) if chunked.num_chunks == 1 else chunked.combine_chunks()  # which copies even one chunk
    values = np.frombuffer(column.buffers()[1], dtype, count=len(column) * width, offset=column.offset * column.type.byte_width)
    values = values.reshape(len(column), width)
    if column.null_count:
        values = values.copy()
        values[column.is_null().to_numpy(zero_copy_only=False)] = 0
    return values


def write_features(uri: str, features: FeatureTable, options: storage.StorageOptions = None) -> None:
    """Write one part file atomically.

    Features are dense float noise: dictionary encoding and column statistics only cost time. Page
    CRCs let a reader tell damaged floats (zstd stores incompressible blocks unchecked) from features.
    """
    buffer = io.BytesIO()
    pq.write_table(to_arrow(features), buffer, compression="zstd", compression_level=1, use_dictionary=False, write_statistics=False,
                   write_page_checksum=True)
    storage.write_bytes(uri, buffer.getvalue(), options)


def read_features(uris: Sequence[str], options: storage.StorageOptions = None) -> FeatureTable:
    """Read and concatenate part files, in the given order."""
    if not uris:
        raise ValueError("no feature part files to read")
    return concatenate([_read_part(uri, options) for uri in uris])


def read_global_features(uri: str, options: storage.StorageOptions = None) -> tuple[list[str], np.ndarray]:
    """The ids and N x D float32 global features of one part file, reading only those two columns (failed images: zero)."""
    table = parquet_parts.read_part(uri, options, columns=["id", "global"])
    return table.column("id").to_pylist(), _values(table, "global", "<f4", table.column("global").type.byte_width // 4).copy()


def _read_part(uri: str, options: storage.StorageOptions) -> FeatureTable:
    table = parquet_parts.read_part(uri, options)
    try:
        return from_arrow(table)
    except (KeyError, TypeError, ValueError) as error:  # metadata missing, or not the columns' shapes
        raise parquet_parts.damaged_part(uri, error) from error


def concatenate(parts: Sequence[FeatureTable]) -> FeatureTable:
    return FeatureTable(
        ids=[i for part in parts for i in part.ids],
        uris=[u for part in parts for u in part.uris],
        heights=np.concatenate([part.heights for part in parts]),
        widths=np.concatenate([part.widths for part in parts]),
        global_features=np.concatenate([part.global_features for part in parts]),
        layers=[np.concatenate(layer) for layer in zip(*(part.layers for part in parts))],
        layer_shapes=parts[0].layer_shapes,
        errors=[e for part in parts for e in part.errors],
        sha256=[h for part in parts for h in part.sha256],
    )
