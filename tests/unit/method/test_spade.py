"""spade.py against a brute-force float64 NumPy reference written here."""

import faiss
import numpy as np
import pytest
import scipy.ndimage
import torch
import torch.nn.functional as F

from spade_batch.method import spade


def reference_knn_distance(queries: np.ndarray, gallery: np.ndarray, kappa: int) -> np.ndarray:
    """Full float64 distance matrix, explicit differences (no GEMM trick)."""
    diffs = queries.astype(np.float64)[:, None, :] - gallery.astype(np.float64)[None, :, :]
    distances = (diffs**2).sum(axis=2)
    return np.sort(distances, axis=1)[:, :kappa].mean(axis=1)


def reference_bilinear(values: np.ndarray, height: int, width: int) -> np.ndarray:
    """Bilinear resize with half-pixel centres (align_corners=False), explicit loops."""
    in_h, in_w = values.shape
    out = np.zeros((height, width))
    for y in range(height):
        sy = max((y + 0.5) * in_h / height - 0.5, 0.0)
        y0 = min(int(np.floor(sy)), in_h - 1)
        y1 = min(y0 + 1, in_h - 1)
        fy = sy - y0
        for x in range(width):
            sx = max((x + 0.5) * in_w / width - 0.5, 0.0)
            x0 = min(int(np.floor(sx)), in_w - 1)
            x1 = min(x0 + 1, in_w - 1)
            fx = sx - x0
            top = values[y0, x0] * (1 - fx) + values[y0, x1] * fx
            bottom = values[y1, x0] * (1 - fx) + values[y1, x1] * fx
            out[y, x] = top * (1 - fy) + bottom * fy
    return out


def reference_anomaly_map(query_layers, gallery_layers, size, kappa, sigma, scales=None):
    maps = []
    for query, gallery, scale in zip(query_layers, gallery_layers, scales or [1.0] * len(query_layers)):
        channels, height, width = query.shape
        distances = reference_knn_distance(query.reshape(channels, -1).T, gallery, kappa).reshape(height, width)
        maps.append(reference_bilinear(distances, *size) / scale)
    return scipy.ndimage.gaussian_filter(np.mean(maps, axis=0), sigma=sigma, mode="reflect", truncate=4.0)


@pytest.mark.parametrize("kappa", [1, 3])
@pytest.mark.parametrize("chunk_bytes", [1, 4 * 17 * 7, 1 << 30])
def test_nearest_sq_distances_of_one_image_match_brute_force(kappa: int, chunk_bytes: int) -> None:
    rng = np.random.default_rng(kappa)
    queries = rng.normal(size=(17, 8)).astype(np.float32)
    gallery = rng.normal(size=(101, 8)).astype(np.float32)  # 101: no chunk size used divides it
    got = spade.batch_nearest_sq_distances(torch.from_numpy(queries)[None], torch.from_numpy(gallery)[None], kappa, chunk_bytes)[0]
    np.testing.assert_allclose(got.numpy(), reference_knn_distance(queries, gallery, kappa), rtol=1e-4)


def test_nearest_sq_distances_sees_the_gallery_tail() -> None:
    queries = torch.zeros(4, 3)
    gallery = torch.full((50, 3), 10.0)
    gallery[-1] = 0.5  # the only close match is the last row, in a partial last chunk
    got = spade.batch_nearest_sq_distances(queries[None], gallery[None], kappa=1, chunk_bytes=4 * 4 * 7)[0]
    np.testing.assert_allclose(got.numpy(), np.full(4, 0.75), rtol=1e-6)


def test_kappa_larger_than_gallery_is_an_error() -> None:
    with pytest.raises(ValueError, match="kappa=5"):
        spade.batch_nearest_sq_distances(torch.zeros(1, 2, 3), torch.zeros(1, 4, 3), kappa=5)


def test_upsample_is_torch_bilinear_without_corner_alignment() -> None:
    values = torch.rand(5, 7, dtype=torch.float64)
    got = spade.upsample(values, (23, 19))
    expected = F.interpolate(values[None, None], size=(23, 19), mode="bilinear", align_corners=False)[0, 0]
    assert torch.equal(got, expected)
    np.testing.assert_allclose(got.numpy(), reference_bilinear(values.numpy(), 23, 19), rtol=1e-12)


