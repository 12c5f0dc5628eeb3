"""The fit recipe (method.recipe).

Content, not names, in training sets; what an add's version holds (issue 27, found-items 1 and 3).

In process (method.detector, the one recipe): the same content under two ids is used once, never calibrating
itself; near-duplicates are counted as a brute-force numpy search counts them; an add says which images its
version leaves out (older ones too) and publishes nothing when the gallery and calibration would not change.
The same through Ray is in tests/integration/engine/test_add.py.

Suspect training images: listed always, left out only with suspects leave_out, and then the model
is the one a fit without them gives; an old card loads as the order statistic with no suspects.
"""

from __future__ import annotations

import dataclasses
import json
import pathlib

import numpy as np
import pytest

from spade_batch.formats.calibration_matches import read_matches
from spade_batch.formats.card import CARD_NAME
from spade_batch.formats.datasets import make_demo_data, read_mvtec_category
from spade_batch.formats.feature_index import StoredFeatures
from spade_batch.formats.features import write_features
from spade_batch.formats.layout import ModelLayout, part_files
from spade_batch.formats.model import SpadeModel
from spade_batch.formats.versions import version_numbers
from spade_batch.method.calibration_search import calibration_scores
from spade_batch.method.detector import Extractor, _feature_table, add, fit
from spade_batch.method.image_threshold import suspects
from spade_batch.method.recipe import fit_from_features
from spade_batch.method.trainset import NEAR_FRACTION, NEAR_SCALE_RANK, exact_duplicates
from spade_batch.reports.summary import model_summary
from tests.unit.method.test_detector import SETTINGS, data, load  # noqa: F401 - the module's images

LOO = SETTINGS.replace(calibration_images="leave_one_out", calibration_sample=0, image_fpr=0.2, pixel_rule="quantile", pixel_quantile=0.9)
IDS = [f"{i:03d}.png" for i in range(6)]


def test_exact_duplicates_keep_one_copy_by_rank_then_id() -> None:
    hashes = {"b.png": "x", "a.png": "x", "c.png": "y", "old/z.png": "x", "d.png": None, "e.png": None}
    assert exact_duplicates(hashes) == {"b.png": "a.png", "old/z.png": "a.png"}
    assert exact_duplicates(hashes, lambda image_id: image_id != "old/z.png") == {"a.png": "old/z.png", "b.png": "old/z.png"}


def test_a_fit_on_two_copies_of_a_folder_is_the_fit_on_one(data, tmp_path):  # noqa: F811
    """Issue 27.1: ids copy/NNN.png with the bytes of NNN.png. On main every image's copy stayed in the gallery at distance 0:
    leave-one-out scores near 0 and a threshold that flags every normal image."""
    one = fit(data["train"], LOO, IDS, folder=str(tmp_path / "one"))
    two = fit([*data["train"], *data["train"]], LOO, [*IDS, *(f"copy/{i}" for i in IDS)], folder=str(tmp_path / "two"))

    assert two.train_ids == one.train_ids == IDS and two.card.calibration.count == one.card.calibration.count == len(IDS)
    assert two.card.calibration.image_scores == pytest.approx(one.card.calibration.image_scores, rel=1e-6)
    assert two.card.thresholds == one.card.thresholds
    assert min(two.card.calibration.image_scores) > 0.1 * float(np.median(one.card.calibration.image_scores))
    assert two.card.training.duplicates == [{"id": f"copy/{i}", "kept": i} for i in IDS]


def test_leave_one_out_never_scores_an_image_against_its_copy(data, tmp_path):  # noqa: F811
    """One image twice (a.png, b.png): its leave-one-out score is the score it has in the fit without the copy, far from 0."""
    images, ids = [*data["train"], data["train"][0]], [*IDS, "zz-copy.png"]
    with_copy = fit(images, LOO, ids, folder=str(tmp_path / "copy"))
    without = fit(data["train"], LOO, IDS, folder=str(tmp_path / "without"))
    assert "zz-copy.png" not in with_copy.train_ids and with_copy.card.training.duplicates == [{"id": "zz-copy.png", "kept": IDS[0]}]
    assert sorted(with_copy.card.calibration.image_scores) == pytest.approx(sorted(without.card.calibration.image_scores), rel=1e-6)


