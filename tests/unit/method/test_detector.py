"""The in-process API on real images: extraction, fit + score, and independent float64 recomputations."""

from __future__ import annotations

import dataclasses
import json
import pathlib
import re
import threading

import faiss
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from scipy.ndimage import gaussian_filter

from spade_batch.config import Settings
from spade_batch.formats.calibration_matches import read_matches
from spade_batch.formats.card import CARD_NAME, KEYS_ADDED_LATER, ModelCard
from spade_batch.formats.datasets import make_demo_data, read_mvtec_category
from spade_batch.formats.feature_index import StoredFeatures
from spade_batch.formats.features import LayerShape
from spade_batch.formats.images import Preprocessing, decode_image, resize_for_model, resize_map
from spade_batch.formats.layout import ModelLayout, part_files
from spade_batch.formats.locks import LockHeldError
from spade_batch.formats.model import Centre, SpadeModel
from spade_batch.formats.model_build import GalleryWriter, build_model
from spade_batch.formats.versions import resolve, version_numbers
from spade_batch.method import calibrate, matching, pixel_search, spade
from spade_batch.method.addition import new_images
from spade_batch.method.alignment import measure_alignment, radius_cells
from spade_batch.method.calibration_search import ALIGNMENT_IMAGES
from spade_batch.method.detector import Extractor, Features, Scorer, add, fit, score
from spade_batch.method.extractor import normalise
from spade_batch.method.masks import mask_from_map
from spade_batch.method.recipe import new_card, split_fit_ids
from tests import tiny
from tests.unit.torchvision_reference import torchvision_input

SIZE = 64
SETTINGS = tiny.SETTINGS.replace(image_size=SIZE, k=2, kappa=1, sigma=2.0)
LITE0 = SETTINGS.replace(backbone="efficientnet_lite0", weights="imagenet")
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def load(path: str) -> np.ndarray:
    return decode_image(pathlib.Path(path).read_bytes(), path)


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> dict[str, list[np.ndarray]]:
    """Decoded synthetic PNGs of different sizes: 6 normal training images, 2 normal and 3 defective test images."""
    root = make_demo_data(str(tmp_path_factory.mktemp("demo")), n_train=6, n_test_good=2, n_test_per_defect=1, min_size=48, max_size=80)
    category = read_mvtec_category(root)
    return {
        "train": [load(s.path) for s in category.train],
        "test": [load(s.path) for s in category.test],
    }


def channels_last(layer: torch.Tensor) -> np.ndarray:
    """B x C x h x w -> B x (h * w) x C numpy."""
    batch, channels = layer.shape[:2]
    return layer.cpu().numpy().transpose(0, 2, 3, 1).reshape(batch, -1, channels)


def raw_features(extractor: Extractor, images: list[np.ndarray]) -> Features:
    return extractor.forward(np.stack([extractor.prepare(image) for image in images]))


def test_extractor_features_match_the_backbone_and_rows_round_to_float16(data):
    settings = SETTINGS.replace(image_size=72)  # not a multiple of 16: layer sizes are rounded up
    extractor = Extractor(settings)
    images = [data["train"][0], data["train"][1], data["test"][0], data["test"][1], data["test"][2]]
    assert [(s.name, s.height, s.width, s.channels) for s in extractor.layer_shapes] == [
        ("layer1", 18, 18, 64), ("layer2", 9, 9, 128), ("layer3", 5, 5, 256)
    ]
    prepared = np.stack([extractor.prepare(image) for image in images])
    assert prepared.dtype == np.uint8 and prepared.shape == (5, 72, 72, 3)
    for image, one in zip(images, prepared):
        np.testing.assert_array_equal(one, resize_for_model(image, extractor.preprocessing))

    features = extractor.forward(prepared)  # 5 images in backbone batches of 4 and 1
    with torch.inference_mode():
        pooled, pyramid = extractor.pyramid(torch.stack([torchvision_input(image, extractor.preprocessing) for image in images]))
    assert features.global_features.dtype == torch.float32 and features.global_features.shape == (5, 512)
    np.testing.assert_allclose(features.global_features.numpy(), pooled.numpy(), rtol=1e-5, atol=1e-6)
    rows = features.pixel_rows()
    for bank, layer, expected, shape in zip(rows, features.layers, pyramid, extractor.layer_shapes):
        assert layer.shape == (5, shape.channels, shape.height, shape.width)
        np.testing.assert_allclose(layer.numpy(), expected.numpy(), rtol=1e-5, atol=1e-5)
        assert bank.dtype == np.float16 and bank.shape == (5, shape.height * shape.width, shape.channels)
        np.testing.assert_array_equal(bank, channels_last(layer).astype(np.float16))


def test_normalise_is_exact_on_a_constant_image():
    batch = torch.empty((2, 8, 8, 3), dtype=torch.uint8)
    batch[:] = torch.tensor([10, 128, 250], dtype=torch.uint8)
    spec = Preprocessing(size=32)
    out = normalise(batch, spec)
    assert out.shape == (2, 3, 8, 8) and out.dtype == torch.float32
    expected = (np.array([10, 128, 250]) / 255 - np.array(spec.mean)) / np.array(spec.std)
    for c in range(3):
        np.testing.assert_allclose(out[:, c].numpy(), expected[c], atol=1e-5)


@pytest.mark.parametrize(
    "backbone, weights, first_conv, mean, std",
    [
        ("resnet18", "random", "conv1", IMAGENET_MEAN, IMAGENET_STD),
        ("efficientnet_lite0", "imagenet", "_conv_stem", (0.5, 0.5, 0.5), (0.5, 0.5, 0.5)),
    ],
)
def test_the_network_sees_the_backbones_own_input_convention(backbone, weights, first_conv, mean, std):
    """What enters the first convolution is (x / 255 - mean) / std of the image, per RGB channel."""
    if backbone == "efficientnet_lite0":
        pytest.importorskip("efficientnet_lite_pytorch")
    extractor = Extractor(SETTINGS.replace(backbone=backbone, weights=weights))
    # Every 0..255 value, already at the working size, so nothing is resampled.
    image = np.random.default_rng(0).integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8)
    seen = []
    conv = extractor.pyramid.extractor.get_submodule(first_conv)
    handle = conv.register_forward_pre_hook(lambda module, inputs: seen.append(inputs[0].clone()))
    try:
        extractor.forward(image[None])
    finally:
        handle.remove()
    expected = (image.astype(np.float64) / 255 - np.array(mean)) / np.array(std)
    assert len(seen) == 1
    np.testing.assert_allclose(seen[0][0].permute(1, 2, 0).numpy(), expected, rtol=0, atol=1e-5)