@pytest.mark.parametrize("shape", [(64, 48), (9, 40), (3, 5)])  # radius 16 exceeds the small sides
def test_gaussian_smooth_equals_scipy(shape: tuple[int, int]) -> None:
    values = np.random.default_rng(1).gamma(2.0, size=shape).astype(np.float32) * 100
    got = spade.gaussian_smooth(torch.from_numpy(values), sigma=4.0)
    expected = scipy.ndimage.gaussian_filter(values.astype(np.float64), sigma=4.0)
    np.testing.assert_allclose(got.numpy(), expected, rtol=1e-5, atol=1e-5 * np.abs(expected).max())


def test_image_knn_scores_are_mean_squared_distances() -> None:
    rng = np.random.default_rng(3)
    train = rng.normal(size=(30, 16)).astype(np.float32)
    test = rng.normal(size=(5, 16)).astype(np.float32)
    index = faiss.IndexFlatL2(16)
    index.add(train)
    for k in (1, 7, 30):  # k = number of train images included
        scores, neighbours = spade.image_knn(index, test, k)
        expected = reference_knn_distance(test, train, k)
        np.testing.assert_allclose(scores, expected, rtol=1e-4)
        brute_order = np.argsort(((test[:, None] - train[None]) ** 2).sum(2), axis=1)[:, :k]
        np.testing.assert_array_equal(neighbours, brute_order)


def test_image_knn_leaving_one_out_equals_a_search_without_that_image() -> None:
    rng = np.random.default_rng(5)
    train = rng.normal(size=(30, 16)).astype(np.float32)
    index = faiss.IndexFlatL2(16)
    index.add(train)
    queries = np.concatenate([train[[4, 17, 29]], rng.normal(size=(1, 16)).astype(np.float32)])
    exclude = np.array([4, 17, 29, -1])
    for k in (1, 5, 29):
        scores, neighbours = spade.image_knn(index, queries, k, exclude)
        for row, own in enumerate(exclude):  # brute force over the other images (all of them for -1)
            others = np.array([n for n in range(30) if n != own])
            distances = ((train[others] - queries[row]) ** 2).sum(1)
            np.testing.assert_array_equal(neighbours[row], others[np.argsort(distances)[:k]])
            assert scores[row] == pytest.approx(np.sort(distances)[:k].mean(), rel=1e-4)
    with pytest.raises(ValueError, match="k=30 .* holds 30 .*itself"):
        spade.image_knn(index, queries, 30, exclude)


def test_image_knn_k_above_train_size_is_a_clear_error() -> None:
    index = faiss.IndexFlatL2(4)
    index.add(np.zeros((3, 4), dtype=np.float32))
    with pytest.raises(ValueError, match="k=4 .* holds 3"):
        spade.image_knn(index, np.zeros((1, 4), dtype=np.float32), 4)


def test_gather_galleries_flattens_the_selected_images() -> None:
    bank = torch.arange(4 * 3 * 2, dtype=torch.float16).reshape(4, 3, 2)
    got = spade.gather_galleries(bank, torch.tensor([[2, 0]]))[0]
    assert got.dtype == torch.float32 and got.shape == (6, 2)
    assert torch.equal(got, torch.cat([bank[2], bank[0]]).float())


def reference_batch_knn_distance(queries: np.ndarray, galleries: np.ndarray, kappa: int) -> np.ndarray:
    """Image by image: each image's queries against its own gallery only."""
    return np.stack([reference_knn_distance(q, g, kappa) for q, g in zip(queries, galleries)])


def relu_features(rng: np.random.Generator, basis: np.ndarray, count: int) -> np.ndarray:
    """count x C post-ReLU-like features: low-rank structure plus noise, positive offset, rectified."""
    mixed = rng.normal(size=(count, basis.shape[0])) @ basis + rng.normal(scale=0.5, size=(count, basis.shape[1]))
    return np.maximum(mixed + 1.0, 0.0).astype(np.float32)


