"""The in-process API on real images: extractor tables, fit + score, and independent recomputations."""

from __future__ import annotations

import pathlib

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from scipy.ndimage import gaussian_filter

from spade_batch import spade
from spade_batch.config import Settings
from spade_batch.datasets import make_demo_data, read_mvtec_category
from spade_batch.detector import Extractor, Scorer, fit, score
from spade_batch.images import Preprocessing, decode_image, preprocess
from spade_batch.model import SpadeModel, build_index, build_model

SIZE = 64
SETTINGS = Settings(backbone="resnet18", weights="random", image_size=SIZE, k=2, kappa=1, sigma=2.0, device="cpu", batch_size=4)
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


def test_feature_table_matches_the_backbone_rounded_to_float16(data):
    settings = SETTINGS.replace(image_size=72)  # not a multiple of 16: layer sizes are rounded up
    extractor = Extractor(settings)
    images = [data["train"][0], None, data["train"][1], data["test"][0]]
    errors = [None, "cannot decode x.png: empty", None, None]
    table = extractor.feature_table(images, ["a", "x", "b", "c"], ["u/a", "u/x", "u/b", "u/c"], errors)

    assert [(s.name, s.height, s.width, s.channels) for s in table.layer_shapes] == [
        ("layer1", 18, 18, 64), ("layer2", 9, 9, 128), ("layer3", 5, 5, 256)
    ]
    assert table.ids == ["a", "x", "b", "c"] and table.errors == errors
    assert table.heights.tolist() == [images[0].shape[0], 0, images[2].shape[0], images[3].shape[0]]
    assert table.widths.tolist() == [images[0].shape[1], 0, images[2].shape[1], images[3].shape[1]]
    assert table.global_features.dtype == np.float32 and table.global_features.shape == (4, 512)

    ok = [0, 2, 3]
    batch = torch.stack([preprocess(images[i], extractor.preprocessing) for i in ok])
    pooled, pyramid = extractor.pyramid(batch)
    np.testing.assert_allclose(table.global_features[ok], pooled.numpy(), rtol=1e-6, atol=1e-6)
    assert not table.global_features[1].any()
    for bank, layer, shape in zip(table.layers, pyramid, table.layer_shapes):
        assert bank.dtype == np.float16 and bank.shape == (4, shape.height * shape.width, shape.channels)
        channels_last = layer.numpy().transpose(0, 2, 3, 1).reshape(3, -1, shape.channels)
        np.testing.assert_array_equal(bank[ok], channels_last.astype(np.float16))
        assert not bank[1].any()


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
        extractor.forward([image])
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
    table = extractor.feature_table(train, [str(i) for i in range(len(train))], [""] * len(train), [None] * len(train))
    build_model(table, LITE0, imagenet.to_dict(), extractor.weights_sha256, "old").save(str(tmp_path))
    old = SpadeModel.load(str(tmp_path))
    assert old.card.preprocessing == {"size": SIZE, "mode": "full", "mean": list(IMAGENET_MEAN), "std": list(IMAGENET_STD)}

    expected = Scorer(old, extractor).score(test)
    got = score(old, test)
    for a, b in zip(got, expected):
        assert a.score == pytest.approx(b.score, rel=1e-5)
        np.testing.assert_allclose(a.anomaly_map, b.anomaly_map, rtol=1e-4, atol=1e-6)

    # Fitted today, the model records the backbone's convention, and that gives other scores.
    new = fit(train, LITE0)
    assert new.card.preprocessing["mean"] == new.card.preprocessing["std"] == [0.5, 0.5, 0.5]
    unlike = [a.score / b.score for a, b in zip(score(new, test), expected)]
    assert min(abs(ratio - 1) for ratio in unlike) > 0.01