def test_a_model_keeps_the_convention_recorded_in_its_card(data, tmp_path):
    """A model fitted before backbones had their own conventions (efficientnet_lite0 on the ImageNet mean/std)
    loads and scores with the convention it was fitted with, not with the backbone's current one."""
    pytest.importorskip("efficientnet_lite_pytorch")
    imagenet = Preprocessing(SIZE, "full", IMAGENET_MEAN, IMAGENET_STD)
    extractor = Extractor(LITE0, preprocessing=imagenet)
    train, test = data["train"], data["test"]
    ids = [str(i) for i in range(len(train))]
    features = raw_features(extractor, train)
    rows = features.pixel_rows()
    centre = Centre.of_image(features.global_features[0].numpy(), [layer[0] for layer in rows])
    writer = GalleryWriter(str(tmp_path / "built"), ids, extractor.layer_shapes, extractor.global_dim, centre)
    writer.add(ids, features.global_features.numpy(), rows)
    build_model(writer, new_card(extractor, LITE0, len(ids), "old", []), LITE0).save(str(tmp_path / "model"))
    old = SpadeModel.load(str(tmp_path / "model"))
    assert old.card.preprocessing == Preprocessing(SIZE, "full", IMAGENET_MEAN, IMAGENET_STD)

    expected = Scorer(old, extractor).score(test)
    got = score(old, test)
    for a, b in zip(got, expected):
        assert a.score == pytest.approx(b.score, rel=1e-5)
        np.testing.assert_allclose(a.anomaly_map, b.anomaly_map, rtol=1e-4, atol=1e-6)

    # Fitted today, the model records the backbone's convention, and that gives other scores.
    new = fit(train, LITE0)
    assert new.card.preprocessing.mean == new.card.preprocessing.std == (0.5, 0.5, 0.5)
    unlike = [a.score / b.score for a, b in zip(score(new, test), expected)]
    assert min(abs(ratio - 1) for ratio in unlike) > 0.01


# ---------------------------------------------------------------- independent float64 references


def brute_force_layer_distances(query_layers: list[np.ndarray], gallery_layers: list[np.ndarray], kappa: int) -> list[np.ndarray]:
    """Per layer, h x w float64 mean squared distance of each query pixel to its kappa nearest gallery vectors.

    query_layers: per layer C x h x w; gallery_layers: per layer G x C (raw, uncentred: any common shift is fine).
    """
    layers = []
    for query, gallery in zip(query_layers, gallery_layers):
        channels, height, width = query.shape
        pixels = np.asarray(query, np.float64).reshape(channels, -1).T
        distances = ((pixels[:, None, :] - np.asarray(gallery, np.float64)[None]) ** 2).sum(-1)
        layers.append(np.sort(distances, axis=1)[:, :kappa].mean(1).reshape(height, width))
    return layers


def brute_force_map(
    query_layers: list[np.ndarray], gallery_layers: list[np.ndarray], kappa: int, sigma: float, scales: list[float] | None = None
) -> np.ndarray:
    """The SPADE map from the definition: float64 distances to every gallery vector (each layer divided by its
    scale, if any), upsampled, averaged, scipy smoothing."""
    maps = []
    distances = brute_force_layer_distances(query_layers, gallery_layers, kappa)
    for nearest, scale in zip(distances, scales or [1.0] * len(distances)):
        upsampled = F.interpolate(torch.from_numpy(nearest)[None, None], size=(SIZE, SIZE), mode="bilinear", align_corners=False)
        maps.append(upsampled[0, 0].numpy() / scale)
    return gaussian_filter(np.mean(maps, axis=0), sigma, mode="reflect", truncate=4.0)


@dataclasses.dataclass
class Reference:
    scores: np.ndarray  # M float64
    neighbours: np.ndarray  # M x K
    maps: np.ndarray  # M x SIZE x SIZE float64


def reference(
    train_global: np.ndarray, train_rows: list[np.ndarray], query_global: np.ndarray, query_layers: list[np.ndarray],
    k: int, kappa: int, sigma: float, scales: list[float] | None = None,
) -> Reference:
    """SPADE in float64 on raw features: kNN mean squared distance, then per-pixel nearest squared distance maps.

    train_global N x D, train_rows per layer N x P x C; query_global M x D, query_layers per layer M x C x h x w;
    scales: per layer, what its distances are divided by (None: 1).
    """
    squared = ((np.asarray(query_global, np.float64)[:, None] - np.asarray(train_global, np.float64)[None]) ** 2).sum(-1)
    neighbours = np.argsort(squared, axis=1, kind="stable")[:, :k]
    scores = np.take_along_axis(squared, neighbours, axis=1).mean(1)
    maps = np.stack([
        brute_force_map([layer[i] for layer in query_layers],
                        [bank[nearest].reshape(-1, bank.shape[-1]) for bank in train_rows], kappa, sigma, scales)
        for i, nearest in enumerate(neighbours)
    ])
    return Reference(scores, neighbours, maps)


def top_mean(anomaly_map: np.ndarray, top: float) -> float:
    """Mean of the ceil(top * pixels) highest values of a map (the maximum for top 0), by sorting."""
    return float(np.sort(anomaly_map.ravel())[::-1][: max(1, int(np.ceil(top * anomaly_map.size)))].mean())


def assert_matches(results, expected: Reference, score_rtol: float, map_rtol: float, image_score: str = "map") -> None:
    """Results against the reference: kNN score, neighbours, map, and the image score (the map's top 1% or the kNN score)."""
    assert len(results) == len(expected.scores)
    for result, want_score, want_neighbours, want_map in zip(results, expected.scores, expected.neighbours, expected.maps):
        np.testing.assert_array_equal(result.neighbours, want_neighbours)
        assert result.knn_score == pytest.approx(want_score, rel=score_rtol)
        want_image = want_score if image_score == "knn" else top_mean(want_map, SETTINGS.map_top)
        assert result.score == pytest.approx(want_image, rel=max(score_rtol, map_rtol))
        assert result.anomaly_map.shape == (SIZE, SIZE) and result.anomaly_map.dtype == np.float32
        np.testing.assert_allclose(result.anomaly_map, want_map, rtol=map_rtol, atol=map_rtol * want_map.max())


