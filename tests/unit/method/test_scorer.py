"""Scorer.nearest_normal: where each cell of the finest layer found its nearest normal pixel, against a float64
brute-force argmin over the retrieved images' stored gallery (full search, and within a match radius)."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest

from spade_batch.config import Settings
from spade_batch.formats.images import decode_image
from spade_batch.formats.model import SpadeModel
from spade_batch.method.alignment import radius_cells
from spade_batch.method.extractor import Extractor
from spade_batch.method.scorer import Scorer


def brute_force(query: np.ndarray, gallery: np.ndarray, radius: int | None, grid: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """query h*w x C, gallery K x h*w x C (both centred) -> per cell the image and the cell of its nearest gallery cell
    (within `radius` cells, Chebyshev, when given), by a float64 argmin."""
    pixels = gallery.shape[1]
    distances = ((query.astype(np.float64)[:, None, :] - gallery.reshape(-1, gallery.shape[-1]).astype(np.float64)[None]) ** 2).sum(-1)
    if radius is not None:
        y, x = np.divmod(np.arange(grid[0] * grid[1]), grid[1])
        near = np.maximum(np.abs(y[:, None] - y[None]), np.abs(x[:, None] - x[None])) <= radius
        distances[~np.tile(near, (1, len(gallery)))] = np.inf
    nearest = distances.argmin(axis=1)
    return nearest // pixels, nearest % pixels


@pytest.mark.parametrize("match_radius", [None, 16])
def test_each_finest_cell_names_the_image_and_cell_of_its_nearest_normal_pixel(tiny_model, match_radius):
    loaded = SpadeModel.load(tiny_model.path)
    card = dataclasses.replace(loaded.card, settings=dataclasses.replace(loaded.card.settings, match_radius=match_radius))
    model = dataclasses.replace(loaded, card=card)  # the search's radius is the card's; the gallery does not depend on it
    settings = card.settings_for(Settings(device="cpu"))
    scorer = Scorer(model, Extractor(settings, preprocessing=card.preprocessing))
    images = sorted(Path(tiny_model.train).joinpath("test").rglob("*.png"))[:2]
    features = scorer.extractor.forward(np.stack([scorer.extractor.prepare(decode_image(f.read_bytes(), str(f))) for f in images]))
    neighbours = [model.train_ids[:3], model.train_ids[2:5]]

    found = scorer.nearest_normal(features, neighbours)

    layer = scorer.finest_layer
    shape = card.layer_shapes[layer]
    assert layer == 0 and (shape.height, shape.width) == (16, 16)  # layer1 of a 64 px image
    radius = radius_cells(match_radius, shape.height, card.preprocessing.size)
    mean = model.centre.layer_means[layer]
    for image, (matches, ids) in enumerate(zip(found, neighbours)):
        query = features.layers[layer][image].numpy().reshape(shape.channels, -1).T - mean
        gallery = np.stack([np.asarray(model.gallery[layer][model.row_of[i]], np.float32) for i in ids])
        sources, cells = brute_force(query, gallery, radius, (shape.height, shape.width))
        assert matches.neighbour_ids == ids and len(matches.distances) == 1 and matches.distances[0].shape == (256, 1)
        np.testing.assert_array_equal(matches.sources[0][:, 0], sources)
        np.testing.assert_array_equal(matches.cells[0][:, 0], cells)
        if radius is not None:
            y, x = np.divmod(np.arange(256), 16)
            assert (np.maximum(np.abs(cells // 16 - y), np.abs(cells % 16 - x)) <= radius).all()
