"""The in-process API: fit on images, score images. No Ray, no storage.

    from spade_batch.detector import fit, score
    model = fit(normal_images, Settings(backbone="resnet18", weights="random", k=5))
    results = score(model, test_images)          # list[ImageScore]

The Ray pipeline calls exactly these classes (Extractor, Scorer, build_model), so both give the
same numbers.
"""

from __future__ import annotations

import functools
import json
import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from spade_batch import spade
from spade_batch.backbone import FeaturePyramid, load_backbone
from spade_batch.calibrate import calibrate
from spade_batch.config import Settings
from spade_batch.features import FeatureTable, LayerShape
from spade_batch.images import Preprocessing, preprocess
from spade_batch.model import SpadeModel, build_model


def resolve_device(requested: str) -> torch.device:
    """auto: CUDA when this process can see a GPU, else CPU."""
    if requested == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if requested == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("device 'cuda' requested but torch sees no GPU here; use device: auto or cpu")
    return torch.device(requested)


class Extractor:
    """Preprocess + backbone, in batches.

    ``preprocessing`` defaults to the backbone's own input convention at settings.image_size and
    settings.preprocess; scoring passes the model card's, so a model keeps the convention it was fitted with.
    """

    def __init__(
        self,
        settings: Settings,
        storage_options: dict | None = None,
        device: torch.device | None = None,
        preprocessing: Preprocessing | None = None,
    ):
        self.device = device or resolve_device(settings.device)
        self.batch_size = settings.batch_size
        self.pyramid, self.weights_sha256 = _cached_backbone(
            settings.backbone, settings.weights, settings.seed, _freeze(storage_options), str(self.device)
        )
        spec = self.pyramid.spec
        self.preprocessing = preprocessing or Preprocessing(settings.image_size, settings.preprocess, spec.mean, spec.std)

    @property
    def layer_shapes(self) -> list[LayerShape]:
        spec = self.pyramid.spec
        side = self.preprocessing.size
        return [
            LayerShape(name, math.ceil(side / stride), math.ceil(side / stride), channels)
            for name, stride, channels in zip(spec.layers, spec.strides, spec.channels)
        ]

    def forward(self, images: Sequence[np.ndarray]) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """H x W x 3 uint8 images -> (N x D float32 global, per layer N x C x h x w float32), on self.device."""
        globals_, layers = [], []
        for start in range(0, len(images), self.batch_size):
            batch = torch.stack([preprocess(image, self.preprocessing) for image in images[start : start + self.batch_size]])
            with torch.inference_mode():
                pooled, pyramid = self.pyramid(batch.to(self.device))
            globals_.append(pooled.float())
            layers.append([layer.float() for layer in pyramid])
        return torch.cat(globals_), [torch.cat(per_layer) for per_layer in zip(*layers)]

    def feature_table(
        self, images: Sequence[np.ndarray | None], ids: Sequence[str], uris: Sequence[str], errors: Sequence[str | None]
    ) -> FeatureTable:
        """Features of decoded images; entries whose image is None (failed decode) get zero rows and their error."""
        ok = [i for i, image in enumerate(images) if image is not None]
        shapes = self.layer_shapes
        count = len(images)
        global_features = np.zeros((count, self.pyramid.spec.global_dim), dtype=np.float32)
        layers = [np.zeros((count, s.height * s.width, s.channels), dtype=np.float16) for s in shapes]
        if ok:
            pooled, pyramid = self.forward([images[i] for i in ok])
            global_features[ok] = pooled.cpu().numpy()
            for bank, layer in zip(layers, pyramid):
                bank[ok] = layer.permute(0, 2, 3, 1).flatten(1, 2).to(torch.float16).cpu().numpy()
        return FeatureTable(
            ids=list(ids),
            uris=list(uris),
            heights=np.array([0 if im is None else im.shape[0] for im in images], dtype=np.int32),
            widths=np.array([0 if im is None else im.shape[1] for im in images], dtype=np.int32),
            global_features=global_features,
            layers=layers,
            layer_shapes=shapes,
            errors=list(errors),
        )


def _freeze(options: dict | None) -> str:
    """Storage options as a hashable cache key."""
    return json.dumps(options or {}, sort_keys=True, default=str)


@functools.lru_cache(maxsize=2)
def _cached_backbone(name: str, weights: str, seed: int, options_json: str, device: str) -> tuple[FeaturePyramid, str]:
    """One backbone per process and settings: Ray reuses worker processes across tasks."""
    return load_backbone(name, weights, seed=seed, storage_options=json.loads(options_json), device=device)


@dataclass(frozen=True)
class ImageScore:
    """Result for one image.

    Attributes:
        score: image anomaly score (mean squared distance to the K nearest normal images).
        neighbours: K int64 indices into model.train_ids, nearest first.
        anomaly_map: S x S float32 pixel scores at the working size (squared feature distance).
    """

    score: float
    neighbours: np.ndarray
    anomaly_map: np.ndarray


class Scorer:
    """Scores images against a fitted model; holds the gallery as torch views of the model's arrays."""

    def __init__(self, model: SpadeModel, extractor: Extractor, chunk_bytes: int = spade.DEFAULT_CHUNK_BYTES):
        settings = model.card.settings
        self.model = model
        self.extractor = extractor
        self.k, self.kappa, self.sigma = settings["k"], settings["kappa"], settings["sigma"]
        self.chunk_bytes = chunk_bytes
        with warnings.catch_warnings():
            # Ray hands out read-only views of its object store; torch only reads them.
            warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
            self.gallery = [torch.from_numpy(np.asarray(bank)).to(extractor.device) for bank in model.gallery]

    def score(self, images: Sequence[np.ndarray]) -> list[ImageScore]:
        if not images:
            return []
        pooled, pyramid = self.extractor.forward(images)
        scores, neighbours = spade.image_knn(self.model.index, pooled.cpu().numpy(), self.k)
        size = (self.extractor.preprocessing.size, self.extractor.preprocessing.size)
        results = []
        for i in range(len(images)):
            nearest = torch.from_numpy(neighbours[i])
            galleries = [spade.gather_gallery(bank, nearest) for bank in self.gallery]
            anomaly_map = spade.anomaly_map(
                [layer[i] for layer in pyramid], galleries, size, self.kappa, self.sigma, self.chunk_bytes
            )
            results.append(ImageScore(float(scores[i]), neighbours[i], anomaly_map.cpu().numpy()))
        return results


def fit(
    images: Sequence[np.ndarray],
    settings: Settings,
    ids: Sequence[str] | None = None,
    calibration_images: Sequence[np.ndarray] = (),
) -> SpadeModel:
    """Fit on normal H x W x 3 uint8 images; optional held-out normal images calibrate the thresholds."""
    ids = list(ids) if ids is not None else [f"{i:06d}" for i in range(len(images))]
    extractor = Extractor(settings)
    table = extractor.feature_table(images, ids, ids, [None] * len(images))
    model = build_model(table, settings, extractor.preprocessing.to_dict(), extractor.weights_sha256, "in-process")
    if calibration_images:
        results = Scorer(model, extractor, settings.chunk_mib * 2**20).score(calibration_images)
        model = calibrate(model, results, settings)
    return model


def score(model: SpadeModel, images: Sequence[np.ndarray], settings: Settings | None = None) -> list[ImageScore]:
    """Score H x W x 3 uint8 images; settings give the device and batch size, the model keys are the model's own."""
    settings = (settings or Settings()).replace(**model.card.settings)
    extractor = Extractor(settings, preprocessing=Preprocessing.from_dict(model.card.preprocessing))
    return Scorer(model, extractor, settings.chunk_mib * 2**20).score(images)
