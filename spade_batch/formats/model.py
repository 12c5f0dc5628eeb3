"""The fitted model artifact: card (spade.json), faiss image index, centre, pixel gallery.

Layout under MODEL_URI (names in layout.ModelLayout; spade.json is written last: a model without it is incomplete):

    spade.json            the card: settings, weights identity, shapes, thresholds, provenance
    train_ids.json        ids of the gallery images, in index order
    global.faiss          faiss index over the N x D centred global features (squared L2)
    centre.npz            the training-mean centre: "global" (D,) and one (C_l,) per layer, float32
    pyramid/<layer>.npy   N x (h * w) x C float16 centred pixel gallery per layer, channels last
    calibration.parquet   what each calibration image's pixels matched (calibration_matches.py): read by add only
    features/             the Parquet part files fit extracted (see features.py)

Features are stored and searched centred (minus a training mean). Squared distances do not change
under a common shift, but float32 |a|^2 - 2ab + |b|^2 on raw wide_resnet50_2 features (|a|^2 near
1e6) loses enough digits to change neighbour sets. Schema 1 models (uncentred) load with a zero
centre.

The gallery is written row by row (formats.model_build) and read memory-mapped: a scorer touches only the rows of
the K images it retrieved.

The card records the size and SHA-256 of every other file (formats.integrity). Loading checks them: sizes and the
small files' checksums at every load (one stat and a few MB per process), the gallery's checksums once per node
(formats.node_cache): when the node-local copy of a remote model is downloaded, or, for a local model folder, the
first time a process on the node loads it.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import zipfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import faiss
import numpy as np

from spade_batch.formats import storage
from spade_batch.formats.card import CARD_NAME, CalibrationRecord, ModelCard, ModelError, Normalisation, Thresholds, load_card
from spade_batch.formats.features import LayerShape
from spade_batch.formats.integrity import artifact_names, file_sha256, verify_files, verify_stored
from spade_batch.formats.layout import ModelLayout
from spade_batch.formats.node_cache import local_copy, verify_local_folder


@dataclass(frozen=True)
class Centre:
    """The vector subtracted from every feature before any distance.

    Any fixed vector near the data keeps float32 distances exact to the digits that matter; fit
    uses the features of one gallery image (the first by id), so the centre does not depend on how
    the extraction was batched or resumed.

    Attributes:
        global_mean: D float32.
        layer_means: per layer, C_l float32.
    """

    global_mean: np.ndarray
    layer_means: list[np.ndarray]

    @classmethod
    def of_image(cls, global_feature: np.ndarray, layers: Sequence[np.ndarray]) -> Centre:
        """From one image: its D global feature, and per layer the mean of its P x C_l pixel features."""
        return cls(
            np.asarray(global_feature, np.float32),
            [np.asarray(layer, np.float32).mean(axis=0, dtype=np.float64).astype(np.float32) for layer in layers],
        )

    @classmethod
    def zero(cls, global_dim: int, shapes: Sequence[LayerShape]) -> Centre:
        return cls(np.zeros(global_dim, np.float32), [np.zeros(s.channels, np.float32) for s in shapes])


@dataclass
class SpadeModel:
    """A fitted SPADE model.

    Attributes:
        card: settings and provenance.
        train_ids: N gallery image ids, in index order.
        index: faiss squared-L2 index over the N x D centred global features.
        centre: subtracted from query features before searching.
        gallery: per layer, N x (h * w) x C float16 centred pixel features (channels last),
            memory-mapped from `folder`.
        folder: the local folder holding the artifact's files (all but the card).
    """

    card: ModelCard
    train_ids: list[str]
    index: faiss.Index
    centre: Centre
    gallery: list[np.ndarray]
    folder: str

    def with_thresholds(self, thresholds: Thresholds, calibration: CalibrationRecord) -> SpadeModel:
        card = dataclasses.replace(self.card, thresholds=thresholds, calibration=calibration)
        return dataclasses.replace(self, card=card)

    def with_normalisation(self, normalisation: Normalisation) -> SpadeModel:
        return dataclasses.replace(self, card=dataclasses.replace(self.card, normalisation=normalisation))

    def with_file(self, name: str) -> SpadeModel:
        """The model with one more file of its folder recorded in the card (size and SHA-256) and published with it,
        one that loading does not read (the calibration matches)."""
        path = os.path.join(self.folder, name)
        entry = {"bytes": os.path.getsize(path), "sha256": file_sha256(path)}
        return dataclasses.replace(self, card=dataclasses.replace(self.card, files={**self.card.files, name: entry}))

    @functools.cached_property
    def row_of(self) -> dict[str, int]:
        """Gallery image id -> its row in the index and the gallery files."""
        return {image_id: row for row, image_id in enumerate(self.train_ids)}

    @property
    def gallery_bytes(self) -> int:
        return sum(layer.nbytes for layer in self.gallery)

    def save(self, uri: str, options: storage.StorageOptions = None) -> None:
        """Write the artifact; an existing card is removed first, so no reader pairs it with new arrays.

        A file beyond the arrays that this folder lacks (a node-local copy holds no calibration matches) is
        left out, and out of the card written.
        """
        storage.remove(ModelLayout(uri).card, options)
        self.publish_arrays(uri, options)
        kept = {*artifact_names(self.card), *self._extra_names()}
        files = {name: entry for name, entry in self.card.files.items() if name in kept}
        dataclasses.replace(self, card=dataclasses.replace(self.card, files=files)).write_card(uri, options)

    def publish_arrays(self, uri: str, options: storage.StorageOptions = None) -> None:
        """Copy the files of `folder` but the card to uri, streamed; nothing to do when uri is the folder."""
        if storage.is_local(uri) and os.path.abspath(storage.filesystem(uri, options)[1]) == os.path.abspath(self.folder):
            return
        for name in [*artifact_names(self.card), *self._extra_names()]:
            storage.put_file(os.path.join(self.folder, name), ModelLayout(uri).file(name), options)

    def _extra_names(self) -> list[str]:
        """The files the card records beyond the arrays (with_file) that `folder` holds."""
        arrays = artifact_names(self.card)
        return [name for name in self.card.files if name not in arrays and os.path.exists(os.path.join(self.folder, name))]

    def write_card(self, uri: str, options: storage.StorageOptions = None) -> None:
        """spade.json, last: its presence marks the model complete."""
        storage.write_text(ModelLayout(uri).card, self.card.to_json(), options)

    @classmethod
    def load(cls, uri: str, options: storage.StorageOptions = None, card: ModelCard | None = None) -> SpadeModel:
        """The model at uri, its gallery memory-mapped from a node-local copy (uri itself when local).

        card: use this card instead of uri's spade.json (fit's calibration, before the card is written).

        Every file is checked against the card's sizes and checksums (verify_model's checks, on the
        files the model is read from): a ModelError names one that does not match.
        """
        card = card or load_card(uri, options)
        if storage.is_local(uri):
            folder = storage.filesystem(uri, options)[1]
            verify_local_folder(folder, card, uri)
        else:
            folder = local_copy(uri, card, options)  # the gallery's checksums are verified when the copy is made
            verify_files(folder, card, uri, gallery=False)
        return load_folder(folder, card, uri)


_LOADS = [0]


def load_count() -> int:
    """How many times this process has loaded a model's arrays (each actor should do it once)."""
    return _LOADS[0]


