"""The fitted model artifact: card (spade.json), faiss image index, pixel gallery.

Layout under MODEL_URI (spade.json is written last: a model without it is incomplete):

    spade.json            the card: settings, weights identity, shapes, thresholds, provenance
    train_ids.json        ids of the gallery images, in index order
    global.faiss          faiss index over the N x D global features (squared L2)
    pyramid/<layer>.npy   N x (h * w) x C float16 pixel gallery per layer, channels last
    features/             the Parquet part files fit extracted (see features.py)
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import math
from dataclasses import dataclass, field
from typing import Any

import faiss
import numpy as np

from spade_batch import __version__, storage
from spade_batch.config import MODEL_KEYS, ConfigError, Settings
from spade_batch.features import FeatureTable, LayerShape

MODEL_SCHEMA_VERSION = 1
CARD_NAME = "spade.json"


@dataclass(frozen=True)
class ModelCard:
    """Everything needed to reproduce and to check a model; saved as spade.json."""

    settings: dict[str, Any]  # the config MODEL_KEYS used at fit
    preprocessing: dict[str, Any]  # images.Preprocessing.to_dict()
    weights_sha256: str
    layers: list[dict[str, Any]]  # LayerShape fields per layer
    global_dim: int
    train_count: int
    train_manifest_sha256: str
    thresholds: dict[str, float | None] = field(default_factory=lambda: {"image": None, "pixel": None})
    calibration: dict[str, Any] = field(default_factory=dict)
    failed_train_images: list[dict[str, str]] = field(default_factory=list)
    package_version: str = __version__
    schema_version: int = MODEL_SCHEMA_VERSION
    created: str = field(default_factory=lambda: datetime.datetime.now(datetime.timezone.utc).isoformat())

    @property
    def layer_shapes(self) -> list[LayerShape]:
        return [LayerShape(**layer) for layer in self.layers]

    def check_compatible(self, settings: Settings, explicit_keys: frozenset[str]) -> None:
        """Refuse a request whose model settings differ from those the model was fitted with."""
        mismatched = [
            f"{key}={getattr(settings, key)!r} (model: {self.settings[key]!r})"
            for key in sorted(explicit_keys & set(MODEL_KEYS))
            if getattr(settings, key) != self.settings[key]
        ]
        if mismatched:
            raise ConfigError(
                "the request does not match the model: " + ", ".join(mismatched)
                + "; drop these options to use the model's values, or fit a new model with them"
            )


@dataclass
class SpadeModel:
    """A fitted SPADE model.

    Attributes:
        card: settings and provenance.
        train_ids: N gallery image ids, in index order.
        index: faiss squared-L2 index over the N x D global features.
        gallery: per layer, N x (h * w) x C float16 pixel features (channels last).
    """

    card: ModelCard
    train_ids: list[str]
    index: faiss.Index
    gallery: list[np.ndarray]

    def __getstate__(self) -> dict[str, Any]:
        # faiss indexes do not pickle; their serialised bytes are a plain uint8 array (zero-copy in Ray).
        return {**self.__dict__, "index": faiss.serialize_index(self.index)}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update({**state, "index": faiss.deserialize_index(np.asarray(state["index"]))})

    def with_thresholds(self, image: float | None, pixel: float | None, calibration: dict[str, Any]) -> SpadeModel:
        card = dataclasses.replace(self.card, thresholds={"image": image, "pixel": pixel}, calibration=calibration)
        return dataclasses.replace(self, card=card)

    def save(self, uri: str, options: storage.StorageOptions = None) -> None:
        """Write the artifact; an existing card is removed first, so no reader pairs it with new arrays."""
        storage.remove(storage.join(uri, CARD_NAME), options)
        storage.write_text(storage.join(uri, "train_ids.json"), json.dumps(self.train_ids), options)
        storage.write_bytes(storage.join(uri, "global.faiss"), faiss.serialize_index(self.index).tobytes(), options)
        for shape, layer in zip(self.card.layer_shapes, self.gallery):
            storage.write_npy(storage.join(uri, "pyramid", f"{shape.name}.npy"), layer, options)
        storage.write_text(storage.join(uri, CARD_NAME), json.dumps(dataclasses.asdict(self.card), indent=2), options)

    @classmethod
    def load(cls, uri: str, options: storage.StorageOptions = None) -> SpadeModel:
        card = load_card(uri, options)
        index_bytes = np.frombuffer(storage.read_bytes(storage.join(uri, "global.faiss"), options), dtype=np.uint8)
        gallery = [
            storage.read_npy(storage.join(uri, "pyramid", f"{shape.name}.npy"), options) for shape in card.layer_shapes
        ]
        train_ids = json.loads(storage.read_text(storage.join(uri, "train_ids.json"), options))
        return cls(card=card, train_ids=train_ids, index=faiss.deserialize_index(index_bytes), gallery=gallery)


def load_card(uri: str, options: storage.StorageOptions = None) -> ModelCard:
    """The model's spade.json only (cheap: no gallery)."""
    card_uri = storage.join(uri, CARD_NAME)
    if not storage.exists(card_uri, options):
        raise FileNotFoundError(f"no model at {uri}: {CARD_NAME} is missing; run `spade-batch fit` first")
    card = ModelCard(**json.loads(storage.read_text(card_uri, options)))
    if card.schema_version != MODEL_SCHEMA_VERSION:
        raise ValueError(f"model {uri} has schema version {card.schema_version}; this package reads {MODEL_SCHEMA_VERSION}")
    return card


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


def build_model(
    features: FeatureTable,
    settings: Settings,
    preprocessing: dict[str, Any],
    weights_sha256: str,
    train_manifest_sha256: str,
) -> SpadeModel:
    """Model from the features of the normal training images (failed images are recorded and left out)."""
    valid = features.valid()
    if len(valid) < settings.k:
        raise ValueError(
            f"k={settings.k} nearest normal images requested but only {len(valid)} usable training images "
            f"({len(features) - len(valid)} failed); lower k or add normal images"
        )
    card = ModelCard(
        settings=settings.model_dict(),
        preprocessing=preprocessing,
        weights_sha256=weights_sha256,
        layers=[vars(shape) for shape in features.layer_shapes],
        global_dim=int(valid.global_features.shape[1]),
        train_count=len(valid),
        train_manifest_sha256=train_manifest_sha256,
        failed_train_images=[
            {"id": i, "error": e} for i, e in zip(features.ids, features.errors) if e is not None
        ],
    )
    index = build_index(valid.global_features, settings.index, settings.ivf_lists, settings.seed, settings.k)
    return SpadeModel(card=card, train_ids=valid.ids, index=index, gallery=valid.layers)
