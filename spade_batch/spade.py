"""SPADE's math (Cohen & Hoshen 2020): image kNN scores and pixel correspondence maps.

Pure numpy/torch, CPU or CUDA; nothing here knows of Ray, storage or the backbone.
All distances are *squared* L2, as in the paper.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

import numpy as np
import torch
import torch.nn.functional as F

DEFAULT_CHUNK_BYTES = 16 * 2**20
"""Bound on the size of one query-by-gallery distance block (bytes, float32)."""


class NearestNeighbourIndex(Protocol):
    """What image_knn needs of a search index (faiss.IndexFlatL2 and faiss IVF indexes qualify)."""

    ntotal: int

    def search(self, x: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]: ...


def image_knn(index: NearestNeighbourIndex, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Image-level anomaly scores: mean squared L2 distance to the K nearest normal images.

    Args:
        index: squared-L2 index over the N normal global features (D-dim).
        queries: M x D float32 global features of the test images.
        k: number of nearest normal images, 1 <= k <= N.

    Returns:
        scores: M float32, mean of the K squared distances.
        neighbours: M x K int64 indices into the normal images, nearest first.
    """
    if not 1 <= k <= index.ntotal:
        raise ValueError(
            f"k={k} nearest normal images requested but the model holds {index.ntotal}; "
            f"use k between 1 and {index.ntotal} or fit on more normal images"
        )
    distances, neighbours = index.search(np.ascontiguousarray(queries, dtype=np.float32), k)
    return distances.mean(axis=1, dtype=np.float64).astype(np.float32), neighbours.astype(np.int64)