def test_near_duplicates_are_counted_as_a_brute_force_search_counts_them(data, tmp_path):  # noqa: F811
    """Two images with a near-copy (a pixel changed): the card's count, scale and examples are those of a numpy search of
    each calibration image's nearest other gallery images over the stored global features."""
    images, ids = list(data["train"]), list(IDS)
    for source in (1, 4):
        near = images[source].copy()
        near[0, 0] = 255 - near[0, 0]
        images.append(near)
        ids.append(f"near-{source}.png")
    model = fit(images, LOO, ids, folder=str(tmp_path / "near"))

    stored = StoredFeatures.index(part_files(ModelLayout(str(tmp_path / "near")).features, None))
    gallery = stored.global_features(model.train_ids).astype(np.float64)
    distances = ((gallery[:, None, :] - gallery[None, :, :]) ** 2).sum(-1)
    np.fill_diagonal(distances, np.inf)
    ranked = np.sort(distances, axis=1)
    nearest, scale = ranked[:, 0], float(np.median(ranked[:, min(NEAR_SCALE_RANK, len(ids) - 1) - 1]))
    flagged = [(model.train_ids[i], model.train_ids[int(distances[i].argmin())]) for i in np.argsort(nearest) if nearest[i] < NEAR_FRACTION * scale]

    record = model.card.training.near_duplicates
    assert (record.count, record.checked, record.fraction) == (len(flagged), len(ids), NEAR_FRACTION) and record.count >= 4
    assert record.scale == pytest.approx(scale, rel=1e-4)
    assert [(e["id"], e["neighbour"]) for e in record.examples] == flagged[: len(record.examples)]
    assert {frozenset(pair) for pair in flagged} == {frozenset({IDS[1], "near-1.png"}), frozenset({IDS[4], "near-4.png"})}


def test_an_add_of_the_same_images_under_other_names_adds_nothing_and_publishes_nothing(data, tmp_path):  # noqa: F811
    """Issue 27.1: the training folder added one level up (ids good/NNN.png, same pixels): on main 'added 6' and a
    version whose threshold collapsed; now no version, and the current one is returned."""
    folder = str(tmp_path / "model")
    fitted = fit(data["train"], LOO, IDS, folder=folder)
    again = add(folder, data["train"], [f"good/{i}" for i in IDS])
    assert version_numbers(folder) == [1] and again.folder == folder and again.card.thresholds == fitted.card.thresholds

    grown = add(folder, [data["test"][0], data["train"][2]], ["new.png", "good/x.png"])  # one new image, one copy
    assert grown.card.version.number == 2 and "new.png" in grown.train_ids and "good/x.png" not in grown.train_ids
    assert grown.card.version.left_out == [{"id": "good/x.png", "reason": f"same content as {IDS[2]} (kept)"}]


def test_an_add_whose_images_move_the_median_size_names_the_older_images_that_leave(data, tmp_path):  # noqa: F811
    """Issue 27.3: images ten times larger than the model's outnumber them: the median size moves and the older images leave
    the gallery. The version's card names them with why, and show lists them; on main neither did."""
    folder = str(tmp_path / "model")
    small = data["train"][:4]
    fit(small, LOO, IDS[:4], folder=folder)
    rng = np.random.default_rng(0)
    large = [rng.integers(0, 256, (320, 320, 3), dtype=np.uint8) for _ in range(5)]
    grown = add(folder, large, [f"large/{i}.png" for i in range(5)])

    left = grown.card.version.left_out
    assert [entry["id"] for entry in left] == IDS[:4] and all("is far from the other training images" in e["reason"] for e in left)
    assert grown.train_ids == [f"large/{i}.png" for i in range(5)] and grown.card.training.left_out == left
    shown = model_summary(folder)
    assert [entry["id"] for entry in shown["unused"]["images"]] == IDS[:4]
    assert shown["unused"]["by_version"] == [{"number": 2, "left_out": left}]


