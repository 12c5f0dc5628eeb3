"""The fitted model: gallery writing, build, save / load, damaged artifacts, compatibility, IVF recall.

Save / load on the S3 test server is in tests/integration/formats/test_model.py.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import hashlib
import json
import os

import faiss
import numpy as np
import pytest

from spade_batch.config import ConfigError, Settings
from spade_batch.formats import listing
from spade_batch.formats.card import (
    CARD_NAME,
    MODEL_SCHEMA_VERSION,
    READABLE_SCHEMA_VERSIONS,
    CalibrationRecord,
    ModelCard,
    ModelError,
    Thresholds,
    load_card,
)
from spade_batch.formats.features import LayerShape
from spade_batch.formats.images import Preprocessing
from spade_batch.formats.layout import ModelLayout
from spade_batch.formats.model import Centre, SpadeModel, load_count, verify_model
from spade_batch.formats.model_build import GalleryWriter, build_index, build_model
from spade_batch.method import spade

SHAPES = [LayerShape("layer1", 4, 4, 3), LayerShape("layer2", 2, 2, 5)]
PREPROCESSING = Preprocessing(64, "full", (0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
DIM = 8


@dataclasses.dataclass
class Raw:
    """Raw (uncentred) features of n images: ids, n x D float32, per layer n x P x C float32."""

    ids: list[str]
    global_features: np.ndarray
    layers: list[np.ndarray]

    def rows(self, order) -> tuple[list[str], np.ndarray, list[np.ndarray]]:
        return [self.ids[i] for i in order], self.global_features[order], [layer[order] for layer in self.layers]


def raw_features(count: int, seed: int = 0, offset: float = 0.0) -> Raw:
    """Ids deliberately not in sorted order, so the sorted gallery order differs from the input order."""
    rng = np.random.default_rng(seed)
    ids = [f"good/{i:03d}.png" for i in rng.permutation(count)]
    return Raw(
        ids,
        (offset + rng.standard_normal((count, DIM))).astype(np.float32),
        [(offset + rng.standard_normal((count, s.height * s.width, s.channels))).astype(np.float32) for s in SHAPES],
    )


def card_for(count: int, settings: Settings, **changes) -> ModelCard:
    card = ModelCard(
        settings=settings.method, preprocessing=PREPROCESSING, weights_sha256="sha256:abc",
        layers=list(SHAPES), global_dim=DIM, train_count=count, train_manifest_sha256="f00d",
    )
    return dataclasses.replace(card, **changes)


def first_by_id_centre(features: Raw) -> Centre:
    first = features.ids.index(min(features.ids))
    return Centre.of_image(features.global_features[first], [layer[first] for layer in features.layers])


def make_model(folder, features: Raw, **settings) -> SpadeModel:
    settings = Settings(backbone="resnet18", weights="random", k=3, **settings)
    writer = GalleryWriter(str(folder), features.ids, SHAPES, DIM, first_by_id_centre(features))
    writer.add(features.ids, features.global_features, features.layers)
    return build_model(writer, card_for(len(features.ids), settings), settings)


def search(model: SpadeModel, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    centred = np.asarray(queries, np.float64) - model.centre.global_mean
    return model.index.search(np.ascontiguousarray(centred, dtype=np.float32), k)


def gallery_files(folder) -> list[bytes]:
    return [(folder / "pyramid" / f"{s.name}.npy").read_bytes() for s in SHAPES]


# ---------------------------------------------------------------- GalleryWriter


def test_gallery_rows_are_the_centred_features_in_sorted_id_order(tmp_path):
    features = raw_features(7, seed=1, offset=3.0)
    centre = Centre.of_image(features.global_features[2], [layer[2] for layer in features.layers])
    writer = GalleryWriter(str(tmp_path), features.ids, SHAPES, DIM, centre)
    writer.add(features.ids, features.global_features, features.layers)
    ids, global_features = writer.close()

    order = np.argsort(features.ids)
    assert ids == sorted(features.ids)
    # The centre of an image: its global feature, and per layer the mean of its pixel features.
    np.testing.assert_array_equal(centre.global_mean, features.global_features[2])
    for mean, layer in zip(centre.layer_means, features.layers):
        np.testing.assert_allclose(mean, layer[2].astype(np.float64).mean(axis=0), rtol=1e-6)
    expected_global = features.global_features[order].astype(np.float64) - centre.global_mean
    np.testing.assert_allclose(global_features, expected_global, rtol=1e-6, atol=1e-6)
    for shape, layer, mean in zip(SHAPES, features.layers, centre.layer_means):
        written = np.load(tmp_path / "pyramid" / f"{shape.name}.npy")
        assert written.dtype == np.float16 and written.shape == (7, shape.height * shape.width, shape.channels)
        expected = layer[order].astype(np.float64) - mean
        # float16 rounding of the centred value: half a unit in the last place (2^-11 relative).
        np.testing.assert_allclose(written, expected, rtol=2**-11, atol=2**-24)
        assert np.abs(written.astype(np.float64) - expected).max() > 0  # really float16, not a float32 copy


def test_rows_written_in_any_order_and_in_pieces_give_the_same_files(tmp_path):
    features = raw_features(9, seed=2)
    centre = first_by_id_centre(features)
    ordered, shuffled = tmp_path / "ordered", tmp_path / "shuffled"
    writer = GalleryWriter(str(ordered), features.ids, SHAPES, DIM, centre)
    writer.add(*features.rows(np.argsort(features.ids)))
    ordered_ids, ordered_global = writer.close()

    writer = GalleryWriter(str(shuffled), list(reversed(features.ids)), SHAPES, DIM, centre)
    pieces = np.array_split(np.random.default_rng(0).permutation(9), 4)
    for piece in pieces:
        ids, global_features, layers = features.rows(piece)
        # Images that are not in the gallery (e.g. held out for calibration) are skipped.
        writer.add([*ids, "held-out.png"], np.vstack([global_features, np.full((1, DIM), 1e3, np.float32)]),
                   [np.concatenate([layer, np.full((1, *layer.shape[1:]), 1e3, np.float32)]) for layer in layers])
    shuffled_ids, shuffled_global = writer.close()

    assert shuffled_ids == ordered_ids == sorted(features.ids)
    np.testing.assert_array_equal(shuffled_global, ordered_global)
    assert gallery_files(shuffled) == gallery_files(ordered)


def test_threads_adding_pieces_at_once_give_the_same_files(tmp_path, monkeypatch):
    features = raw_features(23, seed=3)
    centre = first_by_id_centre(features)
    writer = GalleryWriter(str(tmp_path / "one"), features.ids, SHAPES, DIM, centre)
    writer.add(features.ids, features.global_features, features.layers)
    one_ids, one_global = writer.close()

    monkeypatch.setattr(GalleryWriter, "rows_per_write", 2)  # several writes per piece, runs split by gaps
    writer = GalleryWriter(str(tmp_path / "threads"), features.ids, SHAPES, DIM, centre)
    pieces = np.array_split(np.random.default_rng(1).permutation(23), 5)
    with concurrent.futures.ThreadPoolExecutor(5) as pool:
        list(pool.map(lambda piece: writer.add(*features.rows(np.sort(piece))), pieces))
    threads_ids, threads_global = writer.close()

    assert threads_ids == one_ids
    np.testing.assert_array_equal(threads_global, one_global)
    assert gallery_files(tmp_path / "threads") == gallery_files(tmp_path / "one")


def test_an_unwritten_gallery_row_is_a_clear_error_at_close(tmp_path):
    features = raw_features(5, seed=3)
    writer = GalleryWriter(str(tmp_path), features.ids, SHAPES, DIM, first_by_id_centre(features))
    missing = sorted(features.ids)[3]
    keep = [i for i, image_id in enumerate(features.ids) if image_id != missing]
    writer.add(*features.rows(keep))
    with pytest.raises(ValueError, match=rf"1 gallery images were never written, e\.g\. \['{missing}'\]"):
        writer.close()


def test_duplicate_gallery_ids_are_refused(tmp_path):
    with pytest.raises(ValueError, match="unique"):
        GalleryWriter(str(tmp_path), ["a", "b", "a"], SHAPES, DIM, Centre.zero(DIM, SHAPES))


# ---------------------------------------------------------------- build, save, load


def test_build_model_indexes_the_centred_global_features(tmp_path):
    features = raw_features(8, offset=5.0)
    model = make_model(tmp_path, features)
    order = np.argsort(features.ids)
    assert model.train_ids == sorted(features.ids)
    assert model.index.ntotal == 8 and model.card.train_count == 8 and model.folder == str(tmp_path)
    assert model.card.schema_version == MODEL_SCHEMA_VERSION == max(READABLE_SCHEMA_VERSIONS)
    for bank in model.gallery:
        assert isinstance(bank, np.memmap) and bank.dtype == np.float16
    # The flat index is exact: with centred queries, its distances are the brute-force squared distances
    # between the raw features (a common shift changes no distance).
    queries = 5.0 + np.random.default_rng(1).standard_normal((4, DIM))
    distances, neighbours = search(model, queries, 8)
    brute = ((queries[:, None, :] - features.global_features[order][None].astype(np.float64)) ** 2).sum(-1)
    np.testing.assert_array_equal(neighbours, np.argsort(brute, axis=1))
    np.testing.assert_allclose(distances, np.sort(brute, axis=1), rtol=1e-5, atol=1e-5)
    # The centre is the first gallery image by id.
    np.testing.assert_array_equal(model.centre.global_mean, features.global_features[order[0]])


def assert_same_model(actual: SpadeModel, expected: SpadeModel, queries: np.ndarray) -> None:
    assert actual.card == expected.card
    assert actual.train_ids == expected.train_ids
    np.testing.assert_array_equal(actual.centre.global_mean, expected.centre.global_mean)
    for got, want in zip(actual.centre.layer_means, expected.centre.layer_means, strict=True):
        np.testing.assert_array_equal(got, want)
    for got, want in zip(actual.gallery, expected.gallery, strict=True):
        assert got.dtype == want.dtype
        np.testing.assert_array_equal(got, want)
    assert type(actual.index) is type(expected.index)
    for got, want in zip(search(actual, queries, 3), search(expected, queries, 3)):
        np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("index", ["flat", "ivf"])
def test_save_load_round_trip(tmp_path, index):
    model = make_model(tmp_path / "built", raw_features(120), index=index).with_thresholds(Thresholds(1.5, 0.25), CalibrationRecord(count=12))
    uri = str(tmp_path / "model")
    before = load_count()
    model.save(uri)
    loaded = SpadeModel.load(uri)
    assert load_count() == before + 1
    assert loaded.folder == uri and all(isinstance(bank, np.memmap) for bank in loaded.gallery)
    assert_same_model(loaded, model, np.random.default_rng(2).standard_normal((10, DIM)))
    assert loaded.card.thresholds == Thresholds(1.5, 0.25) and loaded.card.calibration.count == 12
    card = json.loads((tmp_path / "model" / CARD_NAME).read_text())
    assert card["weights_sha256"] == "sha256:abc" and card["settings"]["index"] == index
    assert card["schema_version"] == MODEL_SCHEMA_VERSION
    assert sorted(p.name for p in (tmp_path / "model" / "pyramid").iterdir()) == ["layer1.npy", "layer2.npy"]
    assert sorted(p.name for p in (tmp_path / "model").iterdir()) == sorted(
        [CARD_NAME, "centre.npz", "global.faiss", "pyramid", "train_ids.json"]
    )
    # Saved into its own folder (the arrays are already there), the model is the same too.
    model.save(str(tmp_path / "built"))
    assert_same_model(SpadeModel.load(str(tmp_path / "built")), model, np.random.default_rng(3).standard_normal((10, DIM)))


def test_a_recorded_file_beyond_the_arrays_is_saved_with_the_model_and_left_out_where_the_folder_lacks_it(tmp_path):
    """The calibration matches: saved and checksummed with the model; a node-local copy holds none, and a model saved
    from it records none (its card names no file it does not have)."""
    built = tmp_path / "built"
    model = make_model(built, raw_features(6))
    (built / ModelLayout.calibration_matches).write_bytes(b"matches")
    model = model.with_file(ModelLayout.calibration_matches)
    assert model.card.files[ModelLayout.calibration_matches] == {"bytes": 7, "sha256": hashlib.sha256(b"matches").hexdigest()}
    model.save(str(tmp_path / "with"))
    assert (tmp_path / "with" / ModelLayout.calibration_matches).read_bytes() == b"matches"
    assert ModelLayout.calibration_matches in SpadeModel.load(str(tmp_path / "with")).card.files

    (built / ModelLayout.calibration_matches).unlink()
    model.save(str(tmp_path / "without"))
    assert not (tmp_path / "without" / ModelLayout.calibration_matches).exists()
    assert ModelLayout.calibration_matches not in SpadeModel.load(str(tmp_path / "without")).card.files


def test_load_with_a_card_uses_that_card(tmp_path):
    model = make_model(tmp_path, raw_features(6))
    model.publish_arrays(str(tmp_path))
    assert not (tmp_path / CARD_NAME).exists()
    calibrated = model.with_thresholds(Thresholds(2.0, 0.5), CalibrationRecord(count=1))
    assert SpadeModel.load(str(tmp_path), card=calibrated.card).card.thresholds == Thresholds(2.0, 0.5)


def test_a_failed_save_over_a_model_leaves_no_card_to_mix_with_the_new_arrays(tmp_path):
    uri = str(tmp_path / "model")
    make_model(tmp_path / "first", raw_features(10, seed=1)).save(uri)
    (tmp_path / "model" / "pyramid" / "layer2.npy").unlink()
    (tmp_path / "model" / "pyramid" / "layer2.npy").mkdir()  # the next write of layer2 fails midway
    with pytest.raises(OSError):
        make_model(tmp_path / "second", raw_features(10, seed=2)).save(uri)
    with pytest.raises(FileNotFoundError, match="spade.json is missing"):
        SpadeModel.load(uri)


def test_load_without_a_card_says_to_fit_first(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"no model at .*spade.json is missing; run `spade-batch fit` first"):
        SpadeModel.load(str(tmp_path / "nothing"))


def test_an_unreadable_schema_version_is_refused(tmp_path):
    model = make_model(tmp_path, raw_features(5))
    dataclasses.replace(model, card=dataclasses.replace(model.card, schema_version=99)).write_card(str(tmp_path))
    with pytest.raises(ValueError, match=r"schema version 99; this package reads \(1, 2\)"):
        SpadeModel.load(str(tmp_path))


@pytest.mark.parametrize("damage", ["truncated layer1.npy", "missing global.faiss", "missing centre.npz", "fewer train ids"])
def test_a_damaged_artifact_is_a_clear_error_naming_the_file(tmp_path, damage):
    folder = tmp_path / "model"
    make_model(tmp_path / "built", raw_features(6)).save(str(folder))
    SpadeModel.load(str(folder))  # intact, it loads
    if damage == "truncated layer1.npy":
        path = folder / "pyramid" / "layer1.npy"
        path.write_bytes(path.read_bytes()[:-100])
    elif damage == "fewer train ids":
        (folder / "train_ids.json").write_text(json.dumps(json.loads((folder / "train_ids.json").read_text())[:-1]))
    else:
        (folder / damage.split()[1]).unlink()
    broken = {"truncated layer1.npy": "pyramid/layer1.npy", "fewer train ids": "train_ids.json"}.get(damage, damage.split()[1])
    with pytest.raises(ValueError, match=rf"model file {folder}/{broken} .*fit the model again"):
        SpadeModel.load(str(folder))


def test_check_compatible_names_only_mismatched_explicit_model_keys(tmp_path):
    card = make_model(tmp_path, raw_features(5)).card
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



def test_calibration_settings_that_differ_from_the_models_are_refused_and_a_run_records_the_models(tmp_path):
    """nightly takes the calibration group, applied only when it fits: on an existing model a value other than the one it was
    fitted with would be recorded and never applied, so it is refused, as a method key is; a card from before they were
    recorded cannot tell, so any explicit one is refused. The settings a run records are the model's."""
    fitted = Settings(image_fpr=0.05, pixel_rule="quantile", min_region=4).calibration
    card = dataclasses.replace(make_model(tmp_path, raw_features(5)).card, calibration_settings=fitted)
    same = Settings(image_fpr=0.05, pixel_rule="quantile", batch_size=3)
    card.check_compatible(same, frozenset({"image_fpr", "pixel_rule", "batch_size"}))
    card.check_compatible(Settings(image_fpr=0.2), frozenset())  # not explicit: the model's are used
    with pytest.raises(ConfigError, match=r"image_fpr=0.2 \(model: 0.05\), pixel_rule='mean_3sigma' \(model: 'quantile'\); drop these"):
        card.check_compatible(Settings(image_fpr=0.2), frozenset({"image_fpr", "pixel_rule"}))
    with pytest.raises(ConfigError, match=r"image_fpr=0.05 \(model: not recorded\)"):
        dataclasses.replace(card, calibration_settings=None).check_compatible(same, frozenset({"image_fpr"}))
    recorded = card.training_settings(Settings(image_fpr=0.2, batch_size=3))
    assert (recorded.calibration, recorded.batch_size) == (fitted, 3)


