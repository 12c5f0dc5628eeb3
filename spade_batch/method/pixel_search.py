"""SPADE's pixel search: each query cell's kappa nearest cells among its own image's retrieved normal images, over
all their cells (the paper's search) or only those near its own position (match_radius), chunked and batched on CPU
or CUDA. Squared L2 distances; inputs centred (spade.centre). Pure torch; nothing here knows of Ray or storage.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Iterator
from contextlib import contextmanager

import numpy as np
import torch
import torch.nn.functional as F

DEFAULT_CHUNK_BYTES = 16 * 2**20
"""Bound on the size of one query-by-gallery distance block (bytes, float32): on a CPU, cache-sized."""

GPU_CHUNK_BYTES = 256 * 2**20
"""The block bound on a GPU: fewer, larger GEMMs. On an H200 (benchmarks/pixel_knn.py, paper shapes,
batch 16, float32) 16 MiB blocks ran the pixel stage at 0.31 of the GPU's float32 GEMM peak, 64 MiB at
0.53, 256 MiB at 0.61, 1024 and 4096 MiB at 0.61-0.62."""


def chunk_bytes_for(device: torch.device) -> int:
    """The default distance-block bound for searches on `device`, in bytes."""
    return GPU_CHUNK_BYTES if device.type == "cuda" else DEFAULT_CHUNK_BYTES


PRECISIONS = ("float32", "tf32", "bfloat16")
"""Precisions of the pixel search's GEMM, which only ranks candidates; returned distances are float32."""

RERANK_MARGIN = 8
"""Candidates kept per query beyond kappa when the ranking GEMM runs in low precision (tf32, bfloat16).

A low-precision GEMM only has to place the true kappa nearest somewhere among its own kappa + 8 best;
their distances are then recomputed in float32 by explicit differences and the kappa smallest kept. A
float32 GEMM ranks to float32 rounding on centred features, so it keeps just kappa: keeping 8 more costs
a top-k over every gallery chunk, 30% of layer1's time at the paper's defaults.
"""


@contextmanager
def matmul_precision(precision: str, device: torch.device) -> Iterator[None]:
    """Scope torch's float32 matmul precision to the call: TF32 for "tf32" on CUDA, full float32 otherwise.

    On CPU "tf32" is float32. The previous process-wide setting is restored on exit (not thread safe).
    """
    if precision not in PRECISIONS:
        raise ValueError(f"precision={precision!r} is not one of {', '.join(PRECISIONS)}")
    previous = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("high" if precision == "tf32" and device.type == "cuda" else "highest")
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(previous)