def test_an_add_whose_only_image_is_left_out_publishes_no_version(data, tmp_path):  # noqa: F811
    """Issue 27.3: one 600 x 40 image (far from the rest's aspect ratio): on main 'added 1' and a version with the same gallery."""
    folder = str(tmp_path / "model")
    fitted = fit(data["train"], LOO, IDS, folder=folder)
    strip = np.full((40, 600, 3), 128, np.uint8)
    returned = add(folder, [strip], ["strip.png"])
    assert version_numbers(folder) == [1] and returned.folder == folder and returned.card.thresholds == fitted.card.thresholds
    assert not (tmp_path / "model" / "versions" / "2").exists()


def test_a_card_from_before_the_training_record_loads_and_says_so(data, tmp_path):  # noqa: F811
    folder = str(tmp_path / "model")
    fit(data["train"], LOO, IDS, folder=folder)
    card = json.loads((tmp_path / "model" / CARD_NAME).read_text())
    del card["training"]
    card["version"] = {key: value for key, value in card["version"].items() if key != "left_out"}
    (tmp_path / "model" / CARD_NAME).write_text(json.dumps(card))
    shown = model_summary(folder)
    assert shown["unused"] == {"recorded": False, "images": [], "near_duplicates": {}, "by_version": []}
    grown = add(folder, [data["test"][0]], ["new.png"])  # the parent's images as the recipe selects them now
    assert grown.card.version.left_out == [] and set(grown.train_ids) == {*IDS, "new.png"}


def loo_scores(model, folder: str) -> dict[str, float]:
    """id -> leave-one-out image score of each calibration image, from the matches the fit kept (calibration.parquet)."""
    stored = read_matches((pathlib.Path(folder) / ModelLayout.calibration_matches).read_bytes(), model.card.layer_shapes)
    ids = sorted(stored)
    scores = calibration_scores(model, ids, {i: (0.0, stored[i]) for i in ids}, None)
    return dict(zip(ids, scores.map_scores.tolist()))


def test_a_copy_whose_content_hash_is_unknown_stays_in_the_gallery_but_never_calibrates_its_image(data, tmp_path):  # noqa: F811
    """Parts from before content hashes were recorded: the copy cannot be found by content and stays in the gallery. It is
    found as a near-duplicate, and each of the two is scored leave-one-out without the other: the score of 000.png in the
    fit without the copy (on main: about 0, the copy at distance 0)."""
    images, ids = [*data["train"], data["train"][0]], [*IDS, "copy.png"]
    extractor = Extractor(LOO)
    table = _feature_table(extractor, images, ids)
    folder = tmp_path / "unknown"
    write_features(str(folder / "features" / "part-0.parquet"), dataclasses.replace(table, sha256=[None] * len(ids)))
    with_copy = fit_from_features(StoredFeatures.index([str(folder / "features" / "part-0.parquet")]), extractor, LOO, str(folder)).model
    one = fit(data["train"], LOO, IDS, folder=str(tmp_path / "one"))

    assert "copy.png" in with_copy.train_ids and with_copy.card.training.duplicates == []
    assert with_copy.card.training.near_duplicates.neighbours == {IDS[0]: ["copy.png"], "copy.png": [IDS[0]]}
    scores, expected = loo_scores(with_copy, str(folder)), loo_scores(one, str(tmp_path / "one"))[IDS[0]]
    assert scores[IDS[0]] == pytest.approx(expected, rel=1e-5) and scores["copy.png"] == pytest.approx(expected, rel=1e-5)


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
