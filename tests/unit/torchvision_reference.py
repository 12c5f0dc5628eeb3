"""torchvision's own preprocessing, the independent reference for images.py and the Extractor."""

from __future__ import annotations

import numpy as np
import torch
import torchvision.transforms.v2.functional as TF
from torchvision.transforms import InterpolationMode

from spade_batch.formats.images import Preprocessing


def torchvision_geometry(image: np.ndarray, spec: Preprocessing, nearest: bool = False) -> np.ndarray:
    """H x W x C (or H x W) array -> size x size (x C) with torchvision's Resize (+ CenterCrop in paper mode)."""
    t = torch.from_numpy(np.ascontiguousarray(image))
    t = t.permute(2, 0, 1) if t.ndim == 3 else t[None]
    interpolation = InterpolationMode.NEAREST_EXACT if nearest else InterpolationMode.BILINEAR
    size = [spec.size, spec.size] if spec.mode == "full" else [spec.resize_to]
    t = TF.resize(t, size, interpolation=interpolation, antialias=not nearest)
    if spec.mode == "paper":
        t = TF.center_crop(t, [spec.size, spec.size])
    return t.permute(1, 2, 0).numpy() if image.ndim == 3 else t[0].numpy()


def torchvision_input(image: np.ndarray, spec: Preprocessing) -> torch.Tensor:
    """H x W x 3 uint8 -> 3 x size x size float32: the backbone's input as torchvision would make it."""
    resized = torch.from_numpy(torchvision_geometry(image, spec)).permute(2, 0, 1)
    return TF.normalize(TF.to_dtype(resized, torch.float32, scale=True), list(spec.mean), list(spec.std))