def test_scorer_equals_an_independent_recomputation(data):
    settings = SETTINGS.replace(k=3, kappa=2, calibration_fraction=0)
    model = fit(data["train"], settings)
    extractor = Extractor(settings)
    results = Scorer(model, extractor).score(data["test"])

    train, test = raw_features(extractor, data["train"]), raw_features(extractor, data["test"])
    # The gallery holds the raw pixel features rounded to float16 (as extracted and stored), then centred.
    train_rows = [channels_last(layer).astype(np.float16) for layer in train.layers]
    test_layers = [layer.numpy() for layer in test.layers]
    expected = reference(train.global_features.numpy(), train_rows, test.global_features.numpy(), test_layers, 3, 2, 2.0)
    assert_matches(results, expected, score_rtol=1e-4, map_rtol=1e-3)
    for i, result in enumerate(results):
        # And the library's own math on the same (centred) inputs gives the same map, to float32 rounding.
        queries = [torch.from_numpy(layer[i] - mean[:, None, None]) for layer, mean in zip(test_layers, model.centre.layer_means)]
        galleries = [torch.from_numpy(bank[result.neighbours].reshape(-1, bank.shape[-1]).astype(np.float32)) for bank in model.gallery]
        direct = spade.anomaly_maps([q[None] for q in queries], [g[None] for g in galleries], (SIZE, SIZE), 2, 2.0)[0]
        np.testing.assert_allclose(result.anomaly_map, direct.numpy(), rtol=1e-5, atol=1e-6 * expected.maps[i].max())


def test_batched_scoring_gives_the_same_results_as_one_image_per_call(data):
    settings = SETTINGS.replace(k=3, calibration_images="held_out", calibration_fraction=0)
    model = fit(data["train"], settings)
    extractor = Extractor(settings)
    one = Scorer(model, extractor, images_per_call=1).score(data["test"])
    three = Scorer(model, extractor, images_per_call=3).score(data["test"])  # 5 images: calls of 3 and 2
    assert len(one) == len(three) == len(data["test"])
    for a, b in zip(one, three):
        assert a.score == b.score
        np.testing.assert_array_equal(a.neighbours, b.neighbours)
        np.testing.assert_allclose(a.anomaly_map, b.anomaly_map, rtol=1e-5, atol=1e-6 * a.anomaly_map.max())


# ---------------------------------------------------------------- centring, on synthetic features

SYNTHETIC = [LayerShape("layer1", 4, 4, 8), LayerShape("layer2", 2, 2, 16)]
GLOBAL_DIM = 64


def synthetic(rng: np.random.Generator, count: int, offset: float, scale: float) -> Features:
    """count images' raw features: offset + scale * N(0, 1) per component (offset * sqrt(dim) ~ the norm)."""
    norm = offset * np.sqrt(GLOBAL_DIM)
    global_features = norm / np.sqrt(GLOBAL_DIM) + scale * rng.standard_normal((count, GLOBAL_DIM))
    layers = [
        norm / np.sqrt(s.channels) + scale * rng.standard_normal((count, s.channels, s.height, s.width)) for s in SYNTHETIC
    ]
    return Features(torch.from_numpy(global_features.astype(np.float32)), [torch.from_numpy(layer.astype(np.float32)) for layer in layers])


def synthetic_card(settings: Settings, count: int, **changes) -> ModelCard:
    card = ModelCard(
        settings=settings.method, preprocessing=Preprocessing(SIZE), weights_sha256="sha256:synthetic",
        layers=list(SYNTHETIC), global_dim=GLOBAL_DIM, train_count=count, train_manifest_sha256="synthetic",
    )
    return dataclasses.replace(card, **changes)


def synthetic_model(folder, train: Features, settings: Settings, centre: Centre | None = None) -> SpadeModel:
    ids = [f"{i:03d}" for i in range(len(train.global_features))]
    rows = [channels_last(layer) for layer in train.layers]  # float32: the writer centres before rounding to float16
    centre = centre or Centre.of_image(train.global_features[0].numpy(), [layer[0] for layer in rows])
    writer = GalleryWriter(str(folder), ids, SYNTHETIC, GLOBAL_DIM, centre)
    writer.add(ids, train.global_features.numpy(), rows)
    return build_model(writer, synthetic_card(settings, len(ids)), settings)


@pytest.mark.parametrize("images_per_call", [1, 5])
@pytest.mark.parametrize("norm", [10.0, 1000.0])
def test_a_centred_model_scores_the_raw_features_exactly(tmp_path, norm, images_per_call):
    """Squared feature norms near 1e2 and near 1e6 (raw wide_resnet50_2 features are near the latter): the
    centred model gives the float64 brute force on the raw features, to float32 / float16-of-centred precision."""
    rng = np.random.default_rng(int(norm))
    settings = SETTINGS.replace(k=3, kappa=2)
    train, test = synthetic(rng, 30, norm, 0.1), synthetic(rng, 24, norm, 0.1)
    train_rows = [channels_last(layer) for layer in train.layers]
    test_layers = [layer.numpy() for layer in test.layers]
    expected = reference(train.global_features.numpy(), train_rows, test.global_features.numpy(), test_layers, 3, 2, 2.0)

    model = synthetic_model(tmp_path / "centred", train, settings)
    results = Scorer(model, Extractor(settings), images_per_call=images_per_call).score_features(test)
    assert_matches(results, expected, score_rtol=1e-4, map_rtol=2e-3)

    if norm == 1000.0:
        # The data is hard: the same distances by |q|^2 - 2 q.g + |g|^2 in float32, uncentred, rank neighbours wrongly,
        # and an uncentred float16 gallery loses the pixel features altogether. So the match above is not luck.
        q, g = train.global_features.numpy(), test.global_features.numpy()
        expanded = (g**2).sum(1)[:, None] - 2 * g @ q.T + (q**2).sum(1)[None]
        assert expanded.dtype == np.float32
        assert (np.sort(np.argsort(expanded, axis=1)[:, :3], axis=1) != np.sort(expected.neighbours, axis=1)).any()
        zero = Centre.zero(GLOBAL_DIM, SYNTHETIC)
        uncentred = Scorer(synthetic_model(tmp_path / "uncentred", train, settings, zero), Extractor(settings)).score_features(test)
        error = max(np.abs(r.anomaly_map - m).max() / m.max() for r, m in zip(uncentred, expected.maps))
        assert error > 0.1


