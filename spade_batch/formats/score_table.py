"""Parquet schema of scoring results (OUT_URI/scores/part-NNNNN.parquet), one row per image.

| column              | type           | meaning                                                           |
|---------------------|----------------|-------------------------------------------------------------------|
| id                  | string         | image id (path relative to the archive root)                      |
| uri                 | string         | where the image was read                                          |
| image_score         | float32        | the model's image_score (default: mean of the map's top 1%; knn: mean squared distance to the K nearest normal images); null: error |
| is_anomalous        | bool           | image_score > image threshold (null when no threshold is known)   |
| max_pixel_score     | float32        | largest pixel score of the anomaly map                            |
| anomalous_fraction  | float32        | fraction of pixels above the pixel threshold (null: no threshold) |
| mask_uri            | string         | the mask PNG at the original resolution                           |
| neighbour_ids       | list<string>   | ids of the K nearest normal images, nearest first                 |
| height, width       | int32          | original image size in pixels                                     |
| error               | string         | why the image could not be scored (all scores null)               |
| fingerprint         | string         | the image's fingerprint when its row was written (listing.fingerprint: ETag, or size and modification time); a re-run scores an image again when its listing's differs. Null: unknown (parts written before it was kept) |

A mask_uri is absolute (a local run's output folder is resolved when the run starts).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING

import numpy as np
import pyarrow as pa

from spade_batch.formats import parquet_parts, storage

if TYPE_CHECKING:
    from spade_batch.formats.card import Thresholds

SCHEMA = pa.schema(
    [
        ("id", pa.string()),
        ("uri", pa.string()),
        ("image_score", pa.float32()),
        ("is_anomalous", pa.bool_()),
        ("max_pixel_score", pa.float32()),
        ("anomalous_fraction", pa.float32()),
        ("mask_uri", pa.string()),
        ("neighbour_ids", pa.list_(pa.string())),
        ("height", pa.int32()),
        ("width", pa.int32()),
        ("error", pa.string()),
        ("fingerprint", pa.string()),
    ]
)
"""Parts written before the fingerprint column read with it null (read_scores, layout.read_columns with schema=SCHEMA)."""


@dataclass
class ScoreRow:
    id: str
    uri: str
    image_score: float | None = None
    is_anomalous: bool | None = None
    max_pixel_score: float | None = None
    anomalous_fraction: float | None = None
    mask_uri: str | None = None
    neighbour_ids: list[str] = field(default_factory=list)
    height: int | None = None
    width: int | None = None
    error: str | None = None
    fingerprint: str | None = None


def result_row(
    image_id: str, uri: str, size: tuple[int, int], image_score: float, anomaly_map: np.ndarray,
    neighbour_ids: list[str], mask: np.ndarray, mask_uri: str, thresholds: Thresholds, fingerprint: str | None = None,
) -> ScoreRow:
    """The row of a scored image of size (height, width): its S x S map, and its uint8 mask written to mask_uri;
    fingerprint: the image's when it was listed ("" or None: unknown)."""
    return ScoreRow(
        id=image_id,
        uri=uri,
        image_score=image_score,
        is_anomalous=thresholds.is_anomalous(image_score),
        max_pixel_score=float(anomaly_map.max()),
        anomalous_fraction=None if thresholds.pixel is None else float((mask > 0).mean()),
        mask_uri=mask_uri,
        neighbour_ids=neighbour_ids,
        height=size[0],
        width=size[1],
        fingerprint=fingerprint or None,
    )


def write_scores(uri: str, rows: Sequence[ScoreRow], options: storage.StorageOptions = None) -> None:
    """Write one part file atomically."""
    parquet_parts.write_part(uri, pa.Table.from_pylist([asdict(row) for row in rows], schema=SCHEMA), options)


def read_scores(uris: Sequence[str], options: storage.StorageOptions = None) -> pa.Table:
    """Concatenate part files in the given order."""
    tables = [parquet_parts.read_part(uri, options, schema=SCHEMA) for uri in uris]
    return pa.concat_tables(tables) if tables else SCHEMA.empty_table()