def test_settings_for_a_request_take_the_models_method_settings_and_keep_the_rest(tmp_path):
    card = make_model(tmp_path, raw_features(5)).card
    request = Settings(backbone="resnet18", weights="random", k=5, sigma=2.0, batch_size=3)
    merged = card.settings_for(request)
    assert merged.method == card.settings and merged.batch_size == 3
    with pytest.raises(ConfigError, match=r"k=5 \(model: 3\)"):
        card.settings_for(request, frozenset({"k"}))

# ---------------------------------------------------------------- index


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
    """5000 x 64 vectors around 40 overlapping centres; recall@10 of 500 fresh queries vs float64 brute force."""
    rng = np.random.default_rng(0)
    centres = rng.standard_normal((40, 64))
    vectors, queries = clustered(rng, centres, 5000), clustered(rng, centres, 500)
    squared = (queries.astype(np.float64) ** 2).sum(1)[:, None] - 2 * queries.astype(np.float64) @ vectors.T.astype(np.float64)
    squared += (vectors.astype(np.float64) ** 2).sum(1)[None]
    exact = np.argsort(squared, axis=1)[:, :10]
    assert recall_at(build_index(vectors, "flat"), queries, exact) > 0.999
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


def test_model_layout_paths_are_under_the_root_and_name_every_saved_file(tmp_path):
    uri = str(tmp_path / "model")
    make_model(tmp_path / "built", raw_features(6)).save(uri)
    files = ModelLayout(uri)
    paths = [files.card, files.pyramid, files.index, files.features, files.features_inputs, files.lock,
             *(files.layer(shape.name) for shape in SHAPES)]
    assert all(path.startswith(uri + "/") for path in paths) and len(set(paths)) == len(paths)
    written = [files.file(name) for name in [ModelLayout.card, *ModelLayout.array_names([shape.name for shape in SHAPES])]]
    assert sorted(listing.list_files(uri)) == sorted(written)
    assert ModelLayout.array_names(["layer1"], centre=False) == ["train_ids.json", "global.faiss", "pyramid/layer1.npy"]