def load_folder(folder: str, card: ModelCard, source: str | None = None) -> SpadeModel:
    """The model whose arrays are in folder; source (default: folder) is the URI errors name, file by file."""
    _LOADS[0] += 1
    shapes = card.layer_shapes
    source = source or folder

    local, named = ModelLayout(folder), ModelLayout(source)

    def read(name: str, reader: Callable[[str], Any]) -> Any:
        try:
            return reader(local.file(name))
        except (OSError, ValueError, RuntimeError, KeyError, EOFError, zipfile.BadZipFile) as error:
            raise ModelError(f"model file {named.file(name)} is missing or damaged ({error}); fit the model again") from error

    train_ids = read(ModelLayout.train_ids, _read_json)
    index = read(ModelLayout.index, faiss.read_index)
    gallery = [read(ModelLayout.layer_name(s.name), lambda path: np.load(path, mmap_mode="r")) for s in shapes]
    centre = Centre.zero(card.global_dim, shapes) if card.schema_version == 1 else read(ModelLayout.centre, lambda path: _read_centre(path, shapes))
    if not isinstance(train_ids, list) or len(train_ids) != card.train_count:
        raise ModelError(f"model file {named.train_ids} does not list the {card.train_count} "
                         f"gallery images its {CARD_NAME} records; fit the model again")
    for shape, layer in zip(shapes, gallery):
        expected = (card.train_count, shape.height * shape.width, shape.channels)
        if layer.shape != expected:
            raise ModelError(f"model file {named.layer(shape.name)} holds {layer.shape}, "
                             f"its {CARD_NAME} records {expected}; fit the model again")
    if index.ntotal != card.train_count or index.d != card.global_dim:
        raise ModelError(f"model file {named.index} indexes {index.ntotal} x {index.d} features, "
                         f"its {CARD_NAME} records {card.train_count} x {card.global_dim}; fit the model again")
    return SpadeModel(card=card, train_ids=train_ids, index=index, centre=centre, gallery=gallery, folder=folder)


def verify_model(uri: str, card: ModelCard, options: storage.StorageOptions = None) -> None:
    """What the driver checks before any image is read: the model at uri matches its card.

    A local model: node_cache.verify_local_folder (the gallery's checksums once per node). A remote one: every file's
    size and the small files' checksums (integrity.verify_stored); the gallery's checksums are verified where the
    actors' node-local copy is made (node_cache.local_copy).
    """
    if storage.is_local(uri):
        verify_local_folder(storage.filesystem(uri, options)[1], card, uri)
    else:
        verify_stored(uri, card, options)


def _read_json(path: str) -> Any:
    with open(path) as f:
        return json.load(f)


def _read_centre(path: str, shapes: Sequence[LayerShape]) -> Centre:
    with np.load(path) as saved:
        return Centre(saved["global"], [saved[f"layer:{s.name}"] for s in shapes])
