"""Alignment measured from pixel matches, against counting by hand; and what fit says of it."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from spade_batch.formats.calibration_matches import PixelMatches
from spade_batch.formats.card import AlignmentRecord
from spade_batch.formats.features import LayerShape
from spade_batch.method.alignment import measure_alignment, radius_cells, search_work, suggestion
from spade_batch.method.calibration_search import AlignmentSample, kept_shares

SHAPES = [LayerShape("layer1", 56, 56, 256), LayerShape("layer2", 28, 28, 512), LayerShape("layer3", 14, 14, 1024)]


def test_shares_are_the_matches_within_each_radius_of_their_own_cell_counted_one_by_one():
    rng = np.random.default_rng(0)
    shape = LayerShape("layer1", 16, 12, 8)  # 64 px working size: 4 px per cell
    matches = []
    for _ in range(3):
        cells = rng.integers(0, 16 * 12, size=(16 * 12, 2)).astype(np.int32)
        cells[::3] = np.arange(16 * 12)[::3, None]  # some match their own cell
        cells[5, 1] = -1  # unknown (carried from a file without cells)
        distances = rng.random((16 * 12, 2)).astype(np.float32)
        distances[7, 0] = np.inf  # no match
        matches.append(PixelMatches(["a", "b"], [distances], [np.zeros((16 * 12, 2), np.int16)], [cells]))
    matches.append(PixelMatches(["a"], [np.zeros((192, 2), np.float32)], [np.zeros((192, 2), np.int16)]))  # no cells: skipped
    record = measure_alignment(matches, shape, 64, radii=(4, 8, 64))
    counted, within = 0, {4: 0, 8: 0, 64: 0}
    for match in matches[:3]:
        for own in range(16 * 12):
            for cell, distance in zip(match.cells[0][own], match.distances[0][own]):
                if cell < 0 or not np.isfinite(distance):
                    continue
                counted += 1
                offset = max(abs(cell // 12 - own // 12), abs(cell % 12 - own % 12))
                for radius in within:
                    within[radius] += offset <= -(-radius * 16 // 64)
    assert record == AlignmentRecord("layer1", counted, {str(r): n / counted for r, n in within.items()})
    assert record.within["64"] == 1.0 and counted == 3 * 16 * 12 * 2 - 6


def brute_force_nearest(query: np.ndarray, gallery: np.ndarray, width: int, cells: int, kappa: int) -> np.ndarray:
    """P float64: each cell's mean squared distance to its kappa nearest gallery cells (K*P x C) within `cells`
    cells (Chebyshev) of its own position."""
    pixels = len(query)
    distances = ((query[:, None].astype(np.float64) - gallery[None].astype(np.float64)) ** 2).sum(-1)  # P x K*P
    own, other = np.arange(pixels), np.arange(len(gallery)) % pixels
    offset = np.maximum(np.abs(own[:, None] // width - other[None] // width), np.abs(own[:, None] % width - other[None] % width))
    distances[offset > cells] = np.inf
    return np.sort(distances, axis=1)[:, :kappa].mean(1)


@pytest.mark.parametrize("kappa", [1, 2])
def test_kept_shares_are_the_cells_whose_restricted_match_is_within_ten_percent_counted_one_by_one(kappa):
    rng = np.random.default_rng(kappa)
    shapes = [LayerShape("layer1", 8, 6, 5), LayerShape("layer2", 4, 3, 7)]  # 32 px working size: 4 and 8 px per cell
    samples = []
    for _ in range(3):
        queries = [rng.normal(size=(s.height * s.width, s.channels)).astype(np.float32) for s in shapes]
        # two retrieved images: the query shifted by one cell along x plus noise, and noise alone
        galleries = [np.concatenate([np.roll(q.reshape(s.height, s.width, -1), 1, axis=1).reshape(q.shape) + rng.normal(scale=0.3, size=q.shape),
                                     rng.normal(size=q.shape)]).astype(np.float32) for q, s in zip(queries, shapes)]
        full = [brute_force_nearest(q, g, s.width, 99, kappa).astype(np.float32)[:, None].repeat(kappa, 1) for q, g, s in zip(queries, galleries, shapes)]
        samples.append(AlignmentSample([torch.from_numpy(q) for q in queries], [torch.from_numpy(g) for g in galleries],
                                       PixelMatches(["a", "b"], full, [np.zeros_like(f, np.int16) for f in full])))
    radii = (4, 8, 32)
    shares = kept_shares(samples, shapes, 32, kappa, radii)
    expected = {}
    for radius in radii:
        per_layer = []
        for layer, shape in enumerate(shapes):
            cells = -(-radius * shape.height // 32)
            kept = [brute_force_nearest(s.queries[layer].numpy(), s.galleries[layer].numpy(), shape.width, cells, kappa)
                    <= 1.1 * s.matches.distances[layer][:, 0] for s in samples]
            per_layer.append(np.concatenate(kept).mean())
        expected[str(radius)] = float(np.mean(per_layer))
    assert shares == pytest.approx(expected, abs=1e-12)
    assert shares["4"] < shares["8"] <= shares["32"] == 1.0  # 4 px (1 cell) follows the shift but not where np.roll wrapped it; 32 px spans the maps
    assert kept_shares([], shapes, 32, kappa, radii) == {}


def test_suggestion_names_the_smallest_radius_where_most_cells_keep_their_match_and_its_speed_up_or_says_they_do_not_align():
    aligned = AlignmentRecord("layer1", 1000, {"4": 0.3, "8": 0.35, "16": 0.5, "32": 0.8}, 16, {"4": 0.55, "8": 0.6, "16": 0.7, "32": 0.8})
    expected = search_work(SHAPES, 224, None) / search_work(SHAPES, 224, 8)
    # 4 px keeps half the cells too, but is never suggested (one finest-layer cell: no room for jitter)
    assert suggestion(aligned, SHAPES, 224) == (f"normal images align within 8 px: 60% of pixels find a match there within 10% of the "
                                                f"full search's distance (35% of the finest layer's matches (layer1) lie within 8 px); match_radius 8 would "
                                                f"do about {expected:.0f}x less pixel-search work")
    unaligned = AlignmentRecord("layer1", 1000, {"4": 0.1, "8": 0.2, "16": 0.4, "32": 0.6}, 16, {"4": 0.2, "8": 0.3, "16": 0.4, "32": 0.49})
    assert suggestion(unaligned, SHAPES, 224).startswith("normal images do not align: searching within 32 px, only 49% of pixels")


def test_a_card_without_kept_shares_is_judged_by_where_its_matches_lie():
    aligned = AlignmentRecord("layer1", 1000, {"4": 0.7, "8": 0.96, "16": 0.99, "32": 1.0})
    expected = search_work(SHAPES, 224, None) / search_work(SHAPES, 224, 8)
    assert suggestion(aligned, SHAPES, 224) == (f"normal images align within 8 px: 96% of the finest layer's (layer1) pixel matches; "
                                                f"match_radius 8 would keep them and do about {expected:.0f}x less pixel-search work")
    full = sum(s.channels * (s.height * s.width) ** 2 for s in SHAPES)
    assert expected == pytest.approx(full / (256 * 3136 * 25 + 512 * 784 * 9 + 1024 * 196 * 9))
    unaligned = AlignmentRecord("layer1", 1000, {"4": 0.1, "8": 0.2, "16": 0.4, "32": 0.6})
    assert suggestion(unaligned, SHAPES, 224).startswith("normal images do not align: only 60% of the finest layer's (layer1) pixel matches lie within 32 px")
    assert suggestion(AlignmentRecord(), SHAPES, 224).startswith("not measured")
    assert radius_cells(8, 56, 224) == 2 and radius_cells(8, 14, 224) == 1 and radius_cells(17, 14, 224) == 2 and radius_cells(None, 56, 224) is None
