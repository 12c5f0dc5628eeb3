"""Pixel matches updated when an image's retrieved images change, against a float64 brute-force search of the new set."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pytest
import torch

from spade_batch.formats.matches import PixelMatches
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


def brute_force(queries: list[np.ndarray], gallery: Gallery, ids: list[str], kappa: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """Per layer, float64 (P x kappa ascending distances, P x kappa positions in ids of their images)."""
    found = []
    for layer, query in enumerate(queries):
        rows = np.concatenate([gallery.layers[layer][int(i)] for i in ids]).astype(np.float64)
        distances = ((query.astype(np.float64)[:, None, :] - rows[None]) ** 2).sum(-1)
        order = np.argsort(distances, axis=1)[:, :kappa]
        found.append((np.take_along_axis(distances, order, 1), order // PIXELS[layer]))
    return found


def assert_same(matches: PixelMatches, expected: list[tuple[np.ndarray, np.ndarray]], ids: list[str]) -> None:
    assert matches.neighbour_ids == ids
    for (distances, sources), got, got_sources in zip(expected, matches.distances, matches.sources):
        assert got.dtype == np.float32 and got_sources.dtype == np.int16
        np.testing.assert_allclose(got, distances, rtol=1e-5)
        np.testing.assert_array_equal(got_sources, sources)


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