def test_the_card_records_the_size_and_sha256_of_every_file(tmp_path):
    import hashlib

    uri = str(tmp_path / "model")
    make_model(tmp_path / "built", raw_features(6)).save(uri)
    files = json.loads((tmp_path / "model" / CARD_NAME).read_text())["files"]
    names = ModelLayout.array_names([shape.name for shape in SHAPES])
    assert sorted(files) == sorted(names)
    for name in names:
        data = (tmp_path / "model" / name).read_bytes()
        assert files[name] == {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}


def mix(folder, other, damage: str) -> str:
    """Damage the model in folder with a file of the model in other (another fit of as many images), or cut one short."""
    import shutil

    name = {"global.faiss": "global.faiss", "centre.npz": "centre.npz", "train_ids.json": "train_ids.json",
            "pyramid layer": "pyramid/layer2.npy", "truncated pyramid layer": "pyramid/layer1.npy"}[damage]
    if damage.startswith("truncated"):
        (folder / name).write_bytes((folder / name).read_bytes()[:-8])
    else:
        assert (folder / name).stat().st_size == (other / name).stat().st_size  # only a checksum tells them apart
        shutil.copyfile(other / name, folder / name)
    return name


MIXES = ["global.faiss", "centre.npz", "pyramid layer", "truncated pyramid layer"]


