"""Pixel matching that survives a growing gallery: each pixel's kappa nearest pixels among an image's K retrieved
normal images, and which retrieved image each came from (formats.matches.PixelMatches), updated when the
retrieved images change.

SPADE's map of an image is, per layer and pixel, the mean of the kappa smallest squared distances to the
pixels of its K retrieved images (spade.nearest_matches). When the gallery grows (add), an image's retrieved
set changes from S_old to S_new: some images join, as many leave. For a pixel none of whose kappa matches
came from an image that left, the kappa smallest over S_new are the kappa smallest of its matches and of
its matches among the images that joined. A pixel that lost a match is searched again among the images
that stayed, then among those that joined. So only the joined images, and the pixels that lost a match,
are searched, and the result is a full search's (to float32 rounding). A first search is the same update
from nothing: every retrieved image joined.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import torch

from spade_batch.formats.matches import MAX_NEIGHBOURS, PixelMatches
from spade_batch.method import spade

GalleryRows = Callable[[Sequence[str], int], torch.Tensor]
"""(ids, layer) -> (len(ids) * h_l*w_l) x C_l float32 centred pixel features of those gallery images, one image after another."""


def match_pixels(
    queries: Sequence[torch.Tensor],
    neighbour_ids: Sequence[str],
    gallery: GalleryRows,
    kappa: int,
    previous: PixelMatches | None = None,
    chunk_bytes: int = spade.DEFAULT_CHUNK_BYTES,
    precision: str = "float32",
) -> PixelMatches:
    """One image's matches with its retrieved images, updated from `previous` (its matches with an earlier set).

    Args:
        queries: per layer, h_l*w_l x C_l float32 centred pixel features of the image.
        neighbour_ids: its K retrieved gallery images, nearest first.
        gallery: the retrieved images' pixel features (GalleryRows), on the queries' device.
        kappa, chunk_bytes, precision: as spade.nearest_matches.
        previous: its matches with the images an earlier gallery retrieved; None searches every image.
    """
    if len(neighbour_ids) > MAX_NEIGHBOURS:
        raise ValueError(f"k={len(neighbour_ids)} retrieved images: matches name at most {MAX_NEIGHBOURS}")
    before = set(previous.neighbour_ids) if previous is not None else set()
    kept = [image_id for image_id in neighbour_ids if image_id in before]
    joined = [image_id for image_id in neighbour_ids if image_id not in before]
    position = {image_id: n for n, image_id in enumerate(neighbour_ids)}
    distances, sources = [], []
    for layer, query in enumerate(queries):
        nearest, source = _carried(previous, layer, position, query.shape[0], kappa, query.device)
        stale = torch.isinf(nearest).any(dim=1)
        if kept and stale.any():
            nearest[stale], source[stale] = _search(query[stale], kept, layer, gallery, position, kappa, chunk_bytes, precision)
        if joined:
            nearest, source = _merge(nearest, source, *_search(query, joined, layer, gallery, position, kappa, chunk_bytes, precision), kappa)
        distances.append(nearest.cpu().numpy())
        sources.append(source.to(torch.int16).cpu().numpy())
    return PixelMatches(list(neighbour_ids), distances, sources)


def _carried(
    previous: PixelMatches | None, layer: int, position: dict[str, int], pixels: int, kappa: int, device: torch.device,
) -> tuple[torch.Tensor, torch.Tensor]:
    """P x kappa distances and sources (positions in the new set) that stay valid: the previous matches of each
    pixel whose matches all came from images still retrieved; infinite for the other pixels."""
    if previous is None:
        return torch.full((pixels, kappa), torch.inf, device=device), torch.zeros((pixels, kappa), dtype=torch.int64, device=device)
    moved = np.array([position.get(image_id, -1) for image_id in previous.neighbour_ids], np.int64)
    source = moved[previous.sources[layer].astype(np.int64)]
    nearest = np.array(previous.distances[layer], np.float32)
    lost = (source < 0).any(axis=1)
    nearest[lost], source[lost] = np.inf, 0
    return torch.from_numpy(nearest).to(device), torch.from_numpy(source).to(device)


def _search(
    query: torch.Tensor, ids: Sequence[str], layer: int, gallery: GalleryRows, position: dict[str, int], kappa: int,
    chunk_bytes: int, precision: str,
) -> tuple[torch.Tensor, torch.Tensor]:
    """P x kappa nearest distances of the query pixels (P x C) among these images' pixels, and their images' positions;
    infinite beyond the images' pixel count."""
    rows = gallery(ids, layer)
    per_image = rows.shape[0] // len(ids)
    found = min(kappa, rows.shape[0])
    nearest, row = spade.nearest_matches(query[None], rows[None], found, chunk_bytes, precision)
    images = torch.tensor([position[image_id] for image_id in ids], dtype=torch.int64, device=query.device)
    nearest, source = nearest[0], images[row[0] // per_image]
    if found < kappa:
        missing = kappa - found
        nearest = torch.cat([nearest, nearest.new_full((nearest.shape[0], missing), torch.inf)], dim=1)
        source = torch.cat([source, source.new_zeros((source.shape[0], missing))], dim=1)
    return nearest, source


def _merge(
    nearest: torch.Tensor, source: torch.Tensor, other: torch.Tensor, other_source: torch.Tensor, kappa: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The kappa smallest of two P x kappa match lists, ascending."""
    values, order = torch.cat([nearest, other], dim=1).topk(kappa, dim=1, largest=False)
    return values, torch.cat([source, other_source], dim=1).gather(1, order)
