"""The fit recipe's suspect training images: listed always, left out only with suspects leave_out, and then the model
is the one a fit without them gives; an old card loads as the order statistic with no suspects."""

from __future__ import annotations

import json

import numpy as np
import pytest

from spade_batch.formats.card import CARD_NAME
from spade_batch.formats.datasets import make_demo_data, read_mvtec_category
from spade_batch.formats.model import SpadeModel
from spade_batch.method.detector import fit
from spade_batch.method.image_threshold import suspects
from tests.unit.method.test_detector import SETTINGS, load

LOO = SETTINGS.replace(calibration_images="leave_one_out", calibration_sample=0, image_fpr=0.05)


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> dict[str, np.ndarray]:
    """16 normal demo images (8 and their mirror images) and one of noise, by id."""
    root = make_demo_data(str(tmp_path_factory.mktemp("demo")), n_train=8, n_test_good=1, n_test_per_defect=1, min_size=64, max_size=64)
    normal = [load(sample.path) for sample in read_mvtec_category(root).train]
    found = {f"good-{i:02d}": image for i, image in enumerate(normal)}
    found |= {f"mirror-{i:02d}": np.ascontiguousarray(image[:, ::-1]) for i, image in enumerate(normal)}
    found["odd"] = np.random.default_rng(0).integers(0, 256, normal[0].shape, dtype=np.uint8)
    return found


def fitted(images: dict[str, np.ndarray], folder: str, **changes) -> SpadeModel:
    ids = sorted(images)
    return fit([images[i] for i in ids], LOO.replace(**changes), ids=ids, folder=folder)


@pytest.fixture(scope="module")
def kept(images, tmp_path_factory) -> SpadeModel:
    """The model of every image, suspects kept (the default)."""
    return fitted(images, str(tmp_path_factory.mktemp("keep")))


def test_suspects_are_listed_and_kept_by_default(images, kept):
    model = kept
    record = model.card.calibration
    assert [entry["id"] for entry in record.suspects][:1] == ["odd"] and not record.suspects_left_out
    assert "odd" in model.train_ids and record.count == len(images)
    scores = np.array(record.image_scores)
    assert [entry["score"] for entry in record.suspects] == [s.score for s in suspects([""] * scores.size, scores)]  # the same rule
    assert model.card.thresholds.image == np.quantile(scores, 1 - LOO.image_fpr, method="higher")
    assert record.image_estimator == "order_statistic" and record.fpr_law


def test_leaving_suspects_out_gives_the_model_a_fit_without_them_gives(images, kept, tmp_path):
    left = fitted(images, str(tmp_path / "leave_out"), suspects="leave_out")
    suspected = {entry["id"] for entry in kept.card.calibration.suspects}
    assert left.card.calibration.suspects == kept.card.calibration.suspects and left.card.calibration.suspects_left_out
    without = fitted({i: image for i, image in images.items() if i not in suspected}, str(tmp_path / "without"))
    assert left.train_ids == without.train_ids == sorted(set(images) - suspected)
    assert left.card.calibration.image_scores == pytest.approx(without.card.calibration.image_scores, rel=1e-5)
    assert (left.card.thresholds.image, left.card.thresholds.pixel) == pytest.approx(
        (without.card.thresholds.image, without.card.thresholds.pixel), rel=1e-5)
    assert left.card.thresholds.image < kept.card.thresholds.image
    reloaded = SpadeModel.load(left.folder)
    assert reloaded.card.calibration == left.card.calibration and reloaded.card.calibration_settings.suspects == "leave_out"


def test_an_old_card_loads_as_the_order_statistic_with_no_suspects_and_the_same_thresholds(kept, tmp_path):
    kept.save(str(tmp_path / "old"))
    card = json.loads((tmp_path / "old" / CARD_NAME).read_text())
    for key in ("image_estimator", "fpr_law", "suspects", "suspects_left_out"):
        del card["calibration"][key]
    for key in ("image_estimator", "suspects"):
        del card["calibration_settings"][key]
    (tmp_path / "old" / CARD_NAME).write_text(json.dumps(card))
    old = SpadeModel.load(str(tmp_path / "old")).card
    assert old.calibration.image_estimator == "order_statistic" and old.calibration.suspects == [] and old.calibration.fpr_law == []
    assert (old.calibration_settings.image_estimator, old.calibration_settings.suspects) == ("order_statistic", "keep")
    assert old.thresholds == kept.card.thresholds