@pytest.mark.parametrize("damage", MIXES)
def test_a_folder_mixed_from_two_fits_or_cut_short_is_refused_naming_the_file(tmp_path, monkeypatch, damage):
    """Same N and D, same shapes: the arrays load; only the card's checksums tell the fits apart."""
    monkeypatch.setenv("SPADE_BATCH_CACHE", str(tmp_path / "cache"))
    folder = tmp_path / "model"
    make_model(tmp_path / "built", raw_features(6, seed=1)).save(str(folder))
    make_model(tmp_path / "other", raw_features(6, seed=2, offset=0.5)).save(str(tmp_path / "other-model"))
    SpadeModel.load(str(folder))  # intact, it loads (and the gallery is verified once on this node)
    name = mix(folder, tmp_path / "other-model", damage)
    card = load_card(str(folder))
    for load in (lambda: verify_model(str(folder), card), lambda: SpadeModel.load(str(folder))):
        with pytest.raises(ModelError, match=rf"model file {folder}/{name} .*re-sync the whole model folder .*or fit the model again"):
            load()


def test_the_gallery_is_hashed_once_per_node_until_a_file_changes(tmp_path, monkeypatch):
    from spade_batch.formats import integrity

    monkeypatch.setenv("SPADE_BATCH_CACHE", str(tmp_path / "cache"))
    folder = tmp_path / "model"
    make_model(tmp_path / "built", raw_features(6)).save(str(folder))
    hashed: list[str] = []
    real = integrity.file_sha256
    monkeypatch.setattr(integrity, "file_sha256", lambda path: hashed.append(os.path.relpath(path, folder)) or real(path))
    small = sorted(["train_ids.json", "global.faiss", "centre.npz"])

    SpadeModel.load(str(folder))
    assert sorted(hashed) == sorted([*small, "pyramid/layer1.npy", "pyramid/layer2.npy"])
    hashed.clear()
    SpadeModel.load(str(folder))  # another actor on the node: sizes and the small files only
    assert sorted(hashed) == small
    hashed.clear()
    layer = folder / "pyramid" / "layer1.npy"
    layer.write_bytes(layer.read_bytes())  # rewritten (same bytes): verified again
    SpadeModel.load(str(folder))
    assert "pyramid/layer1.npy" in hashed