def test_the_distance_block_is_the_devices_unless_chunk_mib_is_set_and_scores_do_not_depend_on_it(tmp_path):
    """Unset chunk_mib: 16 MiB blocks on a CPU (256 MiB on a GPU); set, its MiB, with the same scores and maps."""
    rng = np.random.default_rng(5)
    settings = SETTINGS.replace(k=3, kappa=2)
    train, test = synthetic(rng, 12, 1.0, 1.0), synthetic(rng, 4, 1.0, 1.0)
    model = synthetic_model(tmp_path / "model", train, settings)
    default = Scorer(model, Extractor(settings), settings.chunk_bytes)
    tiny = Scorer(model, Extractor(settings), settings.replace(chunk_mib=1).chunk_bytes)
    assert (settings.chunk_mib, default.chunk_bytes, tiny.chunk_bytes) == (None, 16 * 2**20, 2**20)
    assert pixel_search.chunk_bytes_for(torch.device("cuda")) == 256 * 2**20
    for got, expected in zip(tiny.score_features(test), default.score_features(test)):
        assert got.score == pytest.approx(expected.score, rel=1e-6)
        np.testing.assert_allclose(got.anomaly_map, expected.anomaly_map, rtol=1e-5)


def test_a_schema_1_uncentred_model_still_loads_and_scores(tmp_path):
    """Schema 1 models stored raw features (no centre.npz): they load with a zero centre and score as before."""
    rng = np.random.default_rng(11)
    settings = SETTINGS.replace(k=3, kappa=1)
    train, test = synthetic(rng, 12, 1.0, 1.0), synthetic(rng, 4, 1.0, 1.0)
    ids = [f"{i:03d}" for i in range(12)]
    stored = [channels_last(layer).astype(np.float16) for layer in train.layers]
    # The schema 1 layout, written by hand: raw float16 pyramid, flat index over the raw global features.
    (tmp_path / "pyramid").mkdir()
    for shape, bank in zip(SYNTHETIC, stored):
        np.save(tmp_path / "pyramid" / f"{shape.name}.npy", bank)
    (tmp_path / "train_ids.json").write_text(json.dumps(ids))
    index = faiss.IndexFlatL2(GLOBAL_DIM)
    index.add(train.global_features.numpy())
    faiss.write_index(index, str(tmp_path / "global.faiss"))
    card = synthetic_card(settings, 12, schema_version=1, package_version="0.1.0").to_dict()
    del card["normalisation"]
    for key in KEYS_ADDED_LATER:
        del card["settings"][key]
    (tmp_path / CARD_NAME).write_text(json.dumps(card))

    model = SpadeModel.load(str(tmp_path))
    assert model.card.schema_version == 1 and model.train_ids == ids
    assert not model.centre.global_mean.any() and not any(mean.any() for mean in model.centre.layer_means)
    results = Scorer(model, Extractor(settings)).score_features(test)
    expected = reference(train.global_features.numpy(), stored, test.global_features.numpy(), [layer.numpy() for layer in test.layers], 3, 1, 2.0)
    assert_matches(results, expected, score_rtol=1e-5, map_rtol=1e-4, image_score="knn")  # what models of then were fitted with


# ---------------------------------------------------------------- fit


def test_split_fit_ids_is_the_hash_hold_out_and_stable():
    settings = SETTINGS.replace(calibration_images="held_out", calibration_fraction=0.3, seed=5)
    ids = [f"good/{i:03d}.png" for i in range(40)]
    gallery, held = split_fit_ids(list(reversed(ids)), settings)
    assert gallery == sorted(gallery) and held == sorted(held) and sorted(gallery + held) == ids
    assert held == [i for i in ids if calibrate.is_held_out(i, 0.3, 5)] and 0 < len(held) < 40
    # Adding images never moves an existing image between gallery and hold-out.
    more_gallery, more_held = split_fit_ids(ids + [f"new/{i}.png" for i in range(20)], settings)
    assert set(gallery) <= set(more_gallery) and set(held) <= set(more_held)
    assert split_fit_ids(ids, settings.replace(calibration_fraction=0)) == (ids, [])


SEARCH_COMBINED = {"match_radius": 16, "feature_pool": 3, "layers": "2,3"}


@pytest.mark.parametrize("options", [{}, SEARCH_COMBINED])
def test_leave_one_out_calibration_scores_each_image_as_a_fit_without_it_would(data, tmp_path, options):
    """Every image stays in the gallery; each calibration score is the score a model fitted on the other
    images gives the same stored features (brute force: one refit per image)."""
    settings = SETTINGS.replace(calibration_images="leave_one_out", calibration_sample=0, image_fpr=0.2, pixel_rule="quantile", pixel_quantile=0.9,
                                image_score="map", map_top=0.05, **options)
    images = data["train"] + data["test"][:2]  # 8 normal images
    ids = [f"img-{i}" for i in range(len(images))]
    model = fit(images, settings, ids=ids, folder=str(tmp_path / "loo"))
    assert model.train_ids == sorted(ids)
    assert model.card.calibration.count == len(ids) and model.card.calibration.images == "leave_one_out"

    stored = StoredFeatures.index(part_files(ModelLayout(str(tmp_path / "loo")).features, None))
    scorer_settings = settings.replace(calibration_images="held_out", calibration_fraction=0)
    expected, samples = [], []
    for image_id in ids:
        others = [i for i in ids if i != image_id]
        without = fit([images[ids.index(i)] for i in others], scorer_settings, ids=others)
        block = stored.block(stored.parts[image_id], [image_id])
        result = Scorer(without, Extractor(settings)).score_features(Features.of_table(block))[0]
        expected.append(result.score)
        samples.append(calibrate.pixel_sample(result.anomaly_map))
    assert model.card.calibration.image_scores == pytest.approx(sorted(expected), rel=1e-3)
    assert model.card.thresholds.image == pytest.approx(calibrate.image_threshold(np.array(expected), 0.2), rel=1e-3)
    assert model.card.thresholds.pixel == pytest.approx(calibrate.pixel_threshold(samples, 0.9), rel=1e-3)


def test_leave_one_out_calibrates_on_a_deterministic_sample(data):
    ids = [f"img-{i}" for i in range(40)]
    settings = SETTINGS.replace(calibration_images="leave_one_out", calibration_sample=10)
    gallery, calibration = split_fit_ids(ids, settings)
    assert gallery == sorted(ids) and len(calibration) == 10 and set(calibration) <= set(ids)
    assert split_fit_ids(list(reversed(ids)), settings) == (gallery, calibration)  # the order given does not matter
    ranked = sorted(ids, key=lambda i: calibrate.id_hash(i, settings.seed))
    assert calibration == sorted(ranked[:10])
    assert split_fit_ids(ids, settings.replace(calibration_sample=0))[1] == sorted(ids)


