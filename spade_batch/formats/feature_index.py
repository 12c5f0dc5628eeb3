"""An index of training features in part files (formats.features): which part holds each image, its size, its source
and content hash, and the images that could not be read; read from the parts' index columns only, the feature columns
read when asked for, part by part."""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass

import numpy as np

from spade_batch.formats import storage
from spade_batch.formats.features import INDEX_SCHEMA, FeatureTable, read_features, read_global_features
from spade_batch.formats.layout import read_columns
from spade_batch.formats.manifest import pairs_sha256


@dataclass(frozen=True)
class StoredFeatures:
    """Training features in part files (formats.features): which part holds each readable image, and its size.

    Attributes:
        parts: id -> the part file holding its row.
        sizes: id -> original (height, width) in pixels.
        failures: {"id", "error"} of the images that could not be read, by id.
        sources: id -> (uri, content_sha256 or None) of every image with a row, readable or not.
        options: storage options that reach the parts.
    """

    parts: dict[str, str]
    sizes: dict[str, tuple[int, int]]
    failures: list[dict[str, str]]
    sources: dict[str, tuple[str, str | None]]
    options: storage.StorageOptions = None

    @classmethod
    def index(cls, part_uris: Iterable[str], options: storage.StorageOptions = None) -> StoredFeatures:
        """Read only the index columns of the parts (INDEX_SCHEMA); of two rows of one id, the later part's counts."""
        parts, sizes, errors, sources = {}, {}, {}, {}
        for part, columns in read_columns(part_uris, INDEX_SCHEMA.names, options, INDEX_SCHEMA):
            for image_id, uri, error, height, width, sha256 in zip(*(columns[name] for name in INDEX_SCHEMA.names)):
                parts[image_id], sources[image_id] = part, (uri, sha256)
                if error is None:
                    sizes[image_id] = (height, width)
                    errors.pop(image_id, None)
                else:
                    errors[image_id] = error
                    sizes.pop(image_id, None)
        failures = [{"id": image_id, "error": error} for image_id, error in sorted(errors.items())]
        return cls({i: p for i, p in parts.items() if i in sizes}, sizes, failures, sources, options)

    def manifest_sha256(self) -> str:
        """The training manifest's hash (manifest.pairs_sha256 of every image with a row, by id): fit's Manifest.sha256."""
        ids = sorted(self.sources)
        return pairs_sha256(ids, [self.sources[image_id][0] for image_id in ids])

    def parts_of(self, ids: Iterable[str]) -> list[str]:
        """The part files holding these images, sorted."""
        return sorted({self.parts[image_id] for image_id in ids})

    def block(self, part: str, ids: Iterable[str]) -> FeatureTable:
        """The rows of these images in one part file, in the part's order."""
        return read_block(part, ids, self.options)

    def global_features(self, ids: Sequence[str]) -> np.ndarray:
        """len(ids) x D float32 global features of these images, in their order, reading only the id and global columns."""
        rows = {}
        for part in self.parts_of(ids):
            rows.update(zip(*read_global_features(part, self.options)))
        return np.stack([rows[image_id] for image_id in ids])

    def blocks(self, ids: Sequence[str]) -> Iterator[FeatureTable]:
        """These images' rows, one part file at a time."""
        for part in self.parts_of(ids):
            yield self.block(part, ids)


def read_block(part: str, ids: Iterable[str], options: storage.StorageOptions = None) -> FeatureTable:
    """The rows of these images in one feature part file, in the part's order."""
    table = read_features([part], options)
    wanted = set(ids)
    return table.select(np.array([image_id in wanted for image_id in table.ids], dtype=bool))
