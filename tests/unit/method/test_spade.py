"""spade.py against a brute-force float64 NumPy reference written here."""

import faiss
import numpy as np
import pytest
import scipy.ndimage
import torch
import torch.nn.functional as F

from spade_batch.method import pixel_search, spade
from tests.unit.method.test_pixel_search import reference_batch_knn_distance, reference_knn_distance, reference_local_matches


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


def test_centring_makes_float32_exact_on_offset_features() -> None:
    """Squared norms near 1e6 with a small spread: float32 ranking is noise until the offset is removed."""
    rng = np.random.default_rng(5)
    channels = 16
    offset = np.full(channels, 250.0)  # |offset|^2 = 1e6, like raw wide_resnet50_2 features
    queries = (offset + rng.normal(scale=0.01, size=(2, 20, channels))).astype(np.float32)
    galleries = (offset + rng.normal(scale=0.01, size=(2, 300, channels))).astype(np.float32)
    expected = reference_batch_knn_distance(queries, galleries, 1)
    raw = pixel_search.batch_nearest_sq_distances(torch.from_numpy(queries), torch.from_numpy(galleries))
    mean = torch.from_numpy(galleries.reshape(-1, channels).mean(axis=0))
    centred = pixel_search.batch_nearest_sq_distances(
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