def test_fit_holds_out_images_by_id_and_calibrates_on_them(data, tmp_path):
    settings = SETTINGS.replace(image_fpr=0.5, pixel_quantile=0.9, calibration_images="held_out", pixel_rule="quantile", calibration_fraction=0.4)
    images = data["train"] + data["test"][:2]  # 8 normal images
    ids = [f"img-{i}" for i in range(len(images))]
    held = [i for i in ids if calibrate.is_held_out(i, 0.4, settings.seed)]
    assert 0 < len(held) < len(ids) - settings.k  # the ids are chosen so that both sides are used
    model = fit(images, settings, ids=ids, folder=str(tmp_path / "gallery"))
    assert model.folder == str(tmp_path / "gallery") and (tmp_path / "gallery" / "pyramid" / "layer1.npy").exists()
    assert model.train_ids == sorted(set(ids) - set(held))
    assert model.card.train_count == len(ids) - len(held) and model.card.settings == settings.method
    assert model.card.calibration.count == len(held)

    # The thresholds are the quantiles of the held-out images' own scores. Calibration scores their
    # stored float16 features (as the pipeline does, without a second extraction); score() extracts
    # float32 afresh, hence the float16 tolerance.
    held_results = score(model, [images[ids.index(i)] for i in held])
    image_threshold = np.quantile([r.score for r in held_results], 1 - 0.5, method="higher")
    pixel_threshold = np.quantile(np.concatenate([r.anomaly_map.ravel() for r in held_results]), 0.9, method="higher")
    assert model.card.thresholds.image == pytest.approx(image_threshold, rel=1e-3)
    assert model.card.thresholds.pixel == pytest.approx(pixel_threshold, rel=1e-3)

    results = score(model, data["test"])
    assert len(results) == len(data["test"])
    for result in results:
        assert np.isfinite(result.score) and result.score > 0
        assert result.anomaly_map.shape == (SIZE, SIZE) and np.isfinite(result.anomaly_map).all()
        assert result.neighbours.shape == (2,) and set(result.neighbours) <= set(range(model.card.train_count))
    assert score(model, []) == []

    # Saved and loaded, the model scores the same.
    model.save(str(tmp_path / "model"))
    for a, b in zip(score(SpadeModel.load(str(tmp_path / "model")), data["test"]), results):
        assert a.score == b.score
        np.testing.assert_array_equal(a.anomaly_map, b.anomaly_map)


def test_options_beyond_the_paper_equal_a_brute_force_recomputation(data):
    """layer_normalise + image_score combined (map score: mean of the top 5% pixels), fitted in process, against
    float64 brute force: layer scales and score statistics from the held-out images, thresholds, test scores and maps."""
    settings = SETTINGS.replace(image_score="combined", map_top=0.05, layer_normalise=True, calibration_images="held_out", pixel_rule="quantile", calibration_fraction=0.4, image_fpr=0.5)
    images = data["train"] + data["test"][:2]  # 8 normal images
    ids = [f"img-{i}" for i in range(len(images))]
    model = fit(images, settings, ids=ids)
    assert model.card.settings == settings.method

    extractor = Extractor(settings)
    features = raw_features(extractor, images)
    gallery = [ids.index(i) for i in model.train_ids]
    held = [i for i, image_id in enumerate(ids) if image_id not in model.train_ids]
    train_global = features.global_features.numpy()[gallery]
    train_rows = [channels_last(layer).astype(np.float16)[gallery] for layer in features.layers]
    layers = [layer.numpy() for layer in features.layers]

    def knn_and_distances(query: list[int]) -> tuple[Reference, list[list[np.ndarray]]]:
        plain = reference(train_global, train_rows, features.global_features.numpy()[query], [layer[query] for layer in layers], 2, 1, 2.0)
        distances = [brute_force_layer_distances([layer[i] for layer in layers],
                                                 [bank[nearest].reshape(-1, bank.shape[-1]) for bank in train_rows], 1)
                     for i, nearest in zip(query, plain.neighbours)]
        return plain, distances

    plain, held_distances = knn_and_distances(held)
    scales = [np.std(np.concatenate([image[layer].ravel() for image in held_distances])) for layer in range(len(layers))]
    learnt = model.card.normalisation
    np.testing.assert_allclose(learnt.layer_scales, scales, rtol=1e-3)
    assert max(scales) / min(scales) > 2  # the layers' scales differ, so the normalisation matters here

    def map_scores(maps: np.ndarray) -> np.ndarray:
        return np.array([top_mean(m, 0.05) for m in maps])

    held_maps = reference(train_global, train_rows, features.global_features.numpy()[held], [layer[held] for layer in layers], 2, 1, 2.0, scales).maps
    held_map_scores = map_scores(held_maps)
    np.testing.assert_allclose(learnt.knn, (plain.scores.mean(), plain.scores.std()), rtol=1e-3)
    np.testing.assert_allclose(learnt.map, (held_map_scores.mean(), held_map_scores.std()), rtol=1e-3)
    combined = ((plain.scores - learnt.knn[0]) / learnt.knn[1] + (held_map_scores - learnt.map[0]) / learnt.map[1]) / 2
    assert model.card.thresholds.image == pytest.approx(np.quantile(combined, 0.5, method="higher"), rel=1e-3, abs=1e-3)

    defective = data["test"][2:]  # the first two are among the fitted images
    test_features = raw_features(extractor, defective)
    expected = reference(train_global, train_rows, test_features.global_features.numpy(), [layer.numpy() for layer in test_features.layers],
                         2, 1, 2.0, scales)
    results = score(model, defective)
    test_map_scores = map_scores(expected.maps)
    want = ((expected.scores - learnt.knn[0]) / learnt.knn[1] + (test_map_scores - learnt.map[0]) / learnt.map[1]) / 2
    for result, knn_score, map_score, combined_score, want_map in zip(results, expected.scores, test_map_scores, want, expected.maps):
        assert result.knn_score == pytest.approx(knn_score, rel=1e-4)
        assert result.map_score == pytest.approx(map_score, rel=1e-3)
        assert result.score == pytest.approx(combined_score, rel=1e-3, abs=1e-3)
        np.testing.assert_allclose(result.anomaly_map, want_map, rtol=1e-3, atol=1e-3 * want_map.max())


