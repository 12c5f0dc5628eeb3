"""A model's versions: which are published, which is current, a version's ancestors; models from before versions."""

from __future__ import annotations

import dataclasses
import json

import pytest

from spade_batch.config import Settings
from spade_batch.formats import storage
from spade_batch.formats.card import ModelCard, VersionRecord, load_card
from spade_batch.formats.images import Preprocessing
from spade_batch.formats.layout import ModelLayout
from spade_batch.formats.locks import LockHeldError, acquire_lock, release_lock
from spade_batch.formats.versions import current_number, lineage, make_current, next_number, resolve, version_numbers

CARD = ModelCard(settings=Settings().method, preprocessing=Preprocessing(), weights_sha256="sha256:0", layers=[], global_dim=1,
                 train_count=60, train_manifest_sha256="0", calibration_settings=Settings().calibration)


def publish(root: str, number: int, parent: int | None) -> None:
    """Write version `number`'s card (what publishes it), as fit (1) or add (2, 3, ...) does last."""
    card = dataclasses.replace(CARD, version=VersionRecord(number, parent, 5, "f" * 64))
    storage.write_text(ModelLayout(root).version(number).card, json.dumps(card.to_dict()))


def test_a_model_from_before_versions_is_version_1_and_current(tmp_path):
    old = CARD.to_dict()
    del old["version"], old["calibration_settings"]
    (tmp_path / "spade.json").write_text(json.dumps(old))
    assert version_numbers(str(tmp_path)) == [1] and current_number(str(tmp_path)) == 1
    assert resolve(str(tmp_path)).uri == str(tmp_path) and next_number(str(tmp_path)) == 2
    card = load_card(str(tmp_path))
    assert card.version == VersionRecord(1, None, None, None) and card.calibration_settings is None
    assert [v.number for v in lineage(str(tmp_path), 1)] == [1]


def test_the_newest_published_version_is_current_and_an_unpublished_one_does_not_exist(tmp_path):
    root = str(tmp_path)
    assert version_numbers(root) == []
    with pytest.raises(FileNotFoundError, match="no model at .*run `spade-batch fit` first"):
        current_number(root)
    for number, parent in ((1, None), (2, 1), (3, 2)):
        publish(root, number, parent)
    (tmp_path / "versions" / "4" / "features").mkdir(parents=True)  # an add killed before its card: not a version
    (tmp_path / "versions" / "4" / "features" / "inputs.json").write_text("{}")
    assert version_numbers(root) == [1, 2, 3] and current_number(root) == 3 and next_number(root) == 4
    assert resolve(root, 2).uri == str(tmp_path / "versions" / "2")
    with pytest.raises(ValueError, match="has no version 4; its versions are 1, 2, 3"):
        resolve(root, 4)


def test_a_version_made_current_stays_current_until_a_newer_one_is_published(tmp_path):
    root = str(tmp_path)
    for number, parent in ((1, None), (2, 1), (3, 2)):
        publish(root, number, parent)
    assert make_current(root, 2).number == 2
    assert current_number(root) == 2 and resolve(root).uri == str(tmp_path / "versions" / "2")
    assert version_numbers(root) == [1, 2, 3], "nothing is deleted"
    publish(root, 4, 2)  # the next add grows the current version
    assert current_number(root) == 4
    assert [v.number for v in lineage(root, 4)] == [1, 2, 4], "version 3 was set aside: not an ancestor"
    with pytest.raises(ValueError, match="has no version 7"):
        make_current(root, 7)
    assert current_number(root) == 4
    with pytest.raises(FileNotFoundError, match="no model at"):
        make_current(str(tmp_path / "none"), 1)
    assert not (tmp_path / "none").exists(), "no folder is left where there was no model"


def test_a_version_is_not_made_current_while_an_add_holds_the_model(tmp_path):
    """The add would publish a newer version seconds later, and the choice would be gone without a word."""
    root = str(tmp_path)
    for number, parent in ((1, None), (2, 1)):
        publish(root, number, parent)
    lock = acquire_lock(ModelLayout(root).lock, "spade-batch add to the model")
    with pytest.raises(LockHeldError, match="is held by spade-batch add to the model"):
        make_current(root, 1)
    release_lock(lock)
    assert current_number(root) == 2
    assert make_current(root, 1).number == 1 and current_number(root) == 1
    assert not storage.exists(ModelLayout(root).lock), "the lock is released"
