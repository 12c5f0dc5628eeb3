"""SPADE's math (Cohen & Hoshen 2020): image kNN scores and pixel correspondence maps.

Pure numpy/torch, CPU or CUDA; nothing here knows of Ray, storage or the backbone.
All distances are *squared* L2, as in the paper.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Protocol

import numpy as np
import torch
import torch.nn.functional as F

from spade_batch.method.pixel_search import DEFAULT_CHUNK_BYTES, batch_nearest_sq_distances, local_nearest_matches


class NearestNeighbourIndex(Protocol):
    """What image_knn needs of a search index (faiss.IndexFlatL2 and faiss IVF indexes qualify)."""

    ntotal: int

    def search(self, x: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]: ...


def image_knn(
    index: NearestNeighbourIndex, queries: np.ndarray, k: int, exclude: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Image-level anomaly scores: mean squared L2 distance to the K nearest normal images.

    Args:
        index: squared-L2 index over the N normal global features (D-dim).
        queries: M x D float32 global features of the test images.
        k: number of nearest normal images, 1 <= k <= N (k < N with exclude).
        exclude: M int64 index rows, each query's own (leave-one-out: a gallery image scored against the
            others), or -1 for none; or M x E rows per query (its own and its near-copies', padded with -1). An
            excluded row is never a neighbour, so it is absent from the pixel search too, which only visits the K
            retrieved images.

    Returns:
        scores: M float32, mean of the K squared distances.
        neighbours: M x K int64 indices into the normal images, nearest first.
    """
    rows = None if exclude is None else np.asarray(exclude, np.int64).reshape(len(queries), -1)
    excluded = 0 if rows is None else rows.shape[1]
    usable = index.ntotal - excluded
    if not 1 <= k <= usable:
        raise ValueError(
            f"k={k} nearest normal images requested but the model holds {index.ntotal}"
            + (f" ({excluded} of them excluded: the image itself and its near-copies)" if excluded else "")
            + f"; use k between 1 and {usable} or fit on more normal images"
        )
    distances, neighbours = nearest_images(index, queries, k, rows)
    return distances.mean(axis=1, dtype=np.float64).astype(np.float32), neighbours