@pytest.mark.parametrize("precision", spade.PRECISIONS)
@pytest.mark.parametrize("kappa", [1, 3])
@pytest.mark.parametrize("chunk_bytes", [1, 4 * 3 * 17 * 7, 1 << 30])
def test_batch_nearest_sq_distances_matches_brute_force(precision: str, kappa: int, chunk_bytes: int) -> None:
    rng = np.random.default_rng(kappa)
    queries = rng.normal(size=(3, 17, 8)).astype(np.float32)
    galleries = rng.normal(size=(3, 101, 8)).astype(np.float32)  # one gallery per image; 101: no chunk divides it
    got = spade.batch_nearest_sq_distances(
        torch.from_numpy(queries), torch.from_numpy(galleries), kappa, chunk_bytes, precision
    )
    assert got.dtype == torch.float32 and got.shape == (3, 17)
    np.testing.assert_allclose(got.numpy(), reference_batch_knn_distance(queries, galleries, kappa), rtol=1e-5)


def test_batch_nearest_sq_distances_sees_each_gallery_tail() -> None:
    queries = torch.zeros(2, 4, 3)
    galleries = torch.full((2, 50, 3), 10.0)
    galleries[1, -1] = 0.5  # image 1's only close match is its last row, in a partial last chunk
    got = spade.batch_nearest_sq_distances(queries, galleries, kappa=1, chunk_bytes=4 * 2 * 4 * 7)
    np.testing.assert_allclose(got.numpy(), [[300.0] * 4, [0.75] * 4], rtol=1e-6)


@pytest.mark.parametrize("margin", [spade.RERANK_MARGIN, 0])
def test_low_precision_only_ranks(margin: int, monkeypatch: pytest.MonkeyPatch) -> None:
    """Centred post-ReLU-like features, queries mostly near-duplicates of gallery rows (the hard case for
    ranking): with the margin every precision is float64-exact; without it bfloat16 misses neighbours."""
    monkeypatch.setattr(spade, "RERANK_MARGIN", margin)
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
            precision: spade.batch_nearest_sq_distances(centred_queries, centred_galleries, kappa, 1 << 16, precision)
            for precision in spade.PRECISIONS
        }
        assert torch.equal(got["tf32"], got["float32"])  # no TF32 on CPU
        np.testing.assert_allclose(got["float32"].numpy(), expected, rtol=1e-5)
        bfloat16 = got["bfloat16"].numpy()
        assert (bfloat16 >= expected * (1 - 1e-5)).all()  # a recomputed candidate is never below the true nearest
        missed += int((bfloat16 > expected * (1 + 1e-4)).sum())
        if margin:
            assert torch.equal(got["bfloat16"], got["float32"])
    assert (missed > 0) == (margin == 0)  # measured without it: 7 of 256 queries, kappa 3


def test_centring_makes_float32_exact_on_offset_features() -> None:
    """Squared norms near 1e6 with a small spread: float32 ranking is noise until the offset is removed."""
    rng = np.random.default_rng(5)
    channels = 16
    offset = np.full(channels, 250.0)  # |offset|^2 = 1e6, like raw wide_resnet50_2 features
    queries = (offset + rng.normal(scale=0.01, size=(2, 20, channels))).astype(np.float32)
    galleries = (offset + rng.normal(scale=0.01, size=(2, 300, channels))).astype(np.float32)
    expected = reference_batch_knn_distance(queries, galleries, 1)
    raw = spade.batch_nearest_sq_distances(torch.from_numpy(queries), torch.from_numpy(galleries))
    mean = torch.from_numpy(galleries.reshape(-1, channels).mean(axis=0))
    centred = spade.batch_nearest_sq_distances(
        spade.centre(torch.from_numpy(queries), mean), spade.centre(torch.from_numpy(galleries), mean)
    )
    assert (raw.numpy() > expected * 1.1).any()  # wrong neighbours without centring
    np.testing.assert_allclose(centred.numpy(), expected, rtol=1e-5)


def test_centre_subtracts_along_the_channel_dimension() -> None:
    features = torch.arange(2 * 3 * 2 * 2, dtype=torch.float16).reshape(2, 3, 2, 2)  # B x C x h x w
    mean = torch.tensor([1.0, 2.0, 3.0], dtype=torch.float64)
    got = spade.centre(features, mean, dim=1)
    assert got.dtype == torch.float32
    assert torch.equal(got, features.float() - torch.tensor([1.0, 2.0, 3.0])[None, :, None, None])