def test_an_old_card_without_checksums_still_loads_unverified(tmp_path):
    folder = tmp_path / "model"
    make_model(tmp_path / "built", raw_features(6)).save(str(folder))
    card = json.loads((folder / CARD_NAME).read_text())
    del card["files"]
    (folder / CARD_NAME).write_text(json.dumps(card))
    assert SpadeModel.load(str(folder)).card.files == {}


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"thresholds": {"image": 1.0, "pixel": float("nan")}}, "thresholds.pixel is nan; a threshold is a finite number or null"),
        ({"thresholds": {"image": float("inf"), "pixel": None}}, "thresholds.image is inf"),
        ({"thresholds": {"image": "0.5", "pixel": None}}, r"thresholds.image is '0.5' \(str\); a threshold is a number or null"),
        ({"thresholds": {"image": True, "pixel": None}}, "thresholds.image is True"),
        ({"thresholds": {"image": 1.0}}, "thresholds is .*; it holds 'image' and 'pixel'"),
        ({"thresholds": {"image": 1.0, "pixel": 1.0, "region": float("nan")}}, "thresholds.region is nan"),
        ({"train_count": "6"}, "train_count is '6'; it is a positive whole number"),
        ({"global_dim": 0}, "global_dim is 0"),
        ({"settings": []}, r"settings is \[\] \(list\), not a JSON object"),
        ({"layers": [{"name": "layer1", "height": 4, "width": 4}]}, r"layers\[0\] is"),
        ({"files": {"global.faiss": {"bytes": "10", "sha256": "x"}}}, r"files\['global.faiss'\] is"),
    ],
)
def test_a_card_field_of_the_wrong_type_is_a_clear_error_naming_it(tmp_path, change, message):
    folder = tmp_path / "model"
    make_model(tmp_path / "built", raw_features(6)).save(str(folder))
    card = {**json.loads((folder / CARD_NAME).read_text()), **change}
    (folder / CARD_NAME).write_text(json.dumps(card))  # NaN and Infinity as the bare literals json reads back
    with pytest.raises(ModelError, match=rf"{folder}/spade.json is not a valid model card: {message}.*; fit the model again"):
        load_card(str(folder))


