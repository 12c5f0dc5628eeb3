"""Building a model's artifact: the pixel gallery written row by row (`GalleryWriter`, never held whole in memory),
the faiss image index, the centre, then every file's checksum recorded in the card (formats.integrity)."""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import time
from collections.abc import Sequence
from typing import Protocol

import faiss
import numpy as np

from spade_batch.formats.card import ModelCard
from spade_batch.formats.features import LayerShape
from spade_batch.formats.integrity import checksum_files
from spade_batch.formats.layout import ModelLayout
from spade_batch.formats.model import Centre, SpadeModel, load_folder
from spade_batch.formats.node_cache import record_verified

log = logging.getLogger(__name__)


class IndexSettings(Protocol):
    """The settings build_model reads (config.Settings has them): the index kind, its IVF lists, the seed, K."""

    index: str
    ivf_lists: int
    seed: int
    k: int


def build_index(global_features: np.ndarray, kind: str = "flat", lists: int = 0, seed: int = 0, k: int = 1) -> faiss.Index:
    """Squared-L2 faiss index over N x D float32 features: exact (flat) or IVF (approximate).

    An IVF index probes a quarter of its lists, and always enough lists that any query finds k
    vectors (faiss pads a short result with id -1).
    """
    vectors = np.ascontiguousarray(global_features, dtype=np.float32)
    count, dim = vectors.shape
    if kind == "flat":
        index = faiss.IndexFlatL2(dim)
        index.add(vectors)
        return index
    lists = lists or max(1, min(count // 39, int(4 * math.sqrt(count))))
    index = faiss.IndexIVFFlat(faiss.IndexFlatL2(dim), dim, lists, faiss.METRIC_L2)
    index.cp.seed = seed
    index.train(vectors)
    index.add(vectors)
    smallest_first = np.cumsum(np.sort([index.invlists.list_size(i) for i in range(lists)]))
    covering = int(np.searchsorted(smallest_first, k)) + 1  # no `covering` lists together hold fewer than k
    index.nprobe = min(lists, max(1, lists // 4, covering))
    return index


class GalleryWriter:
    """Writes gallery rows into <folder>/pyramid/<layer>.npy, centred, in any order and in pieces.

    The gallery ids are known up front and sorted: row i of every file is ids[i], wherever and
    whenever its features arrive, so the artifact does not depend on batching or resume. Rows are
    written with positioned writes (no memory map), so memory stays at one batch whatever the
    gallery size, and several threads may add different images at once.
    """

    rows_per_write = 64
    """Images centred and written together: bounds add's float32 copy (resnet18 at 128 px: 29 MB)."""

    def __init__(self, folder: str, ids: Sequence[str], layer_shapes: Sequence[LayerShape], global_dim: int, centre: Centre):
        self.folder, self.ids, self.shapes, self.centre = folder, sorted(ids), list(layer_shapes), centre
        self.position = {image_id: row for row, image_id in enumerate(self.ids)}
        if len(self.position) != len(self.ids):
            raise ValueError("gallery ids must be unique")
        self.written = np.zeros(len(self.ids), dtype=bool)
        self.global_features = np.zeros((len(self.ids), global_dim), np.float32)
        files = ModelLayout(folder)
        os.makedirs(files.pyramid, exist_ok=True)
        self.files, self.row_bytes, self.offsets = [], [], []
        for shape in self.shapes:
            handle = open(files.layer(shape.name), "w+b")
            header = {"descr": np.lib.format.dtype_to_descr(np.dtype(np.float16)), "fortran_order": False,
                      "shape": (len(self.ids), shape.height * shape.width, shape.channels)}
            np.lib.format.write_array_header_2_0(handle, header)
            self.offsets.append(handle.tell())
            self.row_bytes.append(2 * shape.height * shape.width * shape.channels)
            handle.truncate(self.offsets[-1] + self.row_bytes[-1] * len(self.ids))
            handle.flush()
            self.files.append(handle)

    def add(self, ids: Sequence[str], global_features: np.ndarray, layers: Sequence[np.ndarray]) -> None:
        """Write the rows of those of n images that belong to the gallery (others are skipped).

        Args:
            ids: n image ids.
            global_features: n x D.
            layers: per layer, n x P x C_l (any float dtype).
        """
        rows = np.array([self.position.get(image_id, -1) for image_id in ids], dtype=np.int64)
        sources = np.flatnonzero(rows >= 0)
        for start in range(0, len(sources), self.rows_per_write):
            chunk = sources[start : start + self.rows_per_write]
            self._write(rows[chunk], global_features[chunk], [layer[chunk] for layer in layers])

    def _write(self, rows: np.ndarray, global_features: np.ndarray, layers: Sequence[np.ndarray]) -> None:
        """Centre b images and write them to gallery rows `rows` (b int64), a run of consecutive rows per write."""
        self.global_features[rows] = global_features - self.centre.global_mean
        runs = np.split(np.arange(len(rows)), np.flatnonzero(np.diff(rows) != 1) + 1)
        for handle, offset, size, layer, mean in zip(self.files, self.offsets, self.row_bytes, layers, self.centre.layer_means):
            values = _centred_float16(layer, mean)
            for run in runs:
                os.pwrite(handle.fileno(), memoryview(values[run[0] : run[-1] + 1]).cast("B"), offset + int(rows[run[0]]) * size)
        self.written[rows] = True

    def close(self) -> tuple[list[str], np.ndarray]:
        """(gallery ids, N x D centred global features) once every row is written."""
        for handle in self.files:
            handle.close()
        if not self.written.all():
            missing = [image_id for image_id, done in zip(self.ids, self.written) if not done]
            raise ValueError(f"{len(missing)} gallery images were never written, e.g. {missing[:3]}")
        return self.ids, self.global_features


def _centred_float16(values: np.ndarray, mean: np.ndarray) -> np.ndarray:
    """b x P x C float values minus the C mean (in float32), as C-contiguous float16."""
    import torch  # 10x numpy's float16 casts; imported here so that loading a model needs no torch

    centred = torch.from_numpy(np.asarray(values)).float() - torch.from_numpy(mean)
    return centred.to(torch.float16).contiguous().numpy()


def write_arrays(folder: str, ids: list[str], index: faiss.Index, centre: Centre, shapes: Sequence[LayerShape]) -> None:
    """train ids, index and centre into folder (the gallery files are written by GalleryWriter)."""
    files = ModelLayout(folder)
    with open(files.train_ids, "w") as f:
        json.dump(ids, f)
    faiss.write_index(index, files.index)
    layers = {f"layer:{shape.name}": mean for shape, mean in zip(shapes, centre.layer_means)}
    np.savez(files.centre, **{"global": centre.global_mean, **layers})




def build_model(writer: GalleryWriter, card: ModelCard, settings: IndexSettings) -> SpadeModel:
    """The model whose gallery `writer` has written: index over the centred global features, arrays mapped."""
    ids, global_features = writer.close()
    # k + 1: leave-one-out calibration searches one neighbour more, its own row then dropped.
    index = build_index(global_features, settings.index, settings.ivf_lists, settings.seed, settings.k + 1)
    write_arrays(writer.folder, ids, index, writer.centre, writer.shapes)
    started = time.perf_counter()
    card = dataclasses.replace(card, files=checksum_files(writer.folder, card))
    log.info("fit: checksummed %.2f GB of model files in %.1f s",
             sum(entry["bytes"] for entry in card.files.values()) / 1e9, time.perf_counter() - started)
    record_verified(writer.folder, card)
    return load_folder(writer.folder, card)