@pytest.mark.parametrize("precision", spade.PRECISIONS)
def test_matmul_precision_is_scoped_to_the_call(precision: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """On CPU every precision runs its float32 GEMMs at full precision, and the caller's setting comes back."""
    seen = []
    partial_scores = spade._partial_scores

    def recording(*args):
        seen.append(torch.get_float32_matmul_precision())
        return partial_scores(*args)

    monkeypatch.setattr(spade, "_partial_scores", recording)
    previous = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("medium")
    try:
        spade.batch_nearest_sq_distances(torch.zeros(1, 2, 3), torch.ones(1, 4, 3), precision=precision)
        assert torch.get_float32_matmul_precision() == "medium"
    finally:
        torch.set_float32_matmul_precision(previous)
    assert seen == ["highest"]


def test_unknown_precision_and_mismatched_batches_are_errors() -> None:
    with pytest.raises(ValueError, match="precision='float16' is not one of float32, tf32, bfloat16"):
        spade.batch_nearest_sq_distances(torch.zeros(1, 2, 3), torch.zeros(1, 4, 3), precision="float16")
    with pytest.raises(ValueError, match="2 query images but 3 galleries"):
        spade.batch_nearest_sq_distances(torch.zeros(2, 2, 3), torch.zeros(3, 4, 3))


@pytest.mark.parametrize("precision", ["float32", "bfloat16"])
@pytest.mark.parametrize("kappa", [1, 2])
@pytest.mark.parametrize("scales", [None, [0.5, 30.0, 1000.0]])
def test_anomaly_maps_match_brute_force_image_by_image(precision: str, kappa: int, scales: list[float] | None) -> None:
    rng = np.random.default_rng(11)
    grids = [(8, 8, 6), (4, 4, 10), (2, 2, 12)]  # (h, w, C), strides 4, 8, 16 of a 32 x 24 input
    batch, k = 2, 3
    query_layers = [rng.normal(size=(batch, c, h, w)).astype(np.float32) for h, w, c in grids]
    gallery_layers = [rng.normal(size=(batch, k * h * w, c)).astype(np.float32) for h, w, c in grids]
    got = spade.anomaly_maps(
        [torch.from_numpy(q) for q in query_layers],
        [torch.from_numpy(g) for g in gallery_layers],
        output_size=(32, 24),
        kappa=kappa,
        sigma=4.0,
        chunk_bytes=4 * batch * 64 * 5,
        precision=precision,
        layer_scales=scales,
    )
    assert got.dtype == torch.float32 and got.shape == (batch, 32, 24)
    for b in range(batch):
        expected = reference_anomaly_map([q[b] for q in query_layers], [g[b] for g in gallery_layers], (32, 24), kappa, 4.0, scales)
        np.testing.assert_allclose(got[b].numpy(), expected, rtol=1e-4)


def test_layer_scales_must_be_one_positive_value_per_layer() -> None:
    layers = [torch.ones(1, 2, 2), torch.ones(1, 1, 1)]
    for scales in ([1.0], [1.0, 0.0]):
        with pytest.raises(ValueError, match="layer_scales must be 2 positive values"):
            spade.combine_layer_maps(layers, (4, 4), 1.0, scales)


@pytest.mark.parametrize("top", [0.0, 0.01, 0.1, 0.5, 1.0])
def test_map_scores_are_the_maximum_or_the_mean_of_the_top_fraction(top: float) -> None:
    maps = np.random.default_rng(12).gamma(2.0, size=(3, 17, 13))
    count = max(1, int(np.ceil(top * 17 * 13)))
    expected = [np.sort(m.ravel())[::-1][:count].mean() for m in maps]
    np.testing.assert_allclose(spade.map_scores(torch.from_numpy(maps), top).numpy(), expected, rtol=1e-6)
    if top == 0.0:
        np.testing.assert_allclose(spade.map_scores(torch.from_numpy(maps), top).numpy(), maps.max(axis=(1, 2)), rtol=1e-6)


def test_map_scores_top_outside_zero_one_is_an_error() -> None:
    with pytest.raises(ValueError, match=r"top must be a fraction in \[0, 1\]"):
        spade.map_scores(torch.ones(1, 2, 2), 1.5)


def test_gaussian_smooth_filters_each_map_of_a_batch() -> None:
    values = np.random.default_rng(2).gamma(2.0, size=(3, 20, 9))
    got = spade.gaussian_smooth(torch.from_numpy(values), sigma=2.0)
    for b in range(3):
        np.testing.assert_allclose(got[b].numpy(), scipy.ndimage.gaussian_filter(values[b], sigma=2.0), rtol=1e-12)


def reference_gather(bank: np.ndarray, neighbours: np.ndarray) -> np.ndarray:
    """Explicit loops: image b's gallery is the pixels of its K neighbours, in neighbour order."""
    return np.stack([np.concatenate([bank[n] for n in row]) for row in neighbours]).astype(np.float32)


class RecordingBank:
    """A numpy bank that records which rows are read."""

    def __init__(self, bank: np.ndarray):
        self.bank, self.shape, self.reads = bank, bank.shape, []

    def __getitem__(self, rows: np.ndarray) -> np.ndarray:
        self.reads.append(rows.tolist())
        return self.bank[rows]


def test_gather_galleries_reads_only_the_retrieved_rows_of_a_memmap(tmp_path) -> None:
    bank = np.random.default_rng(4).normal(size=(9, 5, 3)).astype(np.float16)  # N x P x C
    np.save(tmp_path / "layer.npy", bank)
    mapped = np.load(tmp_path / "layer.npy", mmap_mode="r")
    neighbours = np.array([[7, 2], [2, 0], [5, 7]])  # B x K, shared and repeated rows
    got = spade.gather_galleries(mapped, neighbours)
    assert got.dtype == torch.float32 and got.shape == (3, 10, 3)
    np.testing.assert_array_equal(got.numpy(), reference_gather(bank, neighbours))
    recording = RecordingBank(mapped)
    spade.gather_galleries(recording, neighbours, dtype=torch.float16)
    assert recording.reads == [[0, 2, 5, 7]]  # each distinct row once, ascending


def test_gather_galleries_from_a_tensor_bank_keeps_device_and_converts_dtype() -> None:
    bank = torch.arange(6 * 4 * 2, dtype=torch.float16).reshape(6, 4, 2)
    neighbours = torch.tensor([[5, 1, 1], [0, 3, 5]])
    got = spade.gather_galleries(bank, neighbours, dtype=torch.float64, device="cpu")
    assert got.dtype == torch.float64 and got.device == bank.device and got.shape == (2, 12, 2)
    np.testing.assert_array_equal(got.numpy(), reference_gather(bank.numpy(), neighbours.numpy()))


@pytest.mark.parametrize("neighbours", [[[0, -1]], [[0, 6]], [0, 1]])
def test_gather_galleries_refuses_indices_outside_the_bank(neighbours) -> None:
    with pytest.raises(ValueError, match="B x K indices into the 6 normal images"):
        spade.gather_galleries(np.zeros((6, 2, 2), dtype=np.float16), np.array(neighbours))


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
    distances, rows = spade.local_nearest_matches(torch.from_numpy(queries), torch.from_numpy(galleries), grid, radius, kappa,
                                                  chunk_bytes=4 * 16 * 9 * images if calls.startswith("one") else 1 << 30,
                                                  precision=precision, tile=tile)
    assert distances.shape == rows.shape == (2, pixels, kappa) and distances.dtype == torch.float32
    for image in range(2):
        expected, expected_rows = reference_local_matches(queries[image], galleries[image], grid, radius, kappa)
        np.testing.assert_allclose(distances[image].numpy(), expected, rtol=1e-5)
        found = np.isfinite(expected)
        np.testing.assert_array_equal(rows[image].numpy()[found], expected_rows[found])


def test_layer_score_maps_with_a_radius_are_the_local_means_and_refuse_a_kappa_no_neighbourhood_holds() -> None:
    rng = np.random.default_rng(5)
    queries = rng.normal(size=(2, 4, 6, 5)).astype(np.float32)  # B x C x h x w
    galleries = rng.normal(size=(2, 3 * 30, 4)).astype(np.float32)
    got = spade.layer_score_maps(torch.from_numpy(queries), torch.from_numpy(galleries), kappa=2, radius=1)
    for image in range(2):
        expected = reference_local_matches(queries[image].reshape(4, -1).T, galleries[image], (6, 5), 1, 2)[0].mean(1)
        np.testing.assert_allclose(got[image].numpy().reshape(-1), expected, rtol=1e-5)
    with pytest.raises(ValueError, match="kappa=13 exceeds"):
        spade.layer_score_maps(torch.from_numpy(queries), torch.from_numpy(galleries), kappa=13, radius=1)
