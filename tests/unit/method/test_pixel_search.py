"""pixel_search.py (the full and the restricted pixel search) against brute-force float64 NumPy references written here."""

import numpy as np
import pytest
import torch

from spade_batch.method import pixel_search, spade


def reference_knn_distance(queries: np.ndarray, gallery: np.ndarray, kappa: int) -> np.ndarray:
    """Full float64 distance matrix, explicit differences (no GEMM trick)."""
    diffs = queries.astype(np.float64)[:, None, :] - gallery.astype(np.float64)[None, :, :]
    distances = (diffs**2).sum(axis=2)
    return np.sort(distances, axis=1)[:, :kappa].mean(axis=1)


@pytest.mark.parametrize("kappa", [1, 3])
@pytest.mark.parametrize("chunk_bytes", [1, 4 * 17 * 7, 1 << 30])
def test_nearest_sq_distances_of_one_image_match_brute_force(kappa: int, chunk_bytes: int) -> None:
    rng = np.random.default_rng(kappa)
    queries = rng.normal(size=(17, 8)).astype(np.float32)
    gallery = rng.normal(size=(101, 8)).astype(np.float32)  # 101: no chunk size used divides it
    got = pixel_search.batch_nearest_sq_distances(torch.from_numpy(queries)[None], torch.from_numpy(gallery)[None], kappa, chunk_bytes)[0]
    np.testing.assert_allclose(got.numpy(), reference_knn_distance(queries, gallery, kappa), rtol=1e-4)


def test_nearest_sq_distances_sees_the_gallery_tail() -> None:
    queries = torch.zeros(4, 3)
    gallery = torch.full((50, 3), 10.0)
    gallery[-1] = 0.5  # the only close match is the last row, in a partial last chunk
    got = pixel_search.batch_nearest_sq_distances(queries[None], gallery[None], kappa=1, chunk_bytes=4 * 4 * 7)[0]
    np.testing.assert_allclose(got.numpy(), np.full(4, 0.75), rtol=1e-6)


def test_kappa_larger_than_gallery_is_an_error() -> None:
    with pytest.raises(ValueError, match="kappa=5"):
        pixel_search.batch_nearest_sq_distances(torch.zeros(1, 2, 3), torch.zeros(1, 4, 3), kappa=5)


def reference_batch_knn_distance(queries: np.ndarray, galleries: np.ndarray, kappa: int) -> np.ndarray:
    """Image by image: each image's queries against its own gallery only."""
    return np.stack([reference_knn_distance(q, g, kappa) for q, g in zip(queries, galleries)])


def relu_features(rng: np.random.Generator, basis: np.ndarray, count: int) -> np.ndarray:
    """count x C post-ReLU-like features: low-rank structure plus noise, positive offset, rectified."""
    mixed = rng.normal(size=(count, basis.shape[0])) @ basis + rng.normal(scale=0.5, size=(count, basis.shape[1]))
    return np.maximum(mixed + 1.0, 0.0).astype(np.float32)


@pytest.mark.parametrize("precision", pixel_search.PRECISIONS)
@pytest.mark.parametrize("kappa", [1, 3])
@pytest.mark.parametrize("chunk_bytes", [1, 4 * 3 * 17 * 7, 1 << 30])
def test_batch_nearest_sq_distances_matches_brute_force(precision: str, kappa: int, chunk_bytes: int) -> None:
    rng = np.random.default_rng(kappa)
    queries = rng.normal(size=(3, 17, 8)).astype(np.float32)
    galleries = rng.normal(size=(3, 101, 8)).astype(np.float32)  # one gallery per image; 101: no chunk divides it
    got = pixel_search.batch_nearest_sq_distances(
        torch.from_numpy(queries), torch.from_numpy(galleries), kappa, chunk_bytes, precision
    )
    assert got.dtype == torch.float32 and got.shape == (3, 17)
    np.testing.assert_allclose(got.numpy(), reference_batch_knn_distance(queries, galleries, kappa), rtol=1e-5)


def test_batch_nearest_sq_distances_sees_each_gallery_tail() -> None:
    queries = torch.zeros(2, 4, 3)
    galleries = torch.full((2, 50, 3), 10.0)
    galleries[1, -1] = 0.5  # image 1's only close match is its last row, in a partial last chunk
    got = pixel_search.batch_nearest_sq_distances(queries, galleries, kappa=1, chunk_bytes=4 * 2 * 4 * 7)
    np.testing.assert_allclose(got.numpy(), [[300.0] * 4, [0.75] * 4], rtol=1e-6)


