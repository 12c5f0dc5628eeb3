"""How aligned normal images are: whether a pixel finds as close a match near its own position as anywhere.

On fixtured parts a pixel's nearest normal pixel lies near the same place in the retrieved image; then
match_radius (pixel_search.local_nearest_matches) keeps the matches and costs far less. Fit measures two things on the
calibration images and records them in the card: where their full-search matches lie (the share within each
radius of the cell's own position; formats.calibration_matches.PixelMatches names each match's cell), and, the
measure fit's suggestion rests on, how many cells a search within each radius still finds a match about as close
as the full search's. The second is the one that matters: a background cell matches equally well in many
places, so its full-search match may lie far away while a near one is as good.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence

import numpy as np

from spade_batch.formats.calibration_matches import PixelMatches
from spade_batch.formats.card import AlignmentRecord
from spade_batch.formats.features import LayerShape


def radius_cells(match_radius: int | None, cells: int, image_size: int) -> int | None:
    """A match radius in working-size pixels as cells of a layer `cells` cells high: ceil(r * cells / image_size).

    None (SPADE's full search) stays None.
    """
    return None if match_radius is None else math.ceil(match_radius * cells / image_size)


def search_work(shapes: Sequence[LayerShape], image_size: int, match_radius: int | None) -> float:
    """The pixel search's nominal work per test image and retrieved image: sum over layers of C_l x P_l x the cells
    each query cell is compared with (P_l, or the (2c + 1)^2 of its neighbourhood at most), multiply-adds."""
    total = 0.0
    for shape in shapes:
        pixels = shape.height * shape.width
        cells = radius_cells(match_radius, shape.height, image_size)
        total += shape.channels * pixels * (pixels if cells is None else min(pixels, (2 * cells + 1) ** 2))
    return total


ALIGNED_SHARE = 0.5
"""The share of cells that must keep a match (KEPT_WITHIN) within a radius for fit to suggest it. The finest layer's
matches are mostly of noise, where the full search's many more candidates always find a closer one, so even aligned
parts keep far from all: measured at 4-32 px (benchmarks/search_options.py, Lite0, 2026-12-07), the synthetic aligned
parts 60-74% (match_radius 8 kept their pixel ROCAUC and PRO), Magnetic Tile, a texture, 23-45%."""

SMALLEST_SUGGESTED_RADIUS = 8
"""No smaller radius is suggested: 4 px is one finest-layer cell, no room for a fixture's jitter, and 8 px is the
smallest radius measured to keep quality on aligned parts."""

POSITIONS_SHARE = 0.9
"""For a card from before the kept shares: the share of full-search matches that must lie within a radius."""

KEPT_WITHIN = 0.1
"""A cell keeps its match within a radius when its nearest match there is at most 10% farther (squared distance)
than the full search's."""


def suggestion(record: AlignmentRecord, shapes: Sequence[LayerShape], image_size: int) -> str:
    """The alignment in words, and what it suggests: the smallest measured radius (SMALLEST_SUGGESTED_RADIUS or more)
    within which ALIGNED_SHARE of the cells keep their match, with its nominal speed-up, or that the images do not align. A card from before the
    kept shares were measured is judged by where its matches lie."""
    if record.layer is None or not record.matches:
        return "not measured (a model fitted with match_radius, or before fit measured it)"
    judged = {int(r): share for r, share in (record.kept or record.within).items()}
    needed = ALIGNED_SHARE if record.kept else POSITIONS_SHARE
    found = [r for r in sorted(judged) if judged[r] >= needed and r >= SMALLEST_SUGGESTED_RADIUS]
    if not record.kept:
        return _positions_only(record, found, shapes, image_size)
    if not found:
        widest = max(judged)
        return (f"normal images do not align: searching within {widest} px, only {judged[widest]:.0%} of pixels find a match "
                f"within {KEPT_WITHIN:.0%} of the full search's distance ({record.within[str(widest)]:.0%} of the finest layer's "
                f"matches ({record.layer}) lie there); keep SPADE's full search (match_radius unset)")
    radius = found[0]
    speed_up = search_work(shapes, image_size, None) / search_work(shapes, image_size, radius)
    return (f"normal images align within {radius} px: {judged[radius]:.0%} of pixels find a match there within "
            f"{KEPT_WITHIN:.0%} of the full search's distance ({record.within[str(radius)]:.0%} of the finest layer's matches "
            f"({record.layer}) lie within {radius} px); match_radius {radius} would do about {speed_up:.0f}x less pixel-search work")


def _positions_only(record: AlignmentRecord, found: list[int], shapes: Sequence[LayerShape], image_size: int) -> str:
    """suggestion for a card with only the match positions (before the kept shares were measured)."""
    shares = {int(r): share for r, share in record.within.items()}
    if not found:
        widest = max(shares)
        return (f"normal images do not align: only {shares[widest]:.0%} of the finest layer's ({record.layer}) pixel matches lie within {widest} px "
                "of their own position; keep SPADE's full search (match_radius unset)")
    radius = found[0]
    speed_up = search_work(shapes, image_size, None) / search_work(shapes, image_size, radius)
    return (f"normal images align within {radius} px: {shares[radius]:.0%} of the finest layer's ({record.layer}) pixel matches; "
            f"match_radius {radius} would keep them and do about {speed_up:.0f}x less pixel-search work")


ALIGNMENT_RADII = (4, 8, 16, 32)
"""Radii (pixels at the working size) at which the share of matches is measured."""


def measure_alignment(matches: Iterable[PixelMatches], shape: LayerShape, image_size: int,
                      radii: Sequence[int] = ALIGNMENT_RADII) -> AlignmentRecord:
    """The share of the shallowest stored layer's matches whose cell lies within each radius of the query cell.

    A match within r pixels is one within radius_cells(r, h, image_size) cells (Chebyshev), the neighbourhood
    match_radius r searches. Matches of unknown cell (stored before cells were kept) or of infinite distance are
    not counted; with none left the record says so (matches 0).

    Args:
        matches: the calibration images' full-search matches, layers as `shape` is the first of.
        shape: that layer's grid.
        image_size: the working size in pixels.
    """
    width = shape.width
    within, counted = np.zeros(len(radii), np.int64), 0
    for match in matches:
        if match.cells is None:
            continue
        cells, distances = np.asarray(match.cells[0], np.int64), match.distances[0]
        known = (cells >= 0) & np.isfinite(distances)
        own = np.arange(cells.shape[0])[:, None]
        offset = np.maximum(np.abs(cells // width - own // width), np.abs(cells % width - own % width))[known]
        counted += offset.size
        within += np.array([(offset <= radius_cells(r, shape.height, image_size)).sum() for r in radii])
    if not counted:
        return AlignmentRecord(shape.name, 0, {})
    return AlignmentRecord(shape.name, counted, {str(r): float(n / counted) for r, n in zip(radii, within)})