def test_a_card_from_before_the_mask_rule_levels_decides_as_before(tmp_path):
    """No region or gate level in its thresholds, no region_fpr or gate_fpr in its calibration settings: add keeps
    calibrating as it did (0: off), and its masks are today's (Thresholds.shows_every_region by the verdict alone)."""
    folder = tmp_path / "model"
    make_model(tmp_path / "built", raw_features(6)).with_thresholds(Thresholds(2.0, 1.0, 0, True), CalibrationRecord()).save(str(folder))
    card = json.loads((folder / CARD_NAME).read_text())
    card["calibration_settings"] = {k: v for k, v in dataclasses.asdict(Settings().calibration).items() if k not in ("region_fpr", "gate_fpr")}
    card["thresholds"] = {k: card["thresholds"][k] for k in ("image", "pixel", "min_region", "gate_masks")}
    (folder / CARD_NAME).write_text(json.dumps(card))
    loaded = load_card(str(folder))
    assert (loaded.calibration_settings.region_fpr, loaded.calibration_settings.gate_fpr) == (0.0, 0.0)
    assert loaded.thresholds == Thresholds(2.0, 1.0, 0, True, None, None)
    assert [loaded.thresholds.shows_every_region(score) for score in (1.5, 2.0, 2.5, None)] == [False, False, True, True]