def test_options_that_learn_scales_refuse_a_fit_that_holds_out_no_image(data):
    settings = SETTINGS.replace(layer_normalise=True, calibration_images="held_out", calibration_fraction=0.01)
    ids = [f"img-{i}" for i in range(len(data["train"]))]
    assert not any(calibrate.is_held_out(i, 0.01) for i in ids)
    with pytest.raises(ValueError, match="layer_normalise: scales are learnt from calibration images.*held out none of the 6 training images"):
        fit(data["train"], settings, ids=ids)


@pytest.mark.parametrize("mode", ["knn", "map"])
def test_image_score_knn_or_map_alone(data, mode):
    """knn is the paper's score; map is the map's highest pixel (map_top 0): the same fit gives both."""
    model = fit(data["train"], SETTINGS.replace(image_score=mode, map_top=0.0, calibration_fraction=0))
    for result in score(model, data["test"]):
        assert result.score == (result.knn_score if mode == "knn" else result.map_score)
        assert result.map_score == pytest.approx(float(result.anomaly_map.max()), rel=1e-6)


def test_a_card_from_before_the_options_scores_as_the_paper(data, tmp_path):
    """A card without image_score, map_top, layer_normalise or normalisation loads, scores with the kNN score
    and plain layer average, and accepts requests that name the paper's values."""
    fitted = fit(data["train"], SETTINGS.replace(image_score="knn", map_top=0.0, calibration_fraction=0))  # as models were then
    fitted.save(str(tmp_path))
    card = json.loads((tmp_path / CARD_NAME).read_text())
    for key in KEYS_ADDED_LATER:
        del card["settings"][key]
    del card["normalisation"]
    (tmp_path / CARD_NAME).write_text(json.dumps(card))
    old = SpadeModel.load(str(tmp_path))
    old.card.check_compatible(Settings(image_score="knn", layer_normalise=False), frozenset({"image_score", "layer_normalise"}))
    for a, b in zip(score(old, data["test"]), score(fitted, data["test"])):
        assert a.score == b.score == a.knn_score
        np.testing.assert_array_equal(a.anomaly_map, b.anomaly_map)


def test_a_card_from_before_the_decision_rules_decides_as_it_did(data, tmp_path):
    """Thresholds {image, pixel} and a calibration summary without the mode or pixel rule: the model holds out,
    thresholds pixels by quantile, keeps every flagged pixel and does not gate masks, as models then did."""
    fitted = fit(data["train"] + data["test"][:2], SETTINGS.replace(calibration_images="held_out", pixel_rule="quantile", calibration_fraction=0.4))
    fitted.save(str(tmp_path))
    card = json.loads((tmp_path / CARD_NAME).read_text())
    card["thresholds"] = {"image": card["thresholds"]["image"], "pixel": card["thresholds"]["pixel"]}
    for key in ("images", "pixel_rule"):
        del card["calibration"][key]
    (tmp_path / CARD_NAME).write_text(json.dumps(card))
    old = SpadeModel.load(str(tmp_path))
    rule = old.card.thresholds
    assert (rule.min_region, rule.gate_masks, old.card.calibration.images, old.card.calibration.pixel_rule) == (0, False, "held_out", "quantile")
    result = score(old, data["test"][:1])[0]
    height, width = data["test"][0].shape[:2]
    expected = resize_map(result.anomaly_map, height, width) > rule.pixel
    np.testing.assert_array_equal(mask_from_map(result.anomaly_map, height, width, rule, image_score=-1.0) > 0, expected)


def test_k_above_the_usable_training_images_is_a_clear_error(data):
    settings = SETTINGS.replace(k=3, calibration_images="held_out", calibration_fraction=0)
    with pytest.raises(ValueError, match=r"k=3 .* only 2 usable training images \(1 failed\); lower k or add normal images"):
        new_card(Extractor(settings), settings, 2, "sha", [{"id": "x", "error": "bad"}])
    with pytest.raises(ValueError, match=r"k=3 .* only 2 usable training images \(0 failed\)"):
        fit(data["train"][:2], settings)


def test_score_takes_the_model_keys_from_the_model(data):
    model = fit(data["train"], SETTINGS)
    expected = score(model, data["test"][:2])
    # Runtime settings with the default (wide_resnet50_2) backbone: the model's resnet18 is still used.
    got = score(model, data["test"][:2], Settings(device="cpu", batch_size=1))
    for a, b in zip(got, expected):
        assert a.score == pytest.approx(b.score, rel=1e-5)
        np.testing.assert_allclose(a.anomaly_map, b.anomaly_map, rtol=1e-4, atol=1e-6)


def test_a_training_image_scores_near_zero(data):
    """Its own features are in the gallery: kNN distance 0 at image and pixel level (up to float16 storage)."""
    model = fit(data["train"], SETTINGS.replace(k=1, calibration_fraction=0))
    own, other = score(model, [data["train"][3], data["test"][0]])
    assert own.neighbours.tolist() == [3]
    assert own.knn_score < 1e-6 * other.knn_score
    relative = own.anomaly_map.max() / np.median(other.anomaly_map)
    print(f"training image: image score {own.score:.3g} vs {other.score:.3g}; max pixel score / other's median {relative:.2e}")
    assert relative < 1e-4


# ---------------------------------------------------------------- add: a model that grows


TRAIN_IDS = [f"{i:03d}.png" for i in range(6)]
ADDED = ["002.png", "004.png"]  # with fraction 0.06 one is held out (002) and one joins the gallery (004)


