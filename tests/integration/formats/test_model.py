"""The fitted model saved to and loaded from the S3 test server (the rest of model.py is in tests/unit/formats/test_model.py)."""

from __future__ import annotations

import dataclasses
import os

import numpy as np
import pytest

from spade_batch.formats import storage
from spade_batch.formats.card import CalibrationRecord, ModelError, Thresholds, load_card
from spade_batch.formats.model import SpadeModel, verify_model
from tests.unit.formats.test_model import DIM, MIXES, assert_same_model, make_model, mix, raw_features


def test_load_from_s3_memory_maps_a_node_local_copy_downloaded_once(tmp_path, s3, s3_bucket, monkeypatch):
    cache = tmp_path / "cache"
    monkeypatch.setenv("SPADE_BATCH_CACHE", str(cache))
    model = make_model(tmp_path / "built", raw_features(30, seed=4), index="ivf").with_thresholds(Thresholds(1.0, 2.0), CalibrationRecord())
    uri = f"{s3_bucket}/models/m1"
    model.save(uri, s3.storage_options)
    assert not cache.exists() or not [p for p in cache.iterdir() if p.is_dir()]  # no copy yet (a build leaves only a stamp)

    loaded = SpadeModel.load(uri, s3.storage_options)
    assert os.path.dirname(loaded.folder) == str(cache)
    assert all(isinstance(bank, np.memmap) and bank.filename.startswith(loaded.folder) for bank in loaded.gallery)
    assert_same_model(loaded, model, np.random.default_rng(5).standard_normal((10, DIM)))
    assert not [p.name for p in cache.iterdir() if p.name.endswith(".partial")]
    stat = os.stat(loaded.folder)

    # A second load (another actor on the node) reuses the copy: nothing is downloaded again.
    def no_download(*args, **kwargs):
        raise AssertionError("the model was downloaded again")

    monkeypatch.setattr("spade_batch.formats.storage.get_file", no_download)
    again = SpadeModel.load(uri, s3.storage_options)
    assert again.folder == loaded.folder
    after = os.stat(again.folder)
    assert (after.st_ino, after.st_mtime_ns) == (stat.st_ino, stat.st_mtime_ns)
    assert_same_model(again, model, np.random.default_rng(6).standard_normal((10, DIM)))

    # A refit at the same URI (a new card) gets a fresh copy, not the stale one.
    monkeypatch.undo()
    monkeypatch.setenv("SPADE_BATCH_CACHE", str(cache))
    refit = make_model(tmp_path / "refit", raw_features(30, seed=7))
    refit = dataclasses.replace(refit, card=dataclasses.replace(refit.card, created="2100-01-01T00:00:00+00:00"))
    refit.save(uri, s3.storage_options)
    fresh = SpadeModel.load(uri, s3.storage_options)
    assert fresh.folder != loaded.folder
    assert_same_model(fresh, refit, np.random.default_rng(8).standard_normal((10, DIM)))


def test_a_damaged_s3_artifact_names_the_missing_file(tmp_path, s3, s3_bucket, monkeypatch):
    monkeypatch.setenv("SPADE_BATCH_CACHE", str(tmp_path / "cache"))
    uri = f"{s3_bucket}/models/m2"
    make_model(tmp_path / "built", raw_features(6)).save(uri, s3.storage_options)
    from spade_batch.formats import storage

    storage.remove(f"{uri}/global.faiss", s3.storage_options)
    with pytest.raises(FileNotFoundError, match="global.faiss"):
        SpadeModel.load(uri, s3.storage_options)
    assert not list((tmp_path / "cache").glob("*.partial"))  # no half copy is left behind


@pytest.mark.parametrize("damage", MIXES)
def test_a_half_synced_s3_model_is_refused_and_no_copy_of_it_is_kept(tmp_path, s3, s3_bucket, monkeypatch, damage):
    """The driver's check (sizes, small files) catches all but a same-size gallery file; the node-local copy
    catches that one before it is renamed into place."""
    monkeypatch.setenv("SPADE_BATCH_CACHE", str(tmp_path / "cache"))
    folder = tmp_path / "model"
    make_model(tmp_path / "built", raw_features(6, seed=1)).save(str(folder))
    make_model(tmp_path / "other", raw_features(6, seed=2, offset=0.5)).save(str(tmp_path / "other-model"))
    name = mix(folder, tmp_path / "other-model", damage)
    uri = f"{s3_bucket}/models/mixed"
    for path in folder.rglob("*"):
        if path.is_file():
            storage.put_file(str(path), f"{uri}/{path.relative_to(folder)}", s3.storage_options)
    message = rf"model file {uri}/{name} .*re-sync the whole model folder"
    if damage == "pyramid layer":
        verify_model(uri, load_card(uri, s3.storage_options), s3.storage_options)  # same size: the driver cannot tell
    else:
        with pytest.raises(ModelError, match=message):
            verify_model(uri, load_card(uri, s3.storage_options), s3.storage_options)
    with pytest.raises(ModelError, match=message):
        SpadeModel.load(uri, s3.storage_options)
    assert not [p.name for p in (tmp_path / "cache").iterdir() if p.is_dir()], "no damaged copy is kept, none half made"