def brute_force_map(query_layers: list[torch.Tensor], gallery_layers: list[np.ndarray], kappa: int, sigma: float) -> np.ndarray:
    """The SPADE map from the definition: numpy distances to every gallery vector, scipy smoothing.

    query_layers: per layer C x h x w float32; gallery_layers: per layer G x C float32.
    """
    maps = []
    for query, gallery in zip(query_layers, gallery_layers):
        channels, height, width = query.shape
        pixels = query.numpy().reshape(channels, -1).T.astype(np.float64)
        distances = ((pixels[:, None, :] - gallery[None].astype(np.float64)) ** 2).sum(-1)
        nearest = np.sort(distances, axis=1)[:, :kappa].mean(1).reshape(height, width)
        upsampled = F.interpolate(torch.from_numpy(nearest)[None, None], size=(SIZE, SIZE), mode="bilinear", align_corners=False)
        maps.append(upsampled[0, 0].numpy())
    return gaussian_filter(np.mean(maps, axis=0), sigma, mode="reflect", truncate=4.0)


def test_scorer_equals_an_independent_recomputation(data):
    settings = SETTINGS.replace(k=3, kappa=2)
    extractor = Extractor(settings)
    train = data["train"]
    table = extractor.feature_table(train, [str(i) for i in range(len(train))], [""] * len(train), [None] * len(train))
    model = build_model(table, settings, extractor.preprocessing.to_dict(), extractor.weights_sha256, "test")
    results = Scorer(model, extractor).score(data["test"])

    pooled, pyramid = extractor.forward(data["test"])
    knn_scores, knn_neighbours = spade.image_knn(build_index(table.global_features), pooled.numpy(), 3)
    np.testing.assert_array_equal([r.score for r in results], knn_scores)
    np.testing.assert_array_equal([r.neighbours for r in results], knn_neighbours)
    squared = ((pooled.numpy()[:, None, :].astype(np.float64) - table.global_features[None]) ** 2).sum(-1)
    for i, result in enumerate(results):
        nearest = np.argsort(squared[i])[:3]
        np.testing.assert_array_equal(result.neighbours, nearest)
        assert result.score == pytest.approx(squared[i][nearest].mean(), rel=1e-4)
        galleries = [bank[nearest].reshape(-1, bank.shape[-1]).astype(np.float32) for bank in table.layers]
        expected = brute_force_map([layer[i] for layer in pyramid], galleries, kappa=2, sigma=2.0)
        assert result.anomaly_map.shape == (SIZE, SIZE) and result.anomaly_map.dtype == np.float32
        np.testing.assert_allclose(result.anomaly_map, expected, rtol=1e-3, atol=1e-3 * expected.max())
        # And the library's own math on the same inputs gives the same map, to float32 rounding.
        direct = spade.anomaly_map([layer[i] for layer in pyramid], [torch.from_numpy(g) for g in galleries], (SIZE, SIZE), 2, 2.0)
        np.testing.assert_allclose(result.anomaly_map, direct.numpy(), rtol=1e-5, atol=1e-6 * expected.max())


def test_fit_then_score_gives_finite_scores_and_full_size_maps(data):
    settings = SETTINGS.replace(image_fpr=0.5, pixel_quantile=0.9)
    model = fit(data["train"][:5], settings, calibration_images=data["train"][5:] + data["test"][:2])
    assert model.card.train_count == 5 and model.card.settings == settings.model_dict()
    assert model.card.calibration["count"] == 3
    assert all(np.isfinite(value) for value in model.card.thresholds.values())
    results = score(model, data["test"])
    assert len(results) == len(data["test"])
    for result in results:
        assert np.isfinite(result.score) and result.score > 0
        assert result.anomaly_map.shape == (SIZE, SIZE) and np.isfinite(result.anomaly_map).all()
        assert result.neighbours.shape == (2,) and set(result.neighbours) <= set(range(5))
    assert score(model, []) == []


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
    model = fit(data["train"], SETTINGS.replace(k=1))
    own, other = score(model, [data["train"][3], data["test"][0]])
    assert own.neighbours.tolist() == [3]
    assert own.score < 1e-6 * other.score
    relative = own.anomaly_map.max() / np.median(other.anomaly_map)
    print(f"training image: image score {own.score:.3g} vs {other.score:.3g}; max pixel score / other's median {relative:.2e}")
    assert relative < 1e-4
