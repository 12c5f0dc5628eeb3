"""calibration.parquet: what is written is read back, and matches of other layers are refused."""

from __future__ import annotations

import numpy as np
import pytest

from spade_batch.formats.calibration_matches import PixelMatches, read_matches, write_matches
from spade_batch.formats.features import LayerShape

SHAPES = [LayerShape("layer1", 4, 4, 8), LayerShape("layer2", 2, 2, 16)]


def matches(rng: np.random.Generator, k: int, kappa: int, cells: bool = True) -> PixelMatches:
    return PixelMatches([f"n{i}" for i in rng.permutation(10)[:k]],
                        [np.sort(rng.random((s.height * s.width, kappa), dtype=np.float32), axis=1) for s in SHAPES],
                        [rng.integers(0, k, (s.height * s.width, kappa)).astype(np.int16) for s in SHAPES],
                        [rng.integers(-1, s.height * s.width, (s.height * s.width, kappa)).astype(np.int32) for s in SHAPES] if cells else None)


@pytest.mark.parametrize("cells", [True, False], ids=["with-cells", "from-before-cells"])
@pytest.mark.parametrize("kappa", [1, 3])
def test_matches_written_are_read_back_by_id(tmp_path, kappa, cells):
    rng = np.random.default_rng(kappa)
    ids, written = ["b.png", "a.png", "c.png"], [matches(rng, 3, kappa, cells) for _ in range(3)]
    path = tmp_path / "calibration.parquet"
    write_matches(str(path), ids, written, SHAPES)
    read = read_matches(path.read_bytes(), SHAPES)
    assert list(read) == ids
    for image_id, expected in zip(ids, written):
        got = read[image_id]
        assert got.neighbour_ids == expected.neighbour_ids
        assert (got.cells is None) == (expected.cells is None) == (not cells)
        for a, b in zip(got.distances + got.sources + (got.cells or []), expected.distances + expected.sources + (expected.cells or [])):
            assert a.dtype == b.dtype and a.shape == b.shape
            np.testing.assert_array_equal(a, b)
    maps = read["a.png"].layer_maps(SHAPES)
    assert [m.shape for m in maps] == [(4, 4), (2, 2)]
    np.testing.assert_allclose(maps[0], written[1].distances[0].mean(axis=1).reshape(4, 4), rtol=1e-6)


def test_matches_of_other_layers_are_refused(tmp_path):
    path = tmp_path / "calibration.parquet"
    write_matches(str(path), ["a"], [matches(np.random.default_rng(0), 2, 1)], SHAPES)
    with pytest.raises(ValueError, match="other layers"):
        read_matches(path.read_bytes(), [LayerShape("layer3", 1, 1, 4)])