def nearest_images(index: NearestNeighbourIndex, queries: np.ndarray, k: int, exclude: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """The K nearest normal images of each query: M x K float32 squared distances and M x K int64 rows, nearest first.

    exclude: M x E rows never returned (-1: none), as image_knn's; k + E <= N (image_knn checks it).
    """
    queries = np.ascontiguousarray(queries, dtype=np.float32)
    if exclude is None:
        distances, neighbours = index.search(queries, k)
    else:
        distances, neighbours = _without_rows(*index.search(queries, k + exclude.shape[1]), exclude, k)
    return distances, neighbours.astype(np.int64)


def _without_rows(distances: np.ndarray, neighbours: np.ndarray, exclude: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """The k nearest of M x (k + E) search results once each query's E excluded rows are taken out."""
    keep = (neighbours[:, :, None] != exclude[:, None, :]).all(axis=2)
    order = np.argsort(~keep, axis=1, kind="stable")[:, :k]  # the kept results first, in their order
    return np.take_along_axis(distances, order, axis=1), np.take_along_axis(neighbours, order, axis=1)


def centre(features: torch.Tensor, mean: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """Features minus a per-channel mean, in float32: the input contract of the pixel search.

    Squared distances are translation invariant, but float32 |q|^2 - 2 q.g + |g|^2 cancels catastrophically
    when the common offset dominates (raw wide_resnet50_2 features have |x|^2 near 1e6): neighbour sets then
    differ from float64. Subtract the same mean, e.g. the training features' channel mean of the layer, from
    both the gallery and the queries. Any vector near the data's centre works; it need not be exact.

    Args:
        features: any shape with C channels along `dim`, any float dtype (float16 banks included).
        mean: C per-channel values (any float dtype, any device).
        dim: the channel dimension of `features` (-1 for N x C galleries, 1 for B x C x h x w queries).

    Returns:
        float32 tensor of features' shape and device.
    """
    shape = [1] * features.dim()
    shape[dim] = -1
    return features.to(torch.float32) - mean.to(features.device, torch.float32).reshape(shape)


def layer_score_maps(
    queries: torch.Tensor,
    galleries: torch.Tensor,
    kappa: int = 1,
    chunk_bytes: int = DEFAULT_CHUNK_BYTES,
    precision: str = "float32",
    radius: int | None = None,
) -> torch.Tensor:
    """One pyramid layer's anomaly maps of B test images at the layer's own resolution.

    Args:
        queries: B x C x h x w float32 centred features of the test images.
        galleries: B x G x C float32 centred pixel features of each image's retrieved normal images
            (any grids, flattened; with a radius, K images on the queries' h x w grid).
        radius: None: SPADE's full search; else each cell is matched within this many cells of its own
            position (local_nearest_matches).

    Returns:
        B x h x w float32 squared distances (see batch_nearest_sq_distances).
    """
    batch, channels, height, width = queries.shape
    pixels = queries.reshape(batch, channels, height * width).transpose(1, 2)
    if radius is None:
        return batch_nearest_sq_distances(pixels, galleries, kappa, chunk_bytes, precision).reshape(batch, height, width)
    distances = local_nearest_matches(pixels, galleries, (height, width), radius, kappa, chunk_bytes, precision)[0].mean(dim=-1)
    if torch.isinf(distances).any():
        raise ValueError(f"kappa={kappa} exceeds the cells some {height} x {width} cell's neighbourhood of radius {radius} holds; lower kappa")
    return distances.reshape(batch, height, width)


def upsample(score_map: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Bilinear resize (align_corners=False) of ... x h x w maps to ... x H x W, size = (H, W)."""
    lead, (height, width) = score_map.shape[:-2], score_map.shape[-2:]
    flat = score_map.reshape(-1, 1, height, width)
    return F.interpolate(flat, size=size, mode="bilinear", align_corners=False).reshape(*lead, *size)


def gaussian_kernel(sigma: float, truncate: float = 4.0) -> torch.Tensor:
    """scipy.ndimage's 1-D Gaussian: radius int(truncate * sigma + 0.5), normalised to sum 1 (float64)."""
    radius = int(truncate * sigma + 0.5)
    offsets = torch.arange(-radius, radius + 1, dtype=torch.float64)
    weights = torch.exp(-0.5 * (offsets / sigma) ** 2)
    return weights / weights.sum()


def _smooth_last_axis(values: torch.Tensor, kernel: torch.Tensor) -> torch.Tensor:
    """Correlate ... x L values along the last axis with kernel, scipy 'reflect' borders (d c b a | a b c d)."""
    radius = (kernel.numel() - 1) // 2
    length = values.shape[-1]
    # np.pad 'symmetric' is scipy's 'reflect', and repeats the reflection when radius > length.
    source = torch.from_numpy(np.pad(np.arange(length), radius, mode="symmetric")).to(values.device)
    padded = values.index_select(-1, source).reshape(-1, 1, length + 2 * radius)
    return F.conv1d(padded, kernel.to(values.device)[None, None, :]).reshape(values.shape)


def gaussian_smooth(score_map: torch.Tensor, sigma: float = 4.0, truncate: float = 4.0) -> torch.Tensor:
    """Gaussian filter of each H x W map of a ... x H x W tensor, scipy.ndimage.gaussian_filter semantics.

    Computed in the input's floating dtype (float32 maps: within rtol 1e-5 of scipy's float64, and 4x faster on
    CPU than in float64, where torch's conv1d has no fast kernel: 5 ms of a 128 px map's scoring); sigma in pixels,
    0 disables it.
    """
    if sigma <= 0:
        return score_map
    kernel = gaussian_kernel(sigma, truncate).to(score_map.dtype)
    smoothed = _smooth_last_axis(score_map, kernel)
    smoothed = _smooth_last_axis(smoothed.transpose(-1, -2), kernel).transpose(-1, -2)
    return smoothed.contiguous()


def anomaly_maps(
    query_layers: Sequence[torch.Tensor],
    gallery_layers: Sequence[torch.Tensor],
    output_size: tuple[int, int],
    kappa: int = 1,
    sigma: float = 4.0,
    chunk_bytes: int = DEFAULT_CHUNK_BYTES,
    precision: str = "float32",
    layer_scales: Sequence[float] | None = None,
) -> torch.Tensor:
    """SPADE pixel anomaly maps of B test images, each against its own retrieved normal images.

    Per layer l: squared distance of each test pixel feature to its kappa nearest pixel features of
    the image's retrieved normal images (batch_nearest_sq_distances, one batched GEMM per gallery chunk),
    upsampled bilinearly (align_corners=False) to output_size; layers averaged with equal weight; then
    Gaussian smoothing with scipy.ndimage.gaussian_filter semantics. Low precision changes a map only
    through the distances (see batch_nearest_sq_distances for the tolerance).

    Args:
        query_layers: per layer, B x C_l x h_l x w_l float32 centred features of the test images.
        gallery_layers: per layer, B x G_l x C_l float32 centred pixel features of each image's K
            retrieved normal images (gather_galleries, then centre with the same mean).
        output_size: (H, W) of the maps, the working image size in pixels.
        kappa: nearest gallery features averaged per pixel.
        sigma: Gaussian smoothing in output pixels, 0 disables it.
        chunk_bytes: bound on one distance block, in bytes.
        precision: one of PRECISIONS.
        layer_scales: L positive values each layer's distances are divided by before the average (the
            layers' spread on normal images, see calibrate.layer_scales); None: the paper's plain average.

    Returns:
        B x H x W float32 maps (squared feature distance units, or units of the layer scales).
    """
    layers = layer_distance_maps(query_layers, gallery_layers, kappa, chunk_bytes, precision)
    return combine_layer_maps(layers, output_size, sigma, layer_scales)


def layer_distance_maps(
    query_layers: Sequence[torch.Tensor],
    gallery_layers: Sequence[torch.Tensor],
    kappa: int = 1,
    chunk_bytes: int = DEFAULT_CHUNK_BYTES,
    precision: str = "float32",
    radii: Sequence[int | None] | None = None,
) -> list[torch.Tensor]:
    """anomaly_maps' first half: per layer, B x h_l x w_l float32 squared distances (layer_score_maps).

    radii: per layer, its match radius in cells (None: the full search); None: the full search on every layer.
    """
    if len(query_layers) != len(gallery_layers):
        raise ValueError(f"{len(query_layers)} query layers but {len(gallery_layers)} gallery layers")
    radii = radii if radii is not None else [None] * len(query_layers)
    return [layer_score_maps(q, g, kappa, chunk_bytes, precision, r) for q, g, r in zip(query_layers, gallery_layers, radii)]


def combine_layer_maps(
    layer_maps: Sequence[torch.Tensor], output_size: tuple[int, int], sigma: float = 4.0, layer_scales: Sequence[float] | None = None
) -> torch.Tensor:
    """anomaly_maps' second half: per-layer B x h_l x w_l maps -> B x H x W (upsample, / scale, average, smooth)."""
    scales = [1.0] * len(layer_maps) if layer_scales is None else list(layer_scales)
    if len(scales) != len(layer_maps) or min(scales) <= 0:
        raise ValueError(f"layer_scales must be {len(layer_maps)} positive values, got {scales}")
    maps = [upsample(layer_map, output_size) / scale for layer_map, scale in zip(layer_maps, scales)]
    return gaussian_smooth(torch.stack(maps).mean(dim=0), sigma)


def map_scores(maps: torch.Tensor, top: float = 0.0) -> torch.Tensor:
    """Image scores read off anomaly maps: the maximum pixel, or the mean of the highest `top` fraction.

    Args:
        maps: B x H x W anomaly maps.
        top: fraction of each map's pixels averaged, in [0, 1]; 0 takes the single maximum, otherwise
            ceil(top * H * W) pixels (at least one).

    Returns:
        B float32 scores, in the maps' units.
    """
    if not 0 <= top <= 1:
        raise ValueError(f"top must be a fraction in [0, 1], got {top}")
    flat = maps.reshape(maps.shape[0], -1).to(torch.float32)
    count = max(1, math.ceil(top * flat.shape[1]))
    return flat.topk(count, dim=1).values.mean(dim=1)


def gather_galleries(
    layer_bank: torch.Tensor | np.ndarray,
    neighbours: torch.Tensor | np.ndarray,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """Pixel galleries of B test images' retrieved normal images, for one layer.

    Only the distinct retrieved rows of the bank are read, once each and in ascending order, so a
    memory-mapped bank (np.load(..., mmap_mode="r")) is touched only at those rows; they are moved to
    `device` in the bank's dtype and converted there.

    Args:
        layer_bank: N x P x C pixel features of all N normal images: a torch tensor, or a numpy array or
            np.memmap (usually float16).
        neighbours: B x K int indices of each test image's retrieved normal images.
        dtype: dtype of the result.
        device: device of the result; default the bank's (CPU for numpy).

    Returns:
        B x (K * P) x C tensor; row k * P + p of image b is pixel p of normal image neighbours[b, k].
    """
    chosen = np.asarray(neighbours.cpu() if isinstance(neighbours, torch.Tensor) else neighbours, dtype=np.int64)
    if chosen.ndim != 2 or chosen.size and not 0 <= chosen.min() <= chosen.max() < layer_bank.shape[0]:
        raise ValueError(f"neighbours must be B x K indices into the {layer_bank.shape[0]} normal images")
    distinct, inverse = np.unique(chosen, return_inverse=True)
    if isinstance(layer_bank, torch.Tensor):
        rows = layer_bank.index_select(0, torch.from_numpy(distinct).to(layer_bank.device))
    else:
        rows = torch.from_numpy(np.ascontiguousarray(layer_bank[distinct]))
    rows = rows.to(device if device is not None else rows.device).to(dtype)
    batch = chosen.shape[0]
    gathered = rows.index_select(0, torch.from_numpy(inverse.reshape(-1)).to(rows.device))
    return gathered.reshape(batch, -1, layer_bank.shape[-1])
