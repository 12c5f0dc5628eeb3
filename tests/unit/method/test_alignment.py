"""Alignment measured from pixel matches, against counting by hand; and what fit says of it."""

from __future__ import annotations

import numpy as np
import pytest

from spade_batch.formats.calibration_matches import PixelMatches
from spade_batch.formats.card import AlignmentRecord
from spade_batch.formats.features import LayerShape
from spade_batch.method.alignment import measure_alignment, radius_cells, search_work, suggestion

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


def test_suggestion_names_the_smallest_radius_keeping_most_matches_and_its_speed_up_or_says_they_do_not_align():
    aligned = AlignmentRecord("layer1", 1000, {"4": 0.7, "8": 0.96, "16": 0.99, "32": 1.0})
    expected = search_work(SHAPES, 224, None) / search_work(SHAPES, 224, 8)
    assert suggestion(aligned, SHAPES, 224) == (f"normal images align within 8 px: 96% of layer1 pixel matches; "
                                                f"match_radius 8 would keep them and do about {expected:.0f}x less pixel-search work")
    full = sum(s.channels * (s.height * s.width) ** 2 for s in SHAPES)
    assert expected == pytest.approx(full / (256 * 3136 * 25 + 512 * 784 * 9 + 1024 * 196 * 9))
    unaligned = AlignmentRecord("layer1", 1000, {"4": 0.1, "8": 0.2, "16": 0.4, "32": 0.6})
    assert suggestion(unaligned, SHAPES, 224).startswith("normal images do not align: only 60% of layer1 pixel matches lie within 32 px")
    assert suggestion(AlignmentRecord(), SHAPES, 224).startswith("not measured")
    assert radius_cells(8, 56, 224) == 2 and radius_cells(8, 14, 224) == 1 and radius_cells(17, 14, 224) == 2 and radius_cells(None, 56, 224) is None
