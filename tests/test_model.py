"""The fitted model: build, save / load, pickle, compatibility checks, and the IVF index's recall."""

from __future__ import annotations

import json
import pickle

import faiss
import numpy as np
import pytest

from spade_batch import spade
from spade_batch.config import ConfigError, Settings
from spade_batch.features import FeatureTable, LayerShape
from spade_batch.model import CARD_NAME, SpadeModel, build_index, build_model

SHAPES = [LayerShape("layer1", 4, 4, 3), LayerShape("layer2", 2, 2, 5)]
PREPROCESSING = {"size": 64, "mode": "full", "mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225]}


def feature_table(count: int, errors: dict[int, str] | None = None, dim: int = 8, seed: int = 0) -> FeatureTable:
    rng = np.random.default_rng(seed)
    errors = errors or {}
    return FeatureTable(
        ids=[f"good/{i:03d}.png" for i in range(count)],
        uris=[f"/data/good/{i:03d}.png" for i in range(count)],
        heights=np.full(count, 64, np.int32),
        widths=np.full(count, 80, np.int32),
        global_features=rng.standard_normal((count, dim)).astype(np.float32),
        layers=[rng.standard_normal((count, s.height * s.width, s.channels)).astype(np.float16) for s in SHAPES],
        layer_shapes=SHAPES,
        errors=[errors.get(i) for i in range(count)],
    )


def make_model(features: FeatureTable, **settings) -> SpadeModel:
    return build_model(features, Settings(backbone="resnet18", weights="random", k=3, **settings), PREPROCESSING, "sha256:abc", "f00d")


def search(model: SpadeModel, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    return model.index.search(np.ascontiguousarray(queries, dtype=np.float32), k)


def test_build_model_leaves_out_and_records_failed_images():
    features = feature_table(8, {2: "cannot decode good/002.png: empty", 5: "truncated"})
    model = make_model(features)
    keep = [0, 1, 3, 4, 6, 7]
    assert model.train_ids == [features.ids[i] for i in keep]
    assert model.index.ntotal == 6 and model.card.train_count == 6
    for bank, layer in zip(model.gallery, features.layers):
        assert bank.dtype == np.float16
        np.testing.assert_array_equal(bank, layer[keep])
    assert model.card.failed_train_images == [
        {"id": "good/002.png", "error": "cannot decode good/002.png: empty"},
        {"id": "good/005.png", "error": "truncated"},
    ]
    assert model.card.settings["k"] == 3 and model.card.global_dim == 8
    assert model.card.layer_shapes == SHAPES
    # The flat index is exact: its distances are the brute-force squared distances.
    queries = np.random.default_rng(1).standard_normal((4, 8)).astype(np.float32)
    distances, neighbours = search(model, queries, 6)
    brute = ((queries[:, None, :] - features.global_features[keep][None]) ** 2).sum(-1)
    np.testing.assert_array_equal(neighbours, np.argsort(brute, axis=1))
    np.testing.assert_allclose(distances, np.sort(brute, axis=1), rtol=1e-5, atol=1e-5)


def test_k_above_the_usable_training_images_is_a_clear_error():
    features = feature_table(4, {0: "bad", 1: "bad"})
    with pytest.raises(ValueError, match=r"k=3 .* only 2 usable training images \(2 failed\); lower k or add normal images"):
        make_model(features)


def assert_same_model(actual: SpadeModel, expected: SpadeModel, queries: np.ndarray) -> None:
    assert actual.card == expected.card
    assert actual.train_ids == expected.train_ids
    assert len(actual.gallery) == len(expected.gallery)
    for got, want in zip(actual.gallery, expected.gallery):
        assert got.dtype == want.dtype
        np.testing.assert_array_equal(got, want)
    assert type(actual.index) is type(expected.index)
    for got, want in zip(search(actual, queries, 3), search(expected, queries, 3)):
        np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("index", ["flat", "ivf"])
def test_save_load_round_trip(tmp_path, index):
    model = make_model(feature_table(120, {7: "bad"}), index=index).with_thresholds(1.5, 0.25, {"count": 12})
    uri = str(tmp_path / "model")
    model.save(uri)
    loaded = SpadeModel.load(uri)
    assert_same_model(loaded, model, np.random.default_rng(2).standard_normal((10, 8)))
    assert loaded.card.thresholds == {"image": 1.5, "pixel": 0.25}
    card = json.loads((tmp_path / "model" / CARD_NAME).read_text())
    assert card["weights_sha256"] == "sha256:abc" and card["settings"]["index"] == index
    assert sorted(p.name for p in (tmp_path / "model" / "pyramid").iterdir()) == ["layer1.npy", "layer2.npy"]


def test_a_failed_save_over_a_model_leaves_no_card_to_mix_with_the_new_arrays(tmp_path):
    uri = str(tmp_path / "model")
    make_model(feature_table(10, seed=1)).save(uri)
    (tmp_path / "model" / "pyramid" / "layer2.npy").unlink()
    (tmp_path / "model" / "pyramid" / "layer2.npy").mkdir()  # the next write of layer2 fails midway
    with pytest.raises(OSError):
        make_model(feature_table(10, seed=2)).save(uri)
    with pytest.raises(FileNotFoundError, match="spade.json is missing"):
        SpadeModel.load(uri)


def test_load_without_a_card_says_to_fit_first(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"no model at .*spade.json is missing; run `spade-batch fit` first"):
        SpadeModel.load(str(tmp_path / "nothing"))


@pytest.mark.parametrize("index", ["flat", "ivf"])
def test_pickle_round_trip(index):
    model = make_model(feature_table(120), index=index)
    state = model.__getstate__()
    assert isinstance(state["index"], np.ndarray) and state["index"].dtype == np.uint8
    assert_same_model(pickle.loads(pickle.dumps(model)), model, np.random.default_rng(3).standard_normal((10, 8)))


def test_check_compatible_names_only_mismatched_explicit_model_keys():
    card = make_model(feature_table(5)).card
    request = Settings(backbone="resnet18", weights="random", k=5, sigma=2.0, batch_size=3)
    card.check_compatible(request, frozenset())  # nothing explicit: the model's values are used
    card.check_compatible(request, frozenset({"batch_size", "backbone"}))  # not a model key / equal
    with pytest.raises(ConfigError) as error:
        card.check_compatible(request, frozenset({"k", "backbone", "batch_size"}))
    message = str(error.value)
    assert "k=5 (model: 3)" in message
    assert "backbone" not in message and "sigma" not in message and "batch_size" not in message
    with pytest.raises(ConfigError, match=r"k=5 \(model: 3\), sigma=2.0 \(model: 4.0\)"):
        card.check_compatible(request, frozenset({"k", "sigma"}))


def clustered(rng: np.random.Generator, centres: np.ndarray, count: int) -> np.ndarray:
    labels = rng.integers(0, len(centres), count)
    return (centres[labels] + rng.standard_normal((count, centres.shape[1]))).astype(np.float32)


IVF_RECALL_BOUND = 0.95


def recall_at(index: faiss.Index, queries: np.ndarray, exact: np.ndarray) -> float:
    """Mean fraction of the exact k nearest neighbours that `index` returns."""
    k = exact.shape[1]
    _, approximate = index.search(queries, k)
    return float(np.mean([len(set(a) & set(e)) / k for a, e in zip(approximate, exact)]))


def test_ivf_recall_against_the_exact_index():
    """5000 x 64 vectors around 40 overlapping centres; recall@10 of 500 fresh queries vs the flat index."""
    rng = np.random.default_rng(0)
    centres = rng.standard_normal((40, 64))
    vectors, queries = clustered(rng, centres, 5000), clustered(rng, centres, 500)
    _, exact = build_index(vectors, "flat").search(queries, 10)
    ivf = build_index(vectors, "ivf", seed=0, k=10)
    recall, nprobe = recall_at(ivf, queries, exact), ivf.nprobe
    ivf.nprobe = 1
    one_list = recall_at(ivf, queries, exact)
    print(f"IVF recall@10 = {recall:.4f} (nlist {ivf.nlist}, nprobe {nprobe}; bound {IVF_RECALL_BOUND}); with nprobe 1: {one_list:.4f}")
    assert isinstance(ivf, faiss.IndexIVFFlat) and 1 < nprobe < ivf.nlist
    assert recall > IVF_RECALL_BOUND
    assert one_list < IVF_RECALL_BOUND  # the data is hard enough that a too-small nprobe would fail


@pytest.mark.parametrize(("count", "k"), [(80, 50), (200, 50), (100, 99)])
def test_small_ivf_index_always_returns_k_neighbours(count, k):
    """faiss pads results from too few probed lists with id -1 and huge distances; never let that through."""
    rng = np.random.default_rng(count)
    vectors = rng.standard_normal((count, 16)).astype(np.float32)
    index = build_index(vectors, "ivf", k=k)
    scores, neighbours = spade.image_knn(index, rng.standard_normal((300, 16)).astype(np.float32), k)
    assert (neighbours >= 0).all()
    assert np.all(np.sort(neighbours, axis=1)[:, 1:] != np.sort(neighbours, axis=1)[:, :-1])  # k distinct images
    assert scores.max() < 100  # squared distances of unit normals in 16-d are about 32
