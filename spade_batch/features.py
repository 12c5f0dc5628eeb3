"""Parquet schema of extracted features (MODEL_URI/features/part-NNNNN.parquet).

One row per image:

| column      | type                                   | meaning                                        |
|-------------|----------------------------------------|------------------------------------------------|
| id          | string                                 | image id (path relative to the image-set root) |
| uri         | string                                 | where the image was read                       |
| height      | int32                                  | original image height, pixels                  |
| width       | int32                                  | original image width, pixels                   |
| global      | fixed_size_list<float32>[D]            | pooled last-block feature                      |
| <layer>     | fixed_size_list<float16>[h * w * C]    | one per pyramid layer, channels last (h, w, C) |
| error       | string                                 | why the image was skipped; features are null   |

The schema metadata key `spade_batch` holds JSON: {"schema_version", "layers": [{"name", "height",
"width", "channels"}], "global_dim"}.
"""

from __future__ import annotations

import io
import json
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from spade_batch import storage

SCHEMA_VERSION = 1


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
        layers: per pyramid layer, N x (h * w) x C float16, channels last (failed rows zero).
        layer_shapes: per layer (name, h, w, C).
        errors: per image, None or why it was skipped.
    """

    ids: list[str]
    uris: list[str]
    heights: np.ndarray
    widths: np.ndarray
    global_features: np.ndarray
    layers: list[np.ndarray]
    layer_shapes: list[LayerShape]
    errors: list[str | None]

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
        "global": _fixed_list(features.global_features.astype(np.float32), failed),
    }
    for shape, layer in zip(features.layer_shapes, features.layers):
        columns[shape.name] = _fixed_list(layer.astype(np.float16), failed)
    columns["error"] = pa.array(features.errors, pa.string())
    metadata = {
        "schema_version": SCHEMA_VERSION,
        "layers": [vars(shape) for shape in features.layer_shapes],
        "global_dim": int(features.global_features.shape[1]),
    }
    return pa.table(columns).replace_schema_metadata({"spade_batch": json.dumps(metadata)})


def _fixed_list(values: np.ndarray, null_rows: np.ndarray) -> pa.Array:
    flat = pa.array(values.reshape(-1))
    mask = pa.array(null_rows) if null_rows.any() else None
    return pa.FixedSizeListArray.from_arrays(flat, int(np.prod(values.shape[1:])), mask=mask)


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
        global_features=_values(table, "global", np.float32, metadata["global_dim"]),
        layers=[_values(table, s.name, np.float16, s.size).reshape(count, s.height * s.width, s.channels) for s in shapes],
        layer_shapes=shapes,
        errors=table.column("error").to_pylist(),
    )


def _values(table: pa.Table, name: str, dtype: type, width: int) -> np.ndarray:
    """N x width array of a fixed-size-list column; null rows (failed images) are zero."""
    column = table.column(name).combine_chunks()
    # flatten() holds the non-null rows only, from the array's offset on (`.values` ignores both, and a
    # Parquet round trip turns the child values of null rows into nulls, i.e. NaN).
    values = np.zeros((len(column), width), dtype=dtype)
    valid = ~column.is_null().to_numpy(zero_copy_only=False)
    values[valid] = np.asarray(column.flatten().to_numpy(zero_copy_only=False), dtype=dtype).reshape(-1, width)
    return values


def write_features(uri: str, features: FeatureTable, options: storage.StorageOptions = None) -> None:
    """Write one part file atomically.

    Features are dense float noise: dictionary encoding and column statistics only cost time, and
    zstd level 1 beats the default snappy on size, write and read time alike (64 resnet18 rows at
    128 px: 8.8 vs 11.3 MB, written in 0.10 vs 0.22 s, read in 0.04 vs 0.15 s).
    """
    buffer = io.BytesIO()
    pq.write_table(to_arrow(features), buffer, compression="zstd", compression_level=1, use_dictionary=False, write_statistics=False)
    storage.write_bytes(uri, buffer.getvalue(), options)


def read_features(uris: Sequence[str], options: storage.StorageOptions = None) -> FeatureTable:
    """Read and concatenate part files, in the given order."""
    tables = [pq.read_table(io.BytesIO(storage.read_bytes(uri, options))) for uri in uris]
    if not tables:
        raise ValueError("no feature part files to read")
    parts = [from_arrow(table) for table in tables]
    return concatenate(parts)


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
    )