def test_a_non_finite_threshold_is_never_written_to_a_card(tmp_path):
    model = make_model(tmp_path / "built", raw_features(6)).with_thresholds(Thresholds(float("nan"), None), CalibrationRecord())
    with pytest.raises(ValueError, match="Out of range float values are not JSON compliant"):
        model.save(str(tmp_path / "model"))


def test_a_card_without_labels_has_no_labelled_entry_and_one_with_labels_round_trips(tmp_path):
    """Cards before `thresholds --labelled` (and every version whose thresholds came from normal images) are written and
    read as before: no "labelled" key, None once loaded; a label-set card keeps its record through JSON."""
    from spade_batch.formats.card import LabelRecord, card_problem

    plain = card_for(4, Settings(k=2), thresholds=Thresholds(image=1.5, pixel=0.25))
    stored = json.loads(plain.to_json())
    assert "labelled" not in stored and ModelCard.from_dict(stored).labelled is None
    record = LabelRecord(source="data/line3", kind="mvtec", normal_images=5, defective_images=5, target="recall=0.95",
                         image=True, pixel=True, before={"image": 1.5, "pixel": 0.25}, after={"image": 1.25, "pixel": 0.5},
                         decisions={"after": {"image": {"fpr": 0.2}, "pixel": None}})
    labelled = dataclasses.replace(plain, labelled=record)
    assert ModelCard.from_dict(json.loads(labelled.to_json())) == labelled
    assert card_problem({**stored, "labelled": "yes"}) == "labelled is 'yes' (str), not a JSON object"
