"""A model's integrity: the size and SHA-256 of each of its files, recorded in its card when it is built
(`ModelCard.files`) and checked when it is read. A file cut short, missing, or from another fit is a ModelError naming
it and what to do. Cards without checksums (older models) are not checked.

Where the checks run (sizes and the small files at every load, the gallery once per node) is node_cache's and
model's concern; this module says only whether files match.
"""

from __future__ import annotations

import hashlib
import os
from typing import Any

from spade_batch.formats import listing, storage
from spade_batch.formats.card import CARD_NAME, ModelCard, ModelError
from spade_batch.formats.layout import ModelLayout

SHA256_CHUNK = 8 << 20
"""Bytes read at a time when hashing a model file (the gallery is hashed streaming, never held whole)."""
REMEDY = ("re-sync the whole model folder (every file with its spade.json) from where it was fitted, "
          "or fit the model again")



def artifact_names(card: ModelCard) -> list[str]:
    """The artifact's files besides the card, relative to the model folder."""
    return ModelLayout.array_names([shape.name for shape in card.layer_shapes], centre=card.schema_version > 1)


def file_sha256(path: str) -> str:
    """Hex SHA-256 of a local file, read SHA256_CHUNK bytes at a time."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(SHA256_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def checksum_files(folder: str, card: ModelCard) -> dict[str, dict[str, Any]]:
    """ModelCard.files for the model files in folder: each one's size and SHA-256."""
    return {name: {"bytes": os.path.getsize(os.path.join(folder, name)), "sha256": file_sha256(os.path.join(folder, name))}
            for name in artifact_names(card)}


def is_gallery(name: str) -> bool:
    """True for the pixel gallery's files (most of a model's bytes)."""
    return name.startswith(ModelLayout.pyramid + "/")


def verify_files(folder: str, card: ModelCard, source: str | None = None, gallery: bool = True, small: bool = True) -> None:
    """Check the model files in the local folder against the card: every file's size, the SHA-256 of the
    gallery's files (gallery) and of the others (small; the gallery is most of the bytes). Nothing to
    check for a card without checksums. source (default: folder) is the URI the errors name."""
    if not card.files:
        return
    named = ModelLayout(source or folder)
    for name in artifact_names(card):
        path = os.path.join(folder, name)
        try:
            size = os.path.getsize(path)
        except OSError as error:
            raise ModelError(f"model file {named.file(name)} is missing ({error.strerror}); {REMEDY}") from error
        expected = _recorded(card, named, name)
        _check_size(named, name, size, expected)
        if (gallery if is_gallery(name) else small) and file_sha256(path) != expected["sha256"]:
            raise _checksum_error(named, name)


def _recorded(card: ModelCard, named: ModelLayout, name: str) -> dict[str, Any]:
    if name not in card.files:
        raise ModelError(f"{named.card} records no checksum of {name}; the card is damaged: {REMEDY}")
    return card.files[name]


def _check_size(named: ModelLayout, name: str, size: int, expected: dict[str, Any]) -> None:
    if size != expected["bytes"]:
        raise ModelError(f"model file {named.file(name)} is {size} bytes, its {CARD_NAME} records {expected['bytes']}: "
                         f"it is cut short or from another fit; {REMEDY}")


def _checksum_error(named: ModelLayout, name: str) -> ModelError:
    return ModelError(f"model file {named.file(name)} does not match the checksum its {CARD_NAME} records: "
                      f"it is damaged or from another fit; {REMEDY}")


def verify_stored(uri: str, card: ModelCard, options: storage.StorageOptions = None) -> None:
    """Check a model on an object store against its card without downloading its gallery: every file's size (one
    request each) and the small files' checksums (a few MB)."""
    if not card.files:
        return
    named = ModelLayout(uri)
    for name in artifact_names(card):
        expected = _recorded(card, named, name)
        try:
            size = int(listing.info(named.file(name), options)["size"])
        except FileNotFoundError as error:
            raise ModelError(f"model file {named.file(name)} is missing; {REMEDY}") from error
        _check_size(named, name, size, expected)
        if not is_gallery(name):
            read_checked(uri, card, name, options)


def read_checked(uri: str, card: ModelCard, name: str, options: storage.StorageOptions = None) -> bytes:
    """The file `name` of the model at uri, whose SHA-256 is the one its card records: else a ModelError naming it."""
    named = ModelLayout(uri)
    expected = _recorded(card, named, name)
    data = storage.read_bytes(named.file(name), options)
    if hashlib.sha256(data).hexdigest() != expected["sha256"]:
        raise _checksum_error(named, name)
    return data