@pytest.mark.parametrize("margin", [pixel_search.RERANK_MARGIN, 0])
def test_low_precision_only_ranks(margin: int, monkeypatch: pytest.MonkeyPatch) -> None:
    """Centred post-ReLU-like features, queries mostly near-duplicates of gallery rows (the hard case for
    ranking): with the margin every precision is float64-exact; without it bfloat16 misses neighbours."""
    monkeypatch.setattr(pixel_search, "RERANK_MARGIN", margin)
    rng = np.random.default_rng(0)
    batch, pixels, gallery_rows, channels = 2, 128, 1024, 32
    basis = rng.normal(scale=2.0, size=(8, channels))
    galleries = relu_features(rng, basis, batch * gallery_rows).reshape(batch, gallery_rows, channels)
    copied = rng.integers(0, gallery_rows, size=(batch, pixels))
    queries = galleries[np.arange(batch)[:, None], copied] + rng.normal(scale=0.05, size=(batch, pixels, channels))
    queries[:, : pixels // 4] = relu_features(rng, basis, batch * (pixels // 4)).reshape(batch, -1, channels)
    queries = queries.astype(np.float32)
    mean = torch.from_numpy(galleries.reshape(-1, channels).mean(axis=0))
    centred_queries = spade.centre(torch.from_numpy(queries), mean)
    centred_galleries = spade.centre(torch.from_numpy(galleries), mean)
    missed = 0
    for kappa in (1, 3):
        expected = reference_batch_knn_distance(queries, galleries, kappa)
        got = {
            precision: pixel_search.batch_nearest_sq_distances(centred_queries, centred_galleries, kappa, 1 << 16, precision)
            for precision in pixel_search.PRECISIONS
        }
        assert torch.equal(got["tf32"], got["float32"])  # no TF32 on CPU
        np.testing.assert_allclose(got["float32"].numpy(), expected, rtol=1e-5)
        bfloat16 = got["bfloat16"].numpy()
        assert (bfloat16 >= expected * (1 - 1e-5)).all()  # a recomputed candidate is never below the true nearest
        missed += int((bfloat16 > expected * (1 + 1e-4)).sum())
        if margin:
            assert torch.equal(got["bfloat16"], got["float32"])
    assert (missed > 0) == (margin == 0)  # measured without it: 7 of 256 queries, kappa 3


@pytest.mark.parametrize("precision", pixel_search.PRECISIONS)
def test_matmul_precision_is_scoped_to_the_call(precision: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """On CPU every precision runs its float32 GEMMs at full precision, and the caller's setting comes back."""
    seen = []
    partial_scores = pixel_search._partial_scores

    def recording(*args):
        seen.append(torch.get_float32_matmul_precision())
        return partial_scores(*args)

    monkeypatch.setattr(pixel_search, "_partial_scores", recording)
    previous = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("medium")
    try:
        pixel_search.batch_nearest_sq_distances(torch.zeros(1, 2, 3), torch.ones(1, 4, 3), precision=precision)
        assert torch.get_float32_matmul_precision() == "medium"
    finally:
        torch.set_float32_matmul_precision(previous)
    assert seen == ["highest"]


def test_unknown_precision_and_mismatched_batches_are_errors() -> None:
    with pytest.raises(ValueError, match="precision='float16' is not one of float32, tf32, bfloat16"):
        pixel_search.batch_nearest_sq_distances(torch.zeros(1, 2, 3), torch.zeros(1, 4, 3), precision="float16")
    with pytest.raises(ValueError, match="2 query images but 3 galleries"):
        pixel_search.batch_nearest_sq_distances(torch.zeros(2, 2, 3), torch.zeros(3, 4, 3))


def reference_local_matches(queries: np.ndarray, gallery: np.ndarray, grid: tuple[int, int], radius: int, kappa: int) -> tuple[np.ndarray, np.ndarray]:
    """float64 brute force over each cell's neighbourhood, cell by cell: (P x kappa ascending distances, their rows),
    +inf (row -1) where the neighbourhood holds fewer than kappa cells."""
    height, width = grid
    pixels = height * width
    distances, rows = np.full((pixels, kappa), np.inf), np.full((pixels, kappa), -1)
    for cell in range(pixels):
        y, x = divmod(cell, width)
        candidates = [image * pixels + yy * width + xx for image in range(len(gallery) // pixels)
                      for yy in range(height) for xx in range(width) if max(abs(yy - y), abs(xx - x)) <= radius]
        found = ((queries[cell].astype(np.float64) - gallery[candidates].astype(np.float64)) ** 2).sum(-1)
        order = np.argsort(found)[:kappa]
        distances[cell, : len(order)], rows[cell, : len(order)] = found[order], np.array(candidates)[order]
    return distances, rows


@pytest.mark.parametrize("precision", ["float32", "bfloat16"])
@pytest.mark.parametrize("kappa", [1, 3])
@pytest.mark.parametrize(("grid", "radius", "images", "tile"), [
    ((14, 14), 2, 3, 8),  # layer1 of a 56 px image at radius 8 px: tiles cut at the border
    ((7, 5), 1, 2, 3),  # layer2-like, not square, tiles of 3 leave a partial tile on each side
    ((4, 4), 1, 1, 8),  # layer3-like: one tile holds the map; a corner has 4 cells, kappa 3 fits, 5 would not
    ((6, 9), 0, 2, 4),  # radius 0: the same position only, fewer cells than kappa 3 -> +inf
    ((5, 5), 7, 2, 2),  # a radius beyond the map: the full search
    ((8, 6), 1, 3, 2),  # tiles divide the grid: no padded copy
])
@pytest.mark.parametrize("calls", ["one tile row per call", "every row in one call"])
def test_local_nearest_matches_equal_a_brute_force_search_of_each_neighbourhood(precision, kappa, grid, radius, images, tile, calls) -> None:
    rng = np.random.default_rng(kappa + radius)
    pixels = grid[0] * grid[1]
    queries = rng.normal(size=(2, pixels, 6)).astype(np.float32)
    galleries = rng.normal(size=(2, images * pixels, 6)).astype(np.float32)
    distances, rows = pixel_search.local_nearest_matches(torch.from_numpy(queries), torch.from_numpy(galleries), grid, radius, kappa,
                                                  chunk_bytes=4 * 16 * 9 * images if calls.startswith("one") else 1 << 30,
                                                  precision=precision, tile=tile)
    assert distances.shape == rows.shape == (2, pixels, kappa) and distances.dtype == torch.float32
    for image in range(2):
        expected, expected_rows = reference_local_matches(queries[image], galleries[image], grid, radius, kappa)
        np.testing.assert_allclose(distances[image].numpy(), expected, rtol=1e-5)
        found = np.isfinite(expected)
        np.testing.assert_array_equal(rows[image].numpy()[found], expected_rows[found])