@pytest.mark.parametrize(("calibration_images", "options"), [("held_out", {}), ("leave_one_out", {}), ("leave_one_out", SEARCH_COMBINED)])
def test_fit_then_add_is_one_fit_of_all_the_images_and_extracts_only_the_added(data, tmp_path, monkeypatch, calibration_images, options):
    settings = SETTINGS.replace(calibration_images=calibration_images, calibration_fraction=0.06, calibration_sample=0,
                                image_fpr=0.5, pixel_quantile=0.9, **options)
    held = [i for i in TRAIN_IDS if calibrate.is_held_out(i, 0.06, settings.seed)]
    assert set(held) & set(ADDED) and set(held) - set(ADDED) and len(set(TRAIN_IDS) - set(held) - set(ADDED)) >= settings.k
    first = [i for i in TRAIN_IDS if i not in ADDED]
    image = dict(zip(TRAIN_IDS, data["train"]))
    fit([image[i] for i in first], settings, ids=first, folder=str(tmp_path / "model"))
    extracted, searched = [], []
    forward, match = Extractor.forward, matching.match_pixels
    monkeypatch.setattr(Extractor, "forward", lambda self, prepared: extracted.append(len(prepared)) or forward(self, prepared))
    monkeypatch.setattr(matching, "match_pixels", lambda *args, **kwargs: searched.append(args[4] is None) or match(*args, **kwargs))

    grown = add(str(tmp_path / "model"), [image[i] for i in ADDED], ADDED, SETTINGS.replace(calibration_fraction=0.5))

    assert sum(extracted) == len(ADDED), "adding m images extracts m"
    calibrated = [set(read_matches((folder / ModelLayout.calibration_matches).read_bytes(), grown.card.layer_shapes))
                  for folder in (tmp_path / "model", tmp_path / "model" / "versions" / "2")]
    assert searched.count(True) == len(calibrated[1] - calibrated[0]), "only images new to calibration are searched from nothing"
    assert len(searched) <= len(calibrated[1]) and calibrated[0] & calibrated[1]
    whole = fit(data["train"], settings, ids=TRAIN_IDS)
    assert grown.folder == str(tmp_path / "model" / "versions" / "2") and json.loads((tmp_path / "model" / "versions" / "2" / CARD_NAME).read_text())
    assert grown.train_ids == whole.train_ids and grown.card.calibration.count == whole.card.calibration.count >= 2
    assert grown.card.calibration_settings == whole.card.calibration_settings == settings.calibration  # the model's, not the request's
    assert grown.card.thresholds == whole.card.thresholds  # the same float16 features, the same recipe
    assert (grown.card.version.number, grown.card.version.parent, grown.card.version.images_added) == (2, 1, 2)
    for a, b in zip(score(grown, data["test"]), score(whole, data["test"])):
        assert a.neighbours.tolist() == b.neighbours.tolist() and a.score == pytest.approx(b.score, rel=1e-6)
        np.testing.assert_allclose(a.anomaly_map, b.anomaly_map, rtol=1e-6)

    extracted.clear()
    again = add(str(tmp_path / "model"), [image[i] for i in ADDED], ADDED)
    assert extracted == [] and again.folder == grown.folder, "the same add again extracts nothing and publishes nothing"


@pytest.mark.parametrize("damage", ["missing", "other bytes"])
def test_add_to_a_model_whose_calibration_matches_are_missing_or_damaged_searches_every_image(data, tmp_path, damage, caplog):
    """Models fitted before the matches were kept have none; a damaged file is named and not trusted: either way
    the grown model is still one fit of all the images."""
    settings = SETTINGS.replace(calibration_images="leave_one_out", calibration_sample=0, image_fpr=0.5, pixel_quantile=0.9)
    first = [i for i in TRAIN_IDS if i not in ADDED]
    image = dict(zip(TRAIN_IDS, data["train"]))
    fit([image[i] for i in first], settings, ids=first, folder=str(tmp_path / "model"))
    stored = tmp_path / "model" / ModelLayout.calibration_matches
    card = json.loads((tmp_path / "model" / CARD_NAME).read_text())
    if damage == "missing":  # as a card from before the matches were kept
        stored.unlink()
        del card["files"][ModelLayout.calibration_matches]
        (tmp_path / "model" / CARD_NAME).write_text(json.dumps(card))
    else:
        stored.write_bytes(stored.read_bytes()[:-1] + b"x")

    with caplog.at_level("INFO", logger="spade_batch.method.addition"):
        grown = add(str(tmp_path / "model"), [image[i] for i in ADDED], ADDED)

    expected = "keeps no calibration matches" if damage == "missing" else f"{stored} cannot be used .its SHA-256 is not the one the card records."
    assert re.search(expected, caplog.text)
    assert grown.card.thresholds == fit(data["train"], settings, ids=TRAIN_IDS).card.thresholds


def test_add_refuses_an_id_the_model_holds_with_other_pixels(data, tmp_path):
    settings = SETTINGS.replace(calibration_fraction=0)
    fit(data["train"][:3], settings, ids=TRAIN_IDS[:3], folder=str(tmp_path / "model"))
    with pytest.raises(ValueError, match="1 images have the id of an image the model holds but other content .first: 001.png."):
        add(str(tmp_path / "model"), [data["train"][3], data["train"][4]], ["001.png", "new.png"])
    assert not (tmp_path / "model" / "versions" / "2" / CARD_NAME).exists()
    card = json.loads((tmp_path / "model" / CARD_NAME).read_text())
    (tmp_path / "model" / CARD_NAME).write_text(json.dumps({**card, "weights_sha256": "sha256:" + "0" * 64}))  # fitted with other weights
    with pytest.raises(ValueError, match="the backbone weights or preprocessing found now differ from those of model"):
        add(str(tmp_path / "model"), [data["train"][4]], ["new.png"])


