"""Pixel matching that survives a growing gallery: each pixel's kappa nearest pixels among an image's K retrieved
normal images, and which retrieved image each came from (formats.calibration_matches.PixelMatches), updated when the
retrieved images change.

SPADE's map of an image is, per layer and pixel, the mean of the kappa smallest squared distances to the
pixels of its K retrieved images (pixel_search.nearest_matches). When the gallery grows (add), an image's retrieved
set changes from S_old to S_new: some images join, as many leave. For a pixel none of whose kappa matches
came from an image that left, the kappa smallest over S_new are the kappa smallest of its matches and of
its matches among the images that joined. A pixel that lost a match is searched again among the images
that stayed, then among those that joined. So only the joined images, and the pixels that lost a match,
are searched, and the result is a full search's (to float32 rounding). A first search is the same update
from nothing: every retrieved image joined.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from spade_batch.formats.calibration_matches import MAX_NEIGHBOURS, PixelMatches
from spade_batch.method import pixel_search

GalleryRows = Callable[[Sequence[str], int], torch.Tensor]
"""(ids, layer) -> (len(ids) * h_l*w_l) x C_l float32 centred pixel features of those gallery images, one image after another."""


def match_pixels(
    queries: Sequence[torch.Tensor],
    neighbour_ids: Sequence[str],
    gallery: GalleryRows,
    kappa: int,
    previous: PixelMatches | None = None,
    chunk_bytes: int = pixel_search.DEFAULT_CHUNK_BYTES,
    precision: str = "float32",
    grids: Sequence[tuple[int, int]] | None = None,
    radii: Sequence[int | None] | None = None,
) -> PixelMatches:
    """One image's matches with its retrieved images, updated from `previous` (its matches with an earlier set).

    Each image's candidates for a pixel do not depend on the other images, with a match radius too (the
    cells of that image near the pixel's position), so the update rule holds for the restricted search.

    Args:
        queries: per layer, h_l*w_l x C_l float32 centred pixel features of the image.
        neighbour_ids: its K retrieved gallery images, nearest first.
        gallery: the retrieved images' pixel features (GalleryRows), on the queries' device.
        kappa, chunk_bytes, precision: as pixel_search.nearest_matches.
        previous: its matches with the images an earlier gallery retrieved; None searches every image.
        grids: per layer, (h_l, w_l): where each pixel lies, for the matched cells and the radius; None: unknown
            (no radius, and the matches record no cells).
        radii: per layer, the match radius in cells (pixel_search.local_nearest_matches), None for the full search.
    """
    if len(neighbour_ids) > MAX_NEIGHBOURS:
        raise ValueError(f"k={len(neighbour_ids)} retrieved images: matches name at most {MAX_NEIGHBOURS}")
    before = set(previous.neighbour_ids) if previous is not None else set()
    kept = [image_id for image_id in neighbour_ids if image_id in before]
    joined = [image_id for image_id in neighbour_ids if image_id not in before]
    position = {image_id: n for n, image_id in enumerate(neighbour_ids)}
    radii = radii if radii is not None else [None] * len(queries)
    distances, sources, cells = [], [], []
    for layer, query in enumerate(queries):
        search = _Search(gallery, layer, position, kappa, chunk_bytes, precision, grids[layer] if grids else None, radii[layer])
        found = _carried(previous, layer, position, query.shape[0], kappa, query.device)
        stale = torch.isinf(found[0]).any(dim=1)
        if kept and stale.any():
            fresh = search(query, kept, stale)
            found = tuple(torch.where(stale[:, None], new, old) for old, new in zip(found, fresh))  # type: ignore[assignment]
        if joined:
            found = _merge(found, search(query, joined), kappa)
        distances.append(found[0].cpu().numpy())
        sources.append(found[1].to(torch.int16).cpu().numpy())
        cells.append(found[2].to(torch.int32).cpu().numpy())
    return PixelMatches(list(neighbour_ids), distances, sources, cells)


Found = tuple[torch.Tensor, torch.Tensor, torch.Tensor]
"""Per pixel, its kappa nearest matches: P x kappa float32 distances (ascending, +inf for none), int64 positions of
their images among the retrieved, int64 cells in their images (row-major; -1: unknown)."""


def _carried(previous: PixelMatches | None, layer: int, position: dict[str, int], pixels: int, kappa: int, device: torch.device) -> Found:
    """The matches that stay valid: the previous matches of each pixel whose matches all came from images still
    retrieved (sources moved to their positions in the new set); infinite for the other pixels (all without previous).
    Matches stored before cells were kept carry cell -1."""
    if previous is None:
        zeros = torch.zeros((pixels, kappa), dtype=torch.int64, device=device)
        return torch.full((pixels, kappa), torch.inf, device=device), zeros, zeros.clone()
    moved = np.array([position.get(image_id, -1) for image_id in previous.neighbour_ids], np.int64)
    source = moved[previous.sources[layer].astype(np.int64)]
    nearest = np.array(previous.distances[layer], np.float32)
    cell = previous.cells[layer].astype(np.int64) if previous.cells is not None else np.full_like(source, -1)
    lost = (source < 0).any(axis=1)
    nearest[lost], source[lost], cell[lost] = np.inf, 0, 0
    return tuple(torch.from_numpy(array).to(device) for array in (nearest, source, cell))  # type: ignore[return-value]


@dataclass(frozen=True)
class _Search:
    """One layer's search of query pixels among some retrieved images' pixels: full, or within `radius` cells on `grid`."""

    gallery: GalleryRows
    layer: int
    position: dict[str, int]
    kappa: int
    chunk_bytes: int
    precision: str
    grid: tuple[int, int] | None
    radius: int | None

    def __call__(self, query: torch.Tensor, ids: Sequence[str], only: torch.Tensor | None = None) -> Found:
        """The P query pixels' (P x C) kappa nearest among these images' pixels; +inf beyond what they hold.

        only: P bool, the pixels whose matches are wanted (the others' may be anything); None: every pixel.
        """
        rows = self.gallery(ids, self.layer)
        per_image = rows.shape[0] // len(ids)
        if self.radius is None:
            found = min(self.kappa, rows.shape[0])
            wanted = query if only is None else query[only]
            nearest, row = pixel_search.nearest_matches(wanted[None], rows[None], found, self.chunk_bytes, self.precision)
            nearest, row = F.pad(nearest[0], (0, self.kappa - found), value=torch.inf), F.pad(row[0], (0, self.kappa - found))
            if only is not None:
                nearest = torch.full((query.shape[0], self.kappa), torch.inf, device=query.device).index_put_((only,), nearest)
                row = torch.zeros((query.shape[0], self.kappa), dtype=torch.int64, device=query.device).index_put_((only,), row)
        else:  # the neighbourhoods need the whole grid
            if self.grid is None:
                raise ValueError("a match radius needs the layers' grids")
            nearest, row = pixel_search.local_nearest_matches(query[None], rows[None], self.grid, self.radius, self.kappa,
                                                       self.chunk_bytes, self.precision)
            nearest, row = nearest[0], row[0]
        images = torch.tensor([self.position[image_id] for image_id in ids], dtype=torch.int64, device=query.device)
        return nearest, images[row // per_image], row % per_image


def _merge(found: Found, other: Found, kappa: int) -> Found:
    """The kappa smallest of two match lists, ascending."""
    values, order = torch.cat([found[0], other[0]], dim=1).topk(kappa, dim=1, largest=False)
    return values, torch.cat([found[1], other[1]], dim=1).gather(1, order), torch.cat([found[2], other[2]], dim=1).gather(1, order)
