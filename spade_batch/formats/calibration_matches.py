"""What each calibration image's pixels matched in its K retrieved normal images (method.matching), stored in
the model version it calibrated, so that `add` re-searches only what its grown gallery changed.

calibration.parquet (layout.ModelLayout.calibration_matches), one row per calibration image:

    id                 string
    neighbours         list<string>: its K retrieved gallery images, nearest first
    distances:<layer>  fixed-size list<float32> of h*w x kappa: per pixel, the kappa smallest squared distances, ascending
    sources:<layer>    fixed-size list<int16> of h*w x kappa: the position in `neighbours` of each distance's image
    cells:<layer>      fixed-size list<int32> of h*w x kappa: its cell in that image (row-major; -1 unknown); absent in
                       files written before cells were kept

The card records the file's size and SHA-256 (ModelCard.files); add recalibrates in full from a model
without the file (fitted before it existed) or with one that does not match.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from spade_batch.formats.features import LayerShape

MAX_NEIGHBOURS = np.iinfo(np.int16).max
"""The most retrieved images a source position can name."""


@dataclass(frozen=True)
class PixelMatches:
    """One image's pixel correspondence with its K retrieved normal images, per pyramid layer.

    Attributes:
        neighbour_ids: K ids of the retrieved gallery images, nearest first.
        distances: per layer, h_l*w_l x kappa float32 squared distances of each pixel to its kappa nearest
            pixels among the K images' (squared feature units), ascending.
        sources: per layer, h_l*w_l x kappa int16: which of neighbour_ids each distance's pixel belongs to.
        cells: per layer, h_l*w_l x kappa int32: that pixel's cell in its image (row-major; -1 unknown); None for
            matches stored before cells were kept. A restricted search (match_radius) is the same record.
    """

    neighbour_ids: list[str]
    distances: list[np.ndarray]
    sources: list[np.ndarray]
    cells: list[np.ndarray] | None = None

    def layer_maps(self, shapes: Sequence[LayerShape]) -> list[np.ndarray]:
        """Per layer, the h_l x w_l float32 map SPADE takes: each pixel's mean over its kappa distances."""
        return [d.mean(axis=1, dtype=np.float32).reshape(s.height, s.width) for d, s in zip(self.distances, shapes)]


def write_matches(path: str, ids: Sequence[str], matches: Sequence[PixelMatches], shapes: Sequence[LayerShape]) -> None:
    """calibration.parquet at the local path: one row per image (at least one), in the order given."""
    columns: dict[str, pa.Array] = {
        "id": pa.array(list(ids), pa.string()),
        "neighbours": pa.array([m.neighbour_ids for m in matches], pa.list_(pa.string())),
    }
    kinds = (("distances", np.float32), ("sources", np.int16), ("cells", np.int32))
    for layer, shape in enumerate(shapes):
        for name, dtype in kinds if all(m.cells is not None for m in matches) else kinds[:2]:
            flat = np.concatenate([getattr(m, name)[layer].astype(dtype).reshape(-1) for m in matches])
            columns[f"{name}:{shape.name}"] = pa.FixedSizeListArray.from_arrays(pa.array(flat), flat.size // len(matches))
    pq.write_table(pa.table(columns), path)


def read_matches(data: bytes, shapes: Sequence[LayerShape]) -> dict[str, PixelMatches]:
    """id -> PixelMatches of a calibration.parquet's bytes. Raises ValueError for matches of other layers than `shapes`."""
    table = pq.read_table(pa.BufferReader(data))
    names = {f"{kind}:{s.name}" for s in shapes for kind in ("distances", "sources")}
    if not names <= set(table.column_names):
        raise ValueError(f"they are the matches of other layers ({', '.join(table.column_names)})")
    count = table.num_rows

    def layers(kind: str, dtype: type) -> list[np.ndarray]:
        """Per layer, count x h*w x kappa."""
        return [table.column(f"{kind}:{s.name}").combine_chunks().flatten().to_numpy().astype(dtype, copy=False)
                .reshape(count, s.height * s.width, -1) for s in shapes]

    distances, sources = layers("distances", np.float32), layers("sources", np.int16)
    cells = layers("cells", np.int32) if f"cells:{shapes[0].name}" in table.column_names else None
    ids, neighbours = table.column("id").to_pylist(), table.column("neighbours").to_pylist()
    return {image_id: PixelMatches(neighbours[row], [layer[row] for layer in distances], [layer[row] for layer in sources],
                                   None if cells is None else [layer[row] for layer in cells])
            for row, image_id in enumerate(ids)}