def test_two_adds_at_once_to_one_model_publish_one_version_and_refuse_the_other_with_the_lock_message(data, tmp_path):
    """Two threads start an add to one model at the same moment: one publishes version 2, the other is refused
    naming the lock (neither writes into the other's version); once the first is done, the refused one goes through."""
    folder = str(tmp_path / "model")
    fit(data["train"][:3], SETTINGS.replace(calibration_fraction=0), ids=TRAIN_IDS[:3], folder=folder)
    start, outcomes = threading.Barrier(2), {}

    def add_one(image_id: str, image: np.ndarray) -> None:
        start.wait()
        try:
            outcomes[image_id] = add(folder, [image], [image_id])
        except LockHeldError as error:
            outcomes[image_id] = error

    threads = [threading.Thread(target=add_one, args=(TRAIN_IDS[i], data["train"][i])) for i in (3, 4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()

    published = [image_id for image_id, outcome in outcomes.items() if isinstance(outcome, SpadeModel)]
    refused = [image_id for image_id, outcome in outcomes.items() if isinstance(outcome, LockHeldError)]
    assert len(published) == len(refused) == 1, outcomes
    assert "is held by add to" in str(outcomes[refused[0]]) and "(in process)" in str(outcomes[refused[0]])
    current = SpadeModel.load(resolve(folder).uri)
    assert version_numbers(folder) == [1, 2] and current.train_ids == [*TRAIN_IDS[:3], *published]
    again = add(folder, [data["train"][TRAIN_IDS.index(refused[0])]], refused)
    assert again.card.version.number == 3 and set(again.train_ids) == set(TRAIN_IDS[:5])


def test_new_images_are_those_not_held_and_an_unknown_hash_is_taken_as_the_same():
    held = {"a.png": "1", "b.png": None}
    assert new_images(held, {"a.png": "1", "b.png": "9", "c.png": None, "0.png": "7"}) == ["0.png", "c.png"]
    with pytest.raises(ValueError, match=r"first: a.png\)"):
        new_images(held, {"a.png": "2"})


# ---------------------------------------------------------------- search options: match_radius, feature_pool, layers


def numpy_pool(layer: np.ndarray, size: int) -> np.ndarray:
    """C x h x w -> the mean over each cell's size x size neighbourhood cells inside the map, by explicit loops (float64)."""
    channels, height, width = layer.shape
    pooled, half = np.empty(layer.shape), size // 2
    for y in range(height):
        for x in range(width):
            pooled[:, y, x] = layer[:, max(0, y - half) : y + half + 1, max(0, x - half) : x + half + 1].astype(np.float64).mean(axis=(1, 2))
    return pooled


def local_layer_distances(query: np.ndarray, gallery: np.ndarray, radius: int | None, kappa: int) -> np.ndarray:
    """h x w float64: each cell's mean squared distance to its kappa nearest among the K images' cells (gallery K x h*w x C)
    within `radius` cells of it (Chebyshev), or among all of them (radius None)."""
    channels, height, width = query.shape
    pixels = np.asarray(query, np.float64).reshape(channels, -1).T
    distances = ((pixels[:, None, :] - np.asarray(gallery, np.float64).reshape(-1, channels)[None]) ** 2).sum(-1)
    if radius is not None:
        y, x = np.divmod(np.arange(height * width), width)
        near = np.maximum(np.abs(y[:, None] - y[None]), np.abs(x[:, None] - x[None])) <= radius
        distances[~np.tile(near, (1, len(gallery)))] = np.inf
    return np.sort(distances, axis=1)[:, :kappa].mean(1).reshape(height, width)


SEARCH_OPTIONS = [
    {"match_radius": 16},  # 4, 2 and 1 cells on the 16, 8 and 4 cell layers of a 64 px image
    {"feature_pool": 3},
    {"layers": "2,3"},
    {"match_radius": 8, "feature_pool": 3, "layers": "1,3", "kappa": 3},
]


@pytest.mark.parametrize("options", SEARCH_OPTIONS)
def test_search_options_equal_a_numpy_recomputation_and_the_gallery_holds_only_the_layers_used(data, options):
    settings = SETTINGS.replace(calibration_images="held_out", calibration_fraction=0, **options)
    model = fit(data["train"], settings)
    levels, pool, kappa = settings.method.levels, settings.feature_pool, settings.kappa
    everything = Extractor(SETTINGS)  # every level, unpooled: the backbone's own maps
    assert [s.name for s in model.card.layer_shapes] == [everything.layer_shapes[level].name for level in levels]
    assert len(model.gallery) == len(levels) and model.card.settings == settings.method

    def pixel_features(images: list[np.ndarray]) -> list[np.ndarray]:
        """Per level in use, M x C x h x w float64: the raw maps pooled in numpy."""
        raw = raw_features(everything, images).layers
        return [np.stack([numpy_pool(image, pool) if pool > 1 else image.astype(np.float64) for image in raw[level].numpy()]) for level in levels]

    train = [layer.transpose(0, 2, 3, 1).reshape(len(layer), -1, layer.shape[1]).astype(np.float16) for layer in pixel_features(data["train"])]
    for bank, stored, mean in zip(train, model.gallery, model.centre.layer_means):  # the pooled features of the levels in use, centred
        np.testing.assert_allclose(np.asarray(stored, np.float32) + mean, bank.astype(np.float32), rtol=1e-2, atol=1e-2 * np.abs(bank).max())
    test = data["test"][2:]
    queries = pixel_features(test)
    radii = [radius_cells(settings.match_radius, s.height, SIZE) for s in model.card.layer_shapes]
    for image, result in enumerate(score(model, test)):
        maps = []
        for query, bank, radius in zip(queries, train, radii):
            nearest = local_layer_distances(query[image], bank[result.neighbours], radius, kappa)
            maps.append(F.interpolate(torch.from_numpy(nearest)[None, None], size=(SIZE, SIZE), mode="bilinear", align_corners=False)[0, 0].numpy())
        want = gaussian_filter(np.mean(maps, axis=0), settings.sigma, mode="reflect", truncate=4.0)
        np.testing.assert_allclose(result.anomaly_map, want, rtol=1e-3, atol=1e-3 * want.max())


def test_fit_measures_alignment_from_the_calibration_matches_it_keeps_unless_they_are_restricted(data, tmp_path):
    settings = SETTINGS.replace(calibration_images="leave_one_out", calibration_sample=0)
    model = fit(data["train"], settings, folder=str(tmp_path / "full"))
    stored = read_matches((tmp_path / "full" / ModelLayout.calibration_matches).read_bytes(), model.card.layer_shapes)
    first, record = model.card.layer_shapes[0], model.card.alignment
    assert dataclasses.replace(record, images=0, kept={}) == measure_alignment(stored.values(), first, SIZE)
    assert record.matches == len(stored) * first.height * first.width * settings.kappa
    shares = [record.within[r] for r in ("4", "8", "16", "32")]
    assert shares == sorted(shares) and 0 < shares[0] <= shares[-1] <= 1
    # kept: a brute-force search of the sampled images (evenly spaced calibration ids) within each radius
    ids = sorted(stored)
    sample = ids[:: max(1, len(ids) // ALIGNMENT_IMAGES)][:ALIGNMENT_IMAGES]
    assert record.images == len(sample) == min(len(ids), ALIGNMENT_IMAGES)
    for radius, share in record.kept.items():
        per_layer = []
        for layer, (shape, bank) in enumerate(zip(model.card.layer_shapes, model.gallery)):
            cells = radius_cells(int(radius), shape.height, SIZE)
            kept = [local_layer_distances(bank[model.row_of[i]].T.reshape(-1, shape.height, shape.width),
                                          bank[[model.row_of[n] for n in stored[i].neighbour_ids]], cells, settings.kappa).ravel()
                    <= 1.1 * stored[i].distances[layer].mean(1) for i in sample]
            per_layer.append(np.mean(kept))
        assert share == pytest.approx(np.mean(per_layer), abs=0.01)  # float16 gallery rows as queries vs the stored features
    assert list(record.kept) == ["4", "8", "16", "32"] and record.kept["32"] >= record.kept["4"]
    assert json.loads((tmp_path / "full" / CARD_NAME).read_text())["alignment"]["layer"] == "layer1"
    restricted = fit(data["train"], settings.replace(match_radius=8))
    assert restricted.card.alignment.layer is None