def nearest_sq_distances(
    queries: torch.Tensor,
    gallery: torch.Tensor,
    kappa: int = 1,
    chunk_bytes: int = DEFAULT_CHUNK_BYTES,
) -> torch.Tensor:
    """Mean squared L2 distance from each query vector to its kappa nearest gallery vectors.

    Uses |q - g|^2 = |q|^2 - 2 q.g + |g|^2 with one GEMM per gallery chunk; a chunk's
    P x rows float32 block stays under chunk_bytes, and every gallery row is visited.

    Args:
        queries: P x C float32.
        gallery: G x C float32, on the same device.
        kappa: number of nearest gallery vectors averaged, 1 <= kappa <= G.
        chunk_bytes: bound on one distance block, in bytes.

    Returns:
        P float32 distances (non-negative).
    """
    num_gallery = gallery.shape[0]
    if not 1 <= kappa <= num_gallery:
        raise ValueError(f"kappa={kappa} must be between 1 and the gallery size {num_gallery}")
    rows = max(kappa, chunk_bytes // (4 * max(1, queries.shape[0])))
    best: torch.Tensor | None = None
    for start in range(0, num_gallery, rows):
        block = gallery[start : start + rows]
        # |g|^2 - 2 q.g in one fused GEMM; |q|^2 is added once at the end.
        partial = torch.addmm((block * block).sum(1)[None, :], queries, block.T, alpha=-2.0)
        if kappa == 1:
            candidates = partial.amin(dim=1, keepdim=True)
            best = candidates if best is None else torch.minimum(best, candidates)
        else:
            candidates = partial.topk(min(kappa, block.shape[0]), dim=1, largest=False).values
            merged = candidates if best is None else torch.cat([best, candidates], dim=1)
            best = merged.topk(min(kappa, merged.shape[1]), dim=1, largest=False).values
    assert best is not None
    squared = best + (queries * queries).sum(1, keepdim=True)
    return squared.clamp_min_(0.0).mean(dim=1)


def layer_score_map(
    query: torch.Tensor, gallery: torch.Tensor, kappa: int = 1, chunk_bytes: int = DEFAULT_CHUNK_BYTES
) -> torch.Tensor:
    """One pyramid layer's anomaly map at the layer's own resolution.

    Args:
        query: C x h x w float32 features of the test image.
        gallery: G x C float32 pixel features of the retrieved normal images (any grids, flattened).

    Returns:
        h x w float32 squared distances.
    """
    channels, height, width = query.shape
    pixels = query.reshape(channels, height * width).T
    return nearest_sq_distances(pixels, gallery, kappa, chunk_bytes).reshape(height, width)


def upsample(score_map: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Bilinear resize (align_corners=False) of an h x w map to size = (H, W)."""
    return F.interpolate(score_map[None, None], size=size, mode="bilinear", align_corners=False)[0, 0]


def gaussian_kernel(sigma: float, truncate: float = 4.0) -> torch.Tensor:
    """scipy.ndimage's 1-D Gaussian: radius int(truncate * sigma + 0.5), normalised to sum 1 (float64)."""
    radius = int(truncate * sigma + 0.5)
    offsets = torch.arange(-radius, radius + 1, dtype=torch.float64)
    weights = torch.exp(-0.5 * (offsets / sigma) ** 2)
    return weights / weights.sum()


def _smooth_last_axis(values: torch.Tensor, kernel: torch.Tensor) -> torch.Tensor:
    """Correlate the rows of an R x L tensor with kernel, scipy 'reflect' borders (d c b a | a b c d)."""
    radius = (kernel.numel() - 1) // 2
    length = values.shape[-1]
    # np.pad 'symmetric' is scipy's 'reflect', and repeats the reflection when radius > length.
    source = torch.from_numpy(np.pad(np.arange(length), radius, mode="symmetric")).to(values.device)
    padded = values.index_select(-1, source)
    return F.conv1d(padded[:, None, :], kernel.to(values.device)[None, None, :])[:, 0, :]


def gaussian_smooth(score_map: torch.Tensor, sigma: float = 4.0, truncate: float = 4.0) -> torch.Tensor:
    """Gaussian filter of an H x W map with scipy.ndimage.gaussian_filter semantics.

    Computed in float64 and returned in the input dtype; sigma in pixels, 0 disables it.
    """
    if sigma <= 0:
        return score_map
    kernel = gaussian_kernel(sigma, truncate)
    smoothed = _smooth_last_axis(score_map.to(torch.float64), kernel)
    smoothed = _smooth_last_axis(smoothed.T.contiguous(), kernel).T
    return smoothed.to(score_map.dtype).contiguous()


def anomaly_map(
    query_layers: Sequence[torch.Tensor],
    gallery_layers: Sequence[torch.Tensor],
    output_size: tuple[int, int],
    kappa: int = 1,
    sigma: float = 4.0,
    chunk_bytes: int = DEFAULT_CHUNK_BYTES,
) -> torch.Tensor:
    """SPADE pixel anomaly map of one test image.

    Per layer l: squared distance of each test pixel feature to its kappa nearest pixel features of
    the retrieved normal images, upsampled bilinearly to output_size; layers averaged with equal
    weight; then Gaussian smoothing.

    Args:
        query_layers: per layer, C_l x h_l x w_l float32 features of the test image.
        gallery_layers: per layer, G_l x C_l float32 pixel features of the K retrieved normal images.
        output_size: (H, W) of the map, the working image size in pixels.

    Returns:
        H x W float32 map (squared feature distance units).
    """
    if len(query_layers) != len(gallery_layers):
        raise ValueError(f"{len(query_layers)} query layers but {len(gallery_layers)} gallery layers")
    maps = [
        upsample(layer_score_map(query, gallery, kappa, chunk_bytes), output_size)
        for query, gallery in zip(query_layers, gallery_layers)
    ]
    return gaussian_smooth(torch.stack(maps).mean(dim=0), sigma)


def gather_gallery(layer_bank: torch.Tensor, neighbours: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Pixel gallery of the retrieved normal images for one layer.

    Args:
        layer_bank: N x P x C (any float dtype, usually float16) pixel features of all N normal images.
        neighbours: K int64 indices of the retrieved images.

    Returns:
        (K * P) x C tensor of `dtype` on layer_bank's device.
    """
    selected = layer_bank.index_select(0, neighbours.to(layer_bank.device))
    return selected.reshape(-1, layer_bank.shape[-1]).to(dtype)
