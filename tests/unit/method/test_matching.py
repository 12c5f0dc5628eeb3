"""Pixel matches updated when an image's retrieved images change, against a float64 brute-force search of the new set."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pytest
import torch

from spade_batch.formats.calibration_matches import PixelMatches
from spade_batch.method.matching import match_pixels

PIXELS, CHANNELS = (16, 2), (8, 16)  # two layers: pixels per image and channels


class Gallery:
    """matching.GalleryRows over random per-image pixel features; records which images each call asked for."""

    def __init__(self, rng: np.random.Generator, images: int):
        self.layers = [rng.normal(size=(images, pixels, channels)).astype(np.float32) for pixels, channels in zip(PIXELS, CHANNELS)]
        self.asked: list[list[str]] = []

    def __call__(self, ids: Sequence[str], layer: int) -> torch.Tensor:
        self.asked.append(list(ids))
        return torch.from_numpy(np.concatenate([self.layers[layer][int(i)] for i in ids]))


def brute_force(queries: list[np.ndarray], gallery: Gallery, ids: list[str], kappa: int) -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """Per layer, float64 (P x kappa ascending distances, P x kappa positions in ids of their images, their cells)."""
    found = []
    for layer, query in enumerate(queries):
        rows = np.concatenate([gallery.layers[layer][int(i)] for i in ids]).astype(np.float64)
        distances = ((query.astype(np.float64)[:, None, :] - rows[None]) ** 2).sum(-1)
        order = np.argsort(distances, axis=1)[:, :kappa]
        found.append((np.take_along_axis(distances, order, 1), order // PIXELS[layer], order % PIXELS[layer]))
    return found


def assert_same(matches: PixelMatches, expected: list[tuple[np.ndarray, np.ndarray, np.ndarray]], ids: list[str]) -> None:
    assert matches.neighbour_ids == ids and matches.cells is not None
    for (distances, sources, cells), got, got_sources, got_cells in zip(expected, matches.distances, matches.sources, matches.cells):
        assert got.dtype == np.float32 and got_sources.dtype == np.int16
        found = np.isfinite(distances)
        np.testing.assert_allclose(got, distances, rtol=1e-5)
        np.testing.assert_array_equal(got_sources[found], sources[found])
        np.testing.assert_array_equal(got_cells[found], cells[found])


@pytest.mark.parametrize("kappa", [1, 3])
@pytest.mark.parametrize(("before", "after"), [
    (["0", "1", "2", "3", "4"], ["2", "9", "3", "4", "10"]),  # two left, two joined, the order changed
    (["0", "1", "2"], ["1", "2", "7"]),  # one joined: in the second layer it has fewer pixels than kappa 3
    (["0", "1", "2"], ["5", "6", "7"]),  # every image changed
    (["0", "1", "2"], ["2", "1", "0"]),  # the same images in another order
])
def test_updated_matches_are_a_full_search_of_the_new_images_and_search_only_what_changed(before, after, kappa):
    rng = np.random.default_rng(kappa)
    gallery = Gallery(rng, 11)
    queries = [rng.normal(size=(pixels, channels)).astype(np.float32) for pixels, channels in zip(PIXELS, CHANNELS)]
    tensors = [torch.from_numpy(q) for q in queries]

    first = match_pixels(tensors, before, gallery, kappa)
    assert_same(first, brute_force(queries, gallery, before, kappa), before)
    assert gallery.asked == [before, before], "a first search asks for every retrieved image, once per layer"

    gallery.asked.clear()
    updated = match_pixels(tensors, after, gallery, kappa, previous=first)
    assert_same(updated, brute_force(queries, gallery, after, kappa), after)
    joined = [i for i in after if i not in before]
    kept = [i for i in after if i in before]
    assert all(asked in (joined, kept) for asked in gallery.asked), "only the joined images, or the kept ones for pixels that lost a match"
    assert gallery.asked.count(joined) == (2 if joined else 0)
    if not joined:
        assert gallery.asked == [] and all(np.array_equal(a, b) for a, b in zip(updated.distances, first.distances))


def test_more_retrieved_images_than_a_source_can_name_is_an_error():
    gallery = Gallery(np.random.default_rng(0), 1)
    with pytest.raises(ValueError, match="k=40000 retrieved images"):
        match_pixels([torch.zeros(16, 8), torch.zeros(2, 16)], ["0"] * 40_000, gallery, 1)


GRIDS = ((4, 4), (2, 1))  # the two layers' grids (PIXELS)


def brute_force_local(queries: list[np.ndarray], gallery: Gallery, ids: list[str], kappa: int, radius: int) -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """Per layer, float64 over each pixel's neighbourhood in each image: (distances, image positions in ids, cells), +inf where none."""
    found = []
    for layer, query in enumerate(queries):
        width, pixels = GRIDS[layer][1], PIXELS[layer]
        distances, sources, cells = np.full((pixels, kappa), np.inf), np.zeros((pixels, kappa), int), np.zeros((pixels, kappa), int)
        for cell in range(pixels):
            y, x = divmod(cell, width)
            near = [(((query[cell].astype(np.float64) - gallery.layers[layer][int(i)][other]) ** 2).sum(), n, other)
                    for n, i in enumerate(ids) for other in range(pixels) if max(abs(other // width - y), abs(other % width - x)) <= radius]
            for rank, (distance, n, other) in enumerate(sorted(near)[:kappa]):
                distances[cell, rank], sources[cell, rank], cells[cell, rank] = distance, n, other
        found.append((distances, sources, cells))
    return found


@pytest.mark.parametrize("kappa", [1, 3])
@pytest.mark.parametrize(("before", "after"), [(["0", "1", "2", "3", "4"], ["2", "9", "3", "4", "10"]), (["0"], ["0", "7"]), (["0", "1"], ["5", "6"])])
def test_matches_within_a_radius_are_a_restricted_search_of_the_new_images_and_update_alike(before, after, kappa):
    """Radius 1: a corner of the 4 x 4 layer has 4 cells per image, so with one image kappa 3 nearly fills it; the
    2 x 1 layer is inside the radius (the full search). Cells name each match's cell in its image."""
    rng = np.random.default_rng(kappa + len(before))
    gallery = Gallery(rng, 11)
    queries = [rng.normal(size=(pixels, channels)).astype(np.float32) for pixels, channels in zip(PIXELS, CHANNELS)]
    tensors = [torch.from_numpy(q) for q in queries]
    previous = None
    for ids in (before, after):
        matches = match_pixels(tensors, ids, gallery, kappa, previous, grids=GRIDS, radii=[1, 1])
        for (distances, sources, cells), got, got_sources, got_cells in zip(brute_force_local(queries, gallery, ids, kappa, 1),
                                                                             matches.distances, matches.sources, matches.cells):
            np.testing.assert_allclose(got, distances, rtol=1e-5)
            np.testing.assert_array_equal(got_sources[np.isfinite(distances)], sources[np.isfinite(distances)])
            np.testing.assert_array_equal(got_cells[np.isfinite(distances)], cells[np.isfinite(distances)])
        previous = matches
