"""Features of images: preprocessing and the frozen backbone, in batches, one backbone per process."""

from __future__ import annotations

import functools
import json
import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from spade_batch.config import Settings
from spade_batch.formats.features import FeatureTable, LayerShape
from spade_batch.formats.images import Preprocessing, resize_for_model
from spade_batch.method.backbone import FeaturePyramid, load_backbone


def resolve_device(requested: str) -> torch.device:
    """auto: CUDA when this process can see a GPU, else CPU."""
    if requested == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if requested == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("device 'cuda' requested but torch sees no GPU here; use device: auto or cpu")
    return torch.device(requested)


@dataclass(frozen=True)
class Features:
    """Features of a batch of B images.

    Attributes:
        global_features: B x D float32 (raw, uncentred).
        layers: per pyramid layer, B x C_l x h_l x w_l float32 (raw), on the extractor's device.
    """

    global_features: torch.Tensor
    layers: list[torch.Tensor]

    def pixel_rows(self) -> list[np.ndarray]:
        """Per layer, B x (h * w) x C float16 on the CPU: the gallery and Parquet layout (channels last)."""
        return [layer.permute(0, 2, 3, 1).flatten(1, 2).to(torch.float16).cpu().numpy() for layer in self.layers]

    @classmethod
    def of_table(cls, table: FeatureTable) -> Features:
        """The stored features of a block (float16 pixel rows) as B x C_l x h_l x w_l float32 layers, on the CPU."""
        layers = [
            torch.from_numpy(layer.astype(np.float32)).view(len(table), s.height, s.width, s.channels).permute(0, 3, 1, 2)
            for layer, s in zip(table.layers, table.layer_shapes)
        ]
        return cls(torch.from_numpy(np.asarray(table.global_features, np.float32)), layers)


def normalise(batch: torch.Tensor, spec: Preprocessing) -> torch.Tensor:
    """B x size x size x 3 uint8 (any device) -> B x 3 x size x size float32: ``(x/255 - mean) / std``."""
    mean = torch.tensor(spec.mean, dtype=torch.float32, device=batch.device).view(1, 3, 1, 1)
    std = torch.tensor(spec.std, dtype=torch.float32, device=batch.device).view(1, 3, 1, 1)
    return ((batch.permute(0, 3, 1, 2).float().div_(255) - mean) / std).contiguous()


def pool_features(layer: torch.Tensor, size: int) -> torch.Tensor:
    """Locally aware features (PatchCore): each cell of B x C x h x w features replaced by the mean over the
    size x size cells around it, a border cell's over its in-image neighbours only; size 1 returns the input."""
    if size == 1:
        return layer
    return F.avg_pool2d(layer, size, stride=1, padding=size // 2, count_include_pad=False)


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
        self.levels, self.feature_pool = settings.method.levels, settings.feature_pool

    @property
    def layer_shapes(self) -> list[LayerShape]:
        """The shapes of the pixel-feature maps in use (the levels of settings.layers)."""
        spec = self.pyramid.spec
        side = self.preprocessing.size
        return [
            LayerShape(spec.layers[level], math.ceil(side / spec.strides[level]), math.ceil(side / spec.strides[level]), spec.channels[level])
            for level in self.levels
        ]

    @property
    def pixel_features(self) -> dict[str, object]:
        """What, besides the backbone and preprocessing, makes the stored pixel features: {} for SPADE's (every level, no
        pooling), else {"layers", "feature_pool"}; extraction records it so that parts are reused only for the same."""
        if self.levels == (0, 1, 2) and self.feature_pool == 1:
            return {}
        return {"layers": [level + 1 for level in self.levels], "feature_pool": self.feature_pool}

    @property
    def global_dim(self) -> int:
        return self.pyramid.spec.global_dim

    def prepare(self, image: np.ndarray) -> np.ndarray:
        """H x W x 3 uint8 image -> S x S x 3 uint8 at the working size (what a CPU decode worker does)."""
        return resize_for_model(image, self.preprocessing)

    def forward(self, prepared: np.ndarray) -> Features:
        """B x S x S x 3 uint8 prepared images -> their features, in backbone batches of batch_size."""
        globals_, layers = [], []
        for start in range(0, len(prepared), self.batch_size):
            batch = torch.from_numpy(np.ascontiguousarray(prepared[start : start + self.batch_size])).to(self.device)
            with torch.inference_mode():
                pooled, pyramid = self.pyramid(normalise(batch, self.preprocessing))
            globals_.append(pooled.float())
            layers.append([pool_features(pyramid[level].float(), self.feature_pool) for level in self.levels])
        return Features(torch.cat(globals_), [torch.cat(per_layer) for per_layer in zip(*layers)])


def _freeze(options: dict | None) -> str:
    """Storage options as a hashable cache key."""
    return json.dumps(options or {}, sort_keys=True, default=str)


@functools.lru_cache(maxsize=2)
def _cached_backbone(name: str, weights: str, seed: int, options_json: str, device: str) -> tuple[FeaturePyramid, str]:
    """One backbone per process and settings: Ray reuses worker processes across tasks."""
    return load_backbone(name, weights, seed=seed, storage_options=json.loads(options_json), device=device)


def backbone_loads() -> int:
    """How many backbones this process has loaded (each model actor should load one)."""
    return _cached_backbone.cache_info().misses