def _smallest(values: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The k smallest entries along the last axis of values (B x P x n) and their positions there."""
    k = min(k, values.shape[-1])
    return values.min(dim=-1, keepdim=True) if k == 1 else values.topk(k, dim=-1, largest=False)


def _partial_scores(queries: torch.Tensor, block: torch.Tensor, low: torch.Tensor | None) -> torch.Tensor:
    """|g|^2 - 2 q.g for B x P queries against a B x rows x C gallery block, B x P x rows float32.

    low: the queries already in bfloat16 to take the cross term in bfloat16 (|g|^2 stays float32), else None.
    """
    norms = (block * block).sum(-1)[:, None, :]
    if low is None:
        return torch.baddbmm(norms, queries, block.transpose(1, 2), alpha=-2.0)
    cross = torch.bmm(low, block.to(low.dtype).transpose(1, 2))
    return cross.to(torch.float32).mul_(-2.0).add_(norms)


def _ranked_candidates(
    queries: torch.Tensor, galleries: torch.Tensor, keep: int, rows: int, low: torch.Tensor | None
) -> torch.Tensor:
    """Per query, the `keep` best gallery rows by |g|^2 - 2 q.g, visiting the gallery `rows` rows at a time.

    Returns:
        B x P x keep int64 gallery row indices (the B x P x rows scores of one chunk are the peak memory).
    """
    best_scores = best_rows = None
    for start in range(0, galleries.shape[1], rows):
        scores, positions = _smallest(_partial_scores(queries, galleries[:, start : start + rows], low), keep)
        chunk_rows = positions.add_(start)  # positions in the chunk -> gallery rows
        if best_scores is not None:
            # Merging keeps B x P x 2 keep values: small next to the chunk's B x P x rows.
            scores, chunk_rows = torch.cat([best_scores, scores], -1), torch.cat([best_rows, chunk_rows], -1)
            scores, order = _smallest(scores, keep)
            chunk_rows = chunk_rows.gather(-1, order)
        best_scores, best_rows = scores, chunk_rows
    assert best_rows is not None
    return best_rows


def _exact_sq_distances(
    queries: torch.Tensor, galleries: torch.Tensor, indices: torch.Tensor, chunk_bytes: int
) -> torch.Tensor:
    """float32 |q - g|^2 by explicit differences for the candidate rows `indices` (B x P x r) of each query.

    Queries are taken a slice at a time so that one slice's n x r x C float32 differences stay under
    chunk_bytes (at least one query per slice). Returns B x P x r float32.
    """
    batch, pixels, channels = queries.shape
    gallery_rows = galleries.shape[1]
    flat_gallery = galleries.reshape(batch * gallery_rows, channels)
    flat_queries = queries.reshape(batch * pixels, channels)
    offsets = torch.arange(batch, device=indices.device)[:, None, None] * gallery_rows
    flat_indices = (indices + offsets).reshape(batch * pixels, -1)
    step = max(1, chunk_bytes // (4 * flat_indices.shape[1] * channels))
    distances = torch.empty(flat_indices.shape, dtype=torch.float32, device=queries.device)
    for start in range(0, batch * pixels, step):
        differences = flat_gallery[flat_indices[start : start + step]]  # a copy: updated in place below
        differences.sub_(flat_queries[start : start + step, None, :]).square_()
        distances[start : start + step] = differences.sum(-1)
    return distances.reshape(indices.shape)


def batch_nearest_sq_distances(
    queries: torch.Tensor,
    galleries: torch.Tensor,
    kappa: int = 1,
    chunk_bytes: int = DEFAULT_CHUNK_BYTES,
    precision: str = "float32",
) -> torch.Tensor:
    """Mean squared L2 distance from each query vector to its kappa nearest vectors in its own image's gallery
    (nearest_matches' distances, averaged).

    Returns:
        B x P float32 squared distances (non-negative, squared feature units).
    """
    return nearest_matches(queries, galleries, kappa, chunk_bytes, precision)[0].mean(dim=-1)


def nearest_matches(
    queries: torch.Tensor,
    galleries: torch.Tensor,
    kappa: int = 1,
    chunk_bytes: int = DEFAULT_CHUNK_BYTES,
    precision: str = "float32",
) -> tuple[torch.Tensor, torch.Tensor]:
    """The kappa nearest vectors of each query vector in its own image's gallery: their squared L2 distances and rows.

    Image b's queries are searched in galleries[b] only, all B images in one batched GEMM per gallery chunk
    ranking candidates by |g|^2 - 2 q.g. A chunk's B x P x rows float32 block stays under chunk_bytes (at
    least one row per chunk), and every gallery row is visited. Per query, the kappa best candidates
    (kappa + RERANK_MARGIN in low precision) are then recomputed exactly in float32, |q - g|^2 by
    explicit differences, and the kappa smallest kept: the GEMM only ranks, in any precision, and no
    distance suffers the formula's cancellation (which costs ~1% on near-duplicate features even in float32).

    Inputs must be centred (see `centre`): the ranking GEMM's absolute error grows with |q| |g|.

    Tolerance (of their mean): a returned distance is never below the exact (float64) kappa-nearest mean by more than
    float32 rounding; it is above it only where the ranking pushed a true neighbour out of the candidates,
    and then by at most twice the ranking error of |g|^2 - 2 q.g (bfloat16: about 2^-8 |q| |g|). Measured
    in tests/unit/method/test_spade.py on centred post-ReLU-like features with near-duplicate gallery rows: float32,
    tf32 (CPU) and bfloat16 all within rtol 1e-5 of float64 on every query, bfloat16 bit-identical to
    float32 on every query; without the margin, bfloat16 put 7 of 256 queries (kappa 3) up to 0.5% high.

    Args:
        queries: B x P x C float32, centred.
        galleries: B x G x C float32, centred, on the same device.
        kappa: number of nearest gallery vectors kept, 1 <= kappa <= G.
        chunk_bytes: bound on one distance block, in bytes.
        precision: the ranking GEMM's, one of PRECISIONS: "float32" (TF32 off for the call), "tf32" (TF32 on
            for the call on CUDA; float32 on CPU), "bfloat16" (the cross term q.g in bfloat16, on any device).

    Returns:
        distances: B x P x kappa float32 squared distances (non-negative, squared feature units), ascending.
        rows: B x P x kappa int64, the gallery row of each distance.
    """
    batch, pixels, _ = queries.shape
    num_gallery = galleries.shape[1]
    if galleries.shape[0] != batch:
        raise ValueError(f"{batch} query images but {galleries.shape[0]} galleries")
    if not 1 <= kappa <= num_gallery:
        raise ValueError(f"kappa={kappa} must be between 1 and the gallery size {num_gallery}")
    rows = max(1, chunk_bytes // (4 * batch * max(1, pixels)))
    low = queries.to(torch.bfloat16) if precision == "bfloat16" else None
    with matmul_precision(precision, queries.device):
        margin = 0 if precision == "float32" else RERANK_MARGIN
        candidates = _ranked_candidates(queries, galleries, min(num_gallery, kappa + margin), rows, low)
    distances = _exact_sq_distances(queries, galleries, candidates, chunk_bytes)
    nearest, order = distances.topk(kappa, dim=-1, largest=False)
    return nearest, candidates.gather(-1, order)


LOCAL_TILE = 2
"""Cells per side of one gallery tile of the restricted search (see _Tiling): the K retrieved images' t x t cells at
one place are ranked in one GEMM against the (t + 2r)^2 query cells that may match them, (t + 2r)^2 / (2r + 1)^2
times the neighbourhoods' own work. Wall seconds per image on the 2-core VM, idle, 2026-12-07, at the paper's
shapes and r = 8 px (layer1 / layer2 / layer3): tile 1 0.074 / 0.024 / 0.013, tile 2 0.060 / 0.019 / 0.010,
tile 3 0.15 / 0.065 / 0.035 (padded grids), tile 4 0.084 / 0.027 / 0.038, tile 8 0.16 / 0.10 / 0.051; the full
search 3.0 / 0.30 / 0.05 (benchmarks/pixel_knn.py --match-radius 8)."""


def local_nearest_matches(
    queries: torch.Tensor,
    galleries: torch.Tensor,
    grid: tuple[int, int],
    radius: int,
    kappa: int = 1,
    chunk_bytes: int = DEFAULT_CHUNK_BYTES,
    precision: str = "float32",
    tile: int = LOCAL_TILE,
) -> tuple[torch.Tensor, torch.Tensor]:
    """nearest_matches restricted to each cell's neighbourhood: a query cell (y, x) is matched only with the
    cells (y', x') of each retrieved image with max(|y - y'|, |x - x'|) <= radius (cells outside the map do
    not exist). Position-aware matching as in RAD and CPR.

    No full distance matrix is made: the map is cut in tiles of `tile` x `tile` query cells, and each tile is
    ranked (|g|^2 - 2 q.g, in `precision`) against only the window of (tile + 2 radius)^2 cells per retrieved
    image that its neighbourhoods cover; many tiles of all B images go in one batched GEMM, as many as keep a
    block of scores under chunk_bytes. The best candidates are then recomputed exactly in float32, as
    nearest_matches does.

    Args:
        queries: B x P x C float32 centred, P = h * w cells in row-major order.
        galleries: B x (K * P) x C float32 centred: K retrieved images on the same h x w grid, one after another
            (gather_galleries' layout).
        grid: (h, w) of the layer.
        radius: the neighbourhood's Chebyshev radius in cells, >= 0.
        kappa, chunk_bytes, precision: as nearest_matches.

    Returns:
        distances: B x P x kappa float32, ascending; +inf where a cell's neighbourhood holds fewer than kappa cells.
        rows: B x P x kappa int64 gallery rows (k * P + cell), as nearest_matches' (0 where the distance is +inf).
    """
    batch, pixels, channels = queries.shape
    height, width = grid
    if height * width != pixels or galleries.shape[1] % pixels or galleries.shape[0] != batch:
        raise ValueError(f"queries B x {pixels} x C and galleries B x (K * {pixels}) x C expected for a {height} x {width} grid, "
                         f"got {tuple(queries.shape)} and {tuple(galleries.shape)}")
    if radius < 0 or kappa < 1:
        raise ValueError(f"radius={radius} and kappa={kappa}: the radius is >= 0 cells and kappa >= 1")
    if radius >= max(height, width) - 1:  # every cell is in every neighbourhood: the full search
        return _padded_full_search(queries, galleries, kappa, chunk_bytes, precision)
    images = galleries.shape[1] // pixels
    tiles = _tiling(grid, radius, tile, images, str(queries.device))
    windows = tiles.query_windows(queries)  # B x ty x tx x span x span x C (a view)
    gallery_tiles, tile_norms = tiles.gallery_tiles(galleries)  # B x ty x tx x K x t x t x C (a view), B x T x N
    keep = min(tiles.cells, kappa + (0 if precision == "float32" else RERANK_MARGIN))
    found = min(kappa, keep)
    per_tile = torch.empty((batch, tiles.total, tiles.window, found), device=queries.device)
    tile_rows = torch.empty((batch, tiles.total, tiles.window, found), dtype=torch.int64, device=queries.device)
    row_bytes = 4 * batch * tiles.columns * tiles.cells
    rows_per_call = max(1, min(chunk_bytes // (row_bytes * tiles.window), chunk_bytes // 4 // (row_bytes * channels)))
    rows_per_call = min(rows_per_call, tiles.rows)
    # Each call's tiles are copied into the same two buffers: fresh allocations of this size cost page faults
    # that took longer than the GEMM itself (layer1 at the paper's shapes: 61 ms of 0.13 s per image).
    gallery_buffer = torch.empty((batch, rows_per_call, *gallery_tiles.shape[2:]), device=queries.device)
    window_buffer = torch.empty((batch, rows_per_call, *windows.shape[2:]), device=queries.device)
    with matmul_precision(precision, queries.device):
        for row in range(0, tiles.rows, rows_per_call):
            count = min(rows_per_call, tiles.rows - row)
            part = slice(row * tiles.columns, (row + count) * tiles.columns)
            flat_g = gallery_buffer[:, :count].copy_(gallery_tiles[:, row : row + count]).view(-1, tiles.cells, channels)
            flat_q = window_buffer[:, :count].copy_(windows[:, row : row + count]).view(-1, tiles.window, channels)
            bias = tile_norms[:, part].reshape(-1, 1, tiles.cells).masked_fill(~tiles.allowed, torch.inf)  # B T' x W x N
            if precision == "bfloat16":
                cross = torch.bmm(flat_q.to(torch.bfloat16), flat_g.to(torch.bfloat16).transpose(1, 2)).to(torch.float32)
                scores = cross.mul_(-2.0).add_(bias)
            else:
                scores = torch.baddbmm(bias, flat_q, flat_g.transpose(1, 2), alpha=-2.0)
            candidates = _smallest(scores, keep)[1]
            exact = _exact_sq_distances(flat_q, flat_g, candidates, chunk_bytes)
            exact.masked_fill_(torch.isinf(bias.gather(-1, candidates)), torch.inf)
            nearest, order = _smallest(exact, found)
            shape = (batch, part.stop - part.start, tiles.window, found)
            per_tile[:, part] = nearest.reshape(shape)
            tile_rows[:, part] = tiles.cell_rows[part][None].expand(batch, -1, -1).gather(
                -1, candidates.gather(-1, order).reshape(batch, -1, tiles.window * found)).reshape(shape)
    return tiles.merge(per_tile, tile_rows, kappa)


@functools.lru_cache(maxsize=16)
def _tiling(grid: tuple[int, int], radius: int, tile: int, images: int, device: str) -> _Tiling:
    """One _Tiling per layer geometry (its index maps are built in Python once)."""
    return _Tiling(grid, radius, tile, images, torch.device(device))


class _Tiling:
    """The restricted search's geometry. Each of K retrieved images is cut into T = ty x tx tiles of t x t cells
    (the last ones padded with cells of infinite norm, never a match); the K images' tiles at one place (N = K t^2
    cells) are ranked in one GEMM against the query cells that may match any of them: the tile's cells and r more
    a side, a window of W = (t + 2r)^2 query cells. Each gallery cell is copied once, each query cell into the
    windows of the few tiles that reach it; each query's matches are then merged over those tiles.

    Attributes:
        cell_rows: T x N int64 gallery rows k P + y w + x of each tile's cells (padded cells clamped into the map).
        allowed: W x N bool: which tile cells lie within the radius of each window cell.
        sources: P x M int64: for each query cell, its place (tile * W + window cell) in the M tiles' windows that
            reach it; T * W (a row of no match) where it is reached by fewer.
    """

    def __init__(self, grid: tuple[int, int], radius: int, tile: int, images: int, device: torch.device):
        self.height, self.width = grid
        self.radius, self.tile = radius, tile
        self.rows, self.columns = math.ceil(self.height / tile), math.ceil(self.width / tile)
        self.span = tile + 2 * radius
        self.total, self.window, self.cells = self.rows * self.columns, self.span**2, images * tile * tile
        y = np.arange(self.rows * tile).reshape(self.rows, tile)  # tile row -> its map rows
        x = np.arange(self.columns * tile).reshape(self.columns, tile)
        cell = (np.minimum(y, self.height - 1)[:, None, :, None] * self.width + np.minimum(x, self.width - 1)[None, :, None, :])
        cell = cell.reshape(self.total, 1, tile * tile) + np.arange(images)[None, :, None] * (self.height * self.width)
        self.cell_rows = torch.from_numpy(cell.reshape(self.total, self.cells)).to(device)
        offsets = np.arange(self.span)[:, None] - radius - np.arange(tile)[None, :]  # window row - tile row
        near = np.abs(offsets) <= radius  # span x t
        around = (near[:, None, :, None] & near[None, :, None, :]).reshape(self.window, 1, tile * tile)
        self.allowed = torch.from_numpy(np.broadcast_to(around, (self.window, images, tile * tile)).reshape(self.window, self.cells).copy()).to(device)
        self.sources = torch.from_numpy(self._sources()).to(device)

    def _sources(self) -> np.ndarray:
        """P x M: each query cell's places in the windows of the tiles that reach it (see the class)."""
        places: list[list[int]] = [[] for _ in range(self.height * self.width)]
        for tile_y in range(self.rows):
            for tile_x in range(self.columns):
                for u in range(self.span):
                    for v in range(self.span):
                        y, x = tile_y * self.tile - self.radius + u, tile_x * self.tile - self.radius + v
                        if 0 <= y < self.height and 0 <= x < self.width:
                            places[y * self.width + x].append((tile_y * self.columns + tile_x) * self.window + u * self.span + v)
        most = max(len(p) for p in places)
        return np.array([p + [self.total * self.window] * (most - len(p)) for p in places], np.int64)

    def query_windows(self, queries: torch.Tensor) -> torch.Tensor:
        """B x P x C -> B x ty x tx x span x span x C: each tile's window of query cells (zeros outside the map; a
        view of a padded copy of the queries)."""
        batch, _, channels = queries.shape
        pad = (0, 0, self.radius, self.columns * self.tile - self.width + self.radius, self.radius, self.rows * self.tile - self.height + self.radius)
        grid = F.pad(queries.reshape(batch, self.height, self.width, channels), pad)
        return grid.unfold(1, self.span, self.tile).unfold(2, self.span, self.tile).permute(0, 1, 2, 4, 5, 3)

    def gallery_tiles(self, galleries: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """B x (K P) x C -> B x ty x tx x K x t x t x C tiles (a view; of a padded copy where t does not divide the
        grid) and B x T x N squared norms, +inf for padded cells."""
        batch, _, channels = galleries.shape
        images = self.cells // (self.tile * self.tile)
        cells = galleries.reshape(batch, images, self.height, self.width, channels)
        norms = torch.linalg.vector_norm(cells, dim=-1).square_()
        pad = (0, self.columns * self.tile - self.width, 0, self.rows * self.tile - self.height)
        if any(pad):
            cells, norms = F.pad(cells, (0, 0, *pad)), F.pad(norms, pad, value=torch.inf)
        order = (0, 2, 4, 1, 3, 5)  # B x ty x tx x K x t x t
        cells = cells.reshape(batch, images, self.rows, self.tile, self.columns, self.tile, channels).permute(*order, 6)
        norms = norms.reshape(batch, images, self.rows, self.tile, self.columns, self.tile).permute(*order)
        return cells, norms.reshape(batch, self.total, self.cells)

    def merge(self, distances: torch.Tensor, rows: torch.Tensor, kappa: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Per tile and window cell, its `found` best (B x T x W x found) -> per query cell the kappa best over the tiles
        that reach it: B x P x kappa distances (+inf where fewer) and rows (0 there)."""
        batch, found = distances.shape[0], distances.shape[-1]
        flat_d = F.pad(distances.reshape(batch, -1, found), (0, 0, 0, 1), value=torch.inf)
        flat_r = F.pad(rows.reshape(batch, -1, found), (0, 0, 0, 1))
        pixels, reach = self.sources.shape
        index = self.sources.reshape(1, -1, 1).expand(batch, -1, found)
        gathered_d = flat_d.gather(1, index).reshape(batch, pixels, reach * found)
        gathered_r = flat_r.gather(1, index).reshape(batch, pixels, reach * found)
        count = min(kappa, reach * found)
        nearest, order = gathered_d.topk(count, dim=-1, largest=False) if count > 1 else gathered_d.min(-1, keepdim=True)
        matched = gathered_r.gather(-1, order)
        if count < kappa:
            nearest, matched = F.pad(nearest, (0, kappa - count), value=torch.inf), F.pad(matched, (0, kappa - count))
        return nearest, matched.masked_fill_(torch.isinf(nearest), 0)


def _padded_full_search(
    queries: torch.Tensor, galleries: torch.Tensor, kappa: int, chunk_bytes: int, precision: str,
) -> tuple[torch.Tensor, torch.Tensor]:
    """nearest_matches, +inf-padded (rows 0) beyond the gallery's row count."""
    found = min(kappa, galleries.shape[1])
    distances, rows = nearest_matches(queries, galleries, found, chunk_bytes, precision)
    if found < kappa:
        distances = F.pad(distances, (0, kappa - found), value=torch.inf)
        rows = F.pad(rows, (0, kappa - found), value=0)
    return distances, rows
