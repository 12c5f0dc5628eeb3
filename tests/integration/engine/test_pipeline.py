"""The Ray pipeline end to end: a local Ray, a real S3 server (moto) on loopback, real PNG and Parquet.

One model is fitted per module (8 normal images, shards of 3, 2 held out for calibration: the held-out
mode with the pooled-quantile pixel rule and ungated masks, whose thresholds a test recomputes from the
held-out images; leave-one-out, the default, is compared with the in-process fit below) and one
archive of 5 test images is scored into it (shards of 3: counts that do not divide). Scores and maps
are compared with the in-process API (spade_batch.method.detector) on the same decoded images.
"""

from __future__ import annotations

import dataclasses
import io
import json
import logging
import math
import os
import posixpath
import re
import socket
import subprocess
import sys
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from spade_batch.config import ConfigError, Settings
from spade_batch.engine.fit import FitSummary, run_fit
from spade_batch.engine.score import ScoreSummary, run_score
from spade_batch.formats import listing, parquet_parts, storage
from spade_batch.formats.card import CARD_NAME
from spade_batch.formats.datasets import make_demo_data
from spade_batch.formats.heatmap import overlay
from spade_batch.formats.images import decode_image, resize_map
from spade_batch.formats.layout import Outputs
from spade_batch.formats.locks import LOCK_NAME, LockHeldError, acquire_lock, release_lock
from spade_batch.formats.model import SpadeModel
from spade_batch.method import calibrate, detector
from tests import tiny
from tests.integration.conftest import copy_tree

if TYPE_CHECKING:
    from collections.abc import Callable

    from tests.integration.conftest import S3Server

pytestmark = pytest.mark.usefixtures("ray_local")

N_TRAIN = 8
SHARD_SIZE = 3
# float16 keeps 11 significant bits: rounding a float32 map to it moves a value by at most 2**-11
# relative; 2**-10 also absorbs float32 noise between the two processes (batching, threads).
FLOAT16_RTOL = 2.0**-10


@dataclass(frozen=True)
class Fitted:
    """A model fitted through s3:// URIs and where its data lives (locally and on S3)."""

    bucket: str
    local: str  # the demo category folder on local disk
    train_uri: str
    test_uri: str
    model_uri: str
    settings: Settings

    def ids(self, split: str) -> list[str]:
        """Sorted ids (paths relative to the split folder) of the split's PNG files."""
        folder = os.path.join(self.local, split)
        return sorted(
            os.path.relpath(os.path.join(parent, name), folder)
            for parent, _, names in os.walk(folder)
            for name in names
            if name.endswith(".png")
        )

    def file(self, split: str, image_id: str) -> bytes:
        with open(os.path.join(self.local, split, image_id), "rb") as f:
            return f.read()

    def image(self, split: str, image_id: str) -> np.ndarray:
        """H x W x 3 uint8, decoded from the local copy."""
        return decode_image(self.file(split, image_id), image_id)


@pytest.fixture(scope="module")
def fitted(s3: S3Server, new_bucket: Callable[[], str], tmp_path_factory: pytest.TempPathFactory) -> Fitted:
    local = make_demo_data(
        str(tmp_path_factory.mktemp("data")), n_train=N_TRAIN, n_test_good=2, n_test_per_defect=1, min_size=48, max_size=80
    )
    bucket = new_bucket()
    fs, path = storage.filesystem(bucket, s3.storage_options)
    fs.put(local, f"{path}/data", recursive=True)
    settings = tiny.SETTINGS.replace(
        shard_size=SHARD_SIZE, calibration_images="held_out", calibration_fraction=0.2, pixel_rule="quantile", gate_masks=False,
        storage_options=s3.storage_options,  # workers reach moto with these
    )
    model_uri = f"{bucket}/model"
    run_fit(f"{bucket}/data/train", model_uri, settings)
    return Fitted(bucket, local, f"{bucket}/data/train", f"{bucket}/data/test", model_uri, settings)


@dataclass(frozen=True)
class Scored:
    out: Outputs
    summary: ScoreSummary


@pytest.fixture(scope="module")
def scored(fitted: Fitted) -> Scored:
    out = f"{fitted.bucket}/out"
    summary = run_score(fitted.model_uri, fitted.test_uri, out, fitted.settings.replace(save_maps=True))
    return Scored(Outputs(out), summary)


@pytest.fixture(scope="module")
def model(fitted: Fitted) -> SpadeModel:
    return SpadeModel.load(fitted.model_uri, fitted.settings.fsspec_options())


@dataclass(frozen=True)
class Uncalibrated:
    """A model fitted on the same training images without calibration images (never changed: tests copy it)."""

    model_uri: str
    settings: Settings
    summary: FitSummary


@pytest.fixture(scope="module")
def uncalibrated(fitted: Fitted) -> Uncalibrated:
    settings = fitted.settings.replace(calibration_fraction=0.0)
    model_uri = f"{fitted.bucket}/model-uncalibrated"
    return Uncalibrated(model_uri, settings, run_fit(fitted.train_uri, model_uri, settings))


# ---------------------------------------------------------------- helpers


def read_rows(out: str, settings: Settings) -> dict[str, dict[str, Any]]:
    """Every row of every scores part file under out, by id; fails on a duplicated id."""
    tables = [
        pq.read_table(io.BytesIO(storage.read_bytes(uri, settings.fsspec_options())))
        for uri in listing.list_files(storage.join(out, "scores"), (".parquet",), settings.fsspec_options())
    ]
    rows = pa.concat_tables(tables).to_pylist()
    by_id = {row["id"]: row for row in rows}
    assert len(by_id) == len(rows), "an image has more than one row"
    return by_id


def read_png(uri: str, settings: Settings) -> np.ndarray:
    with Image.open(io.BytesIO(storage.read_bytes(uri, settings.fsspec_options()))) as im:
        assert im.mode == "L"
        return np.asarray(im)


def read_json(uri: str, settings: Settings) -> dict[str, Any]:
    return json.loads(storage.read_text(uri, settings.fsspec_options()))


def files_under(uri: str, settings: Settings) -> dict[str, bytes]:
    """Relative path -> bytes of every file under uri."""
    options = settings.fsspec_options()
    root = storage.normalize(uri, options)
    return {f[len(root) + 1 :]: storage.read_bytes(f, options) for f in listing.list_files(root, None, options)}


def upload(fitted: Fitted, files: dict[str, bytes], prefix: str) -> str:
    """Put files under bucket/prefix as the given ids; returns the prefix URI."""
    for image_id, data in files.items():
        storage.write_bytes(f"{fitted.bucket}/{prefix}/{image_id}", data, fitted.settings.fsspec_options())
    return f"{fitted.bucket}/{prefix}"


def originals(fitted: Fitted, ids: list[str]) -> dict[str, bytes]:
    """The files of these test images, by id."""
    return {image_id: fitted.file("test", image_id) for image_id in ids}


# ---------------------------------------------------------------- fit and score end to end


def test_every_image_has_exactly_one_row(fitted: Fitted, scored: Scored) -> None:
    expected = fitted.ids("test")
    rows = read_rows(scored.out.root, fitted.settings)
    assert sorted(rows) == expected
    assert all(row["error"] is None for row in rows.values())
    for image_id, row in rows.items():
        assert row["uri"] == f"{fitted.test_uri}/{image_id}"


def test_part_files_hold_each_row_once_and_at_most_shard_size_rows(fitted: Fitted, scored: Scored) -> None:
    options = fitted.settings.fsspec_options()
    tests = len(fitted.ids("test"))
    parts = listing.list_files(storage.join(scored.out.root, "scores"), None, options)
    sizes = [pq.read_metadata(io.BytesIO(storage.read_bytes(p, options))).num_rows for p in parts]
    assert sum(sizes) == tests and max(sizes) <= SHARD_SIZE
    assert all(posixpath.basename(p).startswith("part-") for p in parts)
    features = listing.list_files(storage.join(fitted.model_uri, "features"), (".parquet",), options)
    rows = [pq.read_metadata(io.BytesIO(storage.read_bytes(p, options))).num_rows for p in features]
    assert sum(rows) == N_TRAIN and max(rows) <= SHARD_SIZE


def test_masks_at_the_original_size_of_each_image(fitted: Fitted, scored: Scored) -> None:
    options = fitted.settings.fsspec_options()
    ids = fitted.ids("test")
    masks = listing.list_files(storage.join(scored.out.root, "masks"), None, options)
    assert masks == sorted(scored.out.mask(i) for i in ids)
    assert scored.out.mask("good/000.png") == f"{scored.out.root}/masks/good/000.png"
    rows = read_rows(scored.out.root, fitted.settings)
    for image_id in ids:
        source = fitted.image("test", image_id)
        mask = read_png(scored.out.mask(image_id), fitted.settings)
        assert mask.shape == source.shape[:2]
        assert set(np.unique(mask)) <= {0, 255}
        assert rows[image_id]["mask_uri"] == scored.out.mask(image_id)
        assert (rows[image_id]["height"], rows[image_id]["width"]) == source.shape[:2]
        assert rows[image_id]["anomalous_fraction"] == pytest.approx((mask > 0).mean(), rel=1e-6)


def test_scores_and_maps_equal_the_in_process_api(fitted: Fitted, scored: Scored, model: SpadeModel) -> None:
    ids = fitted.ids("test")
    images = [fitted.image("test", i) for i in ids]
    extractor = detector.Extractor(fitted.settings)
    assert extractor.weights_sha256 == model.card.weights_sha256
    reference = detector.Scorer(model, extractor).score(images)
    rows = read_rows(scored.out.root, fitted.settings)
    pixel_threshold = model.card.thresholds.pixel
    for image_id, image, expected in zip(ids, images, reference):
        row = rows[image_id]
        assert row["image_score"] == pytest.approx(expected.score, rel=1e-5)
        assert row["max_pixel_score"] == pytest.approx(float(expected.anomaly_map.max()), rel=1e-5)
        assert row["neighbour_ids"] == [model.train_ids[n] for n in expected.neighbours]
        stored = np.load(io.BytesIO(storage.read_bytes(scored.out.map(image_id), fitted.settings.fsspec_options())))
        assert stored.dtype == np.float16 and stored.shape == (64, 64)
        np.testing.assert_allclose(stored.astype(np.float32), expected.anomaly_map, rtol=FLOAT16_RTOL, atol=0)
        # The mask is the in-process map resized to the original size and thresholded; pixels within
        # float noise of the threshold may go either way.
        full = resize_map(expected.anomaly_map, *image.shape[:2])
        mask = read_png(scored.out.mask(image_id), fitted.settings)
        clear = np.abs(full - pixel_threshold) > 1e-4 * pixel_threshold
        np.testing.assert_array_equal(mask[clear] == 255, full[clear] > pixel_threshold)


def test_neighbours_are_gallery_images_not_held_out_ones(fitted: Fitted, scored: Scored, model: SpadeModel) -> None:
    train_ids = fitted.ids("train")
    held_out = {i for i in train_ids if calibrate.is_held_out(i, fitted.settings.calibration_fraction, fitted.settings.seed)}
    assert held_out and len(train_ids) - len(held_out) >= fitted.settings.k  # the setup this module needs
    assert model.train_ids == sorted(set(train_ids) - held_out)
    for row in read_rows(scored.out.root, fitted.settings).values():
        assert len(row["neighbour_ids"]) == fitted.settings.k
        assert set(row["neighbour_ids"]) <= set(model.train_ids)


def test_calibration_thresholds_are_stored_and_applied(fitted: Fitted, scored: Scored, model: SpadeModel) -> None:
    card = read_json(storage.join(fitted.model_uri, CARD_NAME), fitted.settings)
    held_out = sorted(set(fitted.ids("train")) - set(model.train_ids))
    images = [fitted.image("train", i) for i in held_out]
    results = detector.score(model, images, fitted.settings)
    # The definition (calibrate.py): quantiles of the held-out normal images' scores and pixel samples.
    image_threshold = np.quantile([r.score for r in results], 1 - fitted.settings.image_fpr, method="higher")
    pixels = np.concatenate([calibrate.pixel_sample(r.anomaly_map) for r in results])
    pixel_threshold = np.quantile(pixels, fitted.settings.pixel_quantile, method="higher")
    assert card["calibration"]["count"] == len(held_out)
    # Calibration scores the held-out images from their stored features, whose pixel features are float16:
    # so are the maps, and the image score read off them.
    assert card["thresholds"]["image"] == pytest.approx(image_threshold, rel=FLOAT16_RTOL)
    assert card["thresholds"]["pixel"] == pytest.approx(pixel_threshold, rel=FLOAT16_RTOL)
    for row in read_rows(scored.out.root, fitted.settings).values():
        assert row["is_anomalous"] is (row["image_score"] > card["thresholds"]["image"])


@pytest.mark.parametrize(("calibration_images", "model_workers"), [("held_out", 0), ("leave_one_out", 1)],
                         ids=["held-out-in-the-driver", "leave-one-out-on-a-model-actor"])
def test_the_pipeline_fit_and_the_in_process_fit_are_one_recipe(
    fitted: Fitted, tmp_path: Any, caplog: pytest.LogCaptureFixture, calibration_images: str, model_workers: int
) -> None:
    """The same training images, among them a size outlier, and calibration images (held out, or scored
    leave-one-out): fit on Ray and fit in this process give the same gallery, the same left-out and
    calibration images, the same learnt scales (layer_normalise, image_score combined) and thresholds, and the
    same scores on the test images (float16 features, extracted in other batches). On this single CPU-only node
    fit scores its calibration images in the driver; with model_workers set, on model actors (as on a GPU or
    multi-node cluster): both give the in-process fit's."""
    train = tmp_path / "train"
    os.makedirs(train)
    for image_id in fitted.ids("train"):
        (train / image_id.replace("/", "-")).write_bytes(fitted.file("train", image_id))
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (12, 400, 3), dtype=np.uint8)).save(train / "strip.png")  # aspect 33:1
    ids = sorted(os.listdir(train))
    settings = fitted.settings.replace(calibration_images=calibration_images, calibration_fraction=0.6, calibration_sample=5,
                                       layer_normalise=True, image_score="combined", image_fpr=0.5, storage_options={},
                                       model_workers=model_workers)
    if calibration_images == "held_out":
        held = {i for i in ids if calibrate.is_held_out(i, 0.6, settings.seed)}
        assert "strip.png" not in held and 2 <= len(held) <= len(ids) - settings.k - 1  # a hold-out, and a gallery besides
        gallery, calibrated = sorted(set(ids) - held - {"strip.png"}), len(held)
    else:
        held, gallery, calibrated = set(), sorted(set(ids) - {"strip.png"}), 5

    with caplog.at_level(logging.INFO, logger="spade_batch.engine.fit_steps"):
        summary = run_fit(str(train), str(tmp_path / "model"), settings)
    assert ("in the driver" if model_workers == 0 else "on 1 model actors") in caplog.text
    on_ray = SpadeModel.load(str(tmp_path / "model"))
    in_process = detector.fit([decode_image((train / i).read_bytes(), i) for i in ids], settings, ids=ids)

    assert [entry["id"] for entry in summary.left_out] == ["strip.png"]
    assert on_ray.train_ids == in_process.train_ids == gallery
    assert on_ray.card.calibration.count == in_process.card.calibration.count == calibrated
    assert on_ray.card.calibration.image_scores == pytest.approx(in_process.card.calibration.image_scores, rel=FLOAT16_RTOL)
    for layer_on_ray, layer_in_process in zip(on_ray.gallery, in_process.gallery):
        np.testing.assert_allclose(layer_on_ray.astype(np.float32), layer_in_process.astype(np.float32), rtol=FLOAT16_RTOL, atol=1e-3)
    learnt, expected = (m.card.normalisation for m in (on_ray, in_process))
    np.testing.assert_allclose(learnt.layer_scales, expected.layer_scales, rtol=FLOAT16_RTOL)
    np.testing.assert_allclose([*learnt.knn, *learnt.map], [*expected.knn, *expected.map], rtol=FLOAT16_RTOL)
    for kind in ("image", "pixel"):
        assert getattr(on_ray.card.thresholds, kind) == pytest.approx(getattr(in_process.card.thresholds, kind), rel=FLOAT16_RTOL, abs=1e-3)

    test_images = [fitted.image("test", i) for i in fitted.ids("test")]
    for a, b in zip(detector.score(on_ray, test_images, settings), detector.score(in_process, test_images, settings)):
        assert a.neighbours.tolist() == b.neighbours.tolist()
        assert a.score == pytest.approx(b.score, rel=FLOAT16_RTOL, abs=1e-3)
        np.testing.assert_allclose(a.anomaly_map, b.anomaly_map, rtol=FLOAT16_RTOL, atol=1e-3)


def test_run_json_counts(fitted: Fitted, scored: Scored, model: SpadeModel) -> None:
    run = read_json(scored.out.run_json, fitted.settings)
    rows = read_rows(scored.out.root, fitted.settings)
    assert run["images"] == run["scored"] == len(rows) == 5
    assert (run["failed"], run["failures"], run["retryable"], run["resumed"]) == (0, [], 0, 0)
    assert run["anomalous"] == sum(row["is_anomalous"] for row in rows.values())
    assert run["mask_kind"] == "binary"
    assert run["thresholds"] == asdict(model.card.thresholds)
    assert run["model_uri"] == fitted.model_uri
    assert run["settings"]["storage_options"] == {key: "***" for key in fitted.settings.storage_options}
    assert run == json.loads(json.dumps(asdict(scored.summary)))


def test_the_gallery_loads_once_per_model_worker_and_run_and_the_backbone_at_most_once_not_per_batch(fitted: Fitted, scored: Scored) -> None:
    """A model worker's process keeps the backbone it built for an earlier run of the session (0 loads); the gallery is
    this run's own (1 load)."""
    run = read_json(scored.out.run_json, fitted.settings)
    workers = run["workers"]
    batches = math.ceil(len(fitted.ids("test")) / fitted.settings.batch_size)
    assert 1 <= len(workers) <= run["model_workers"]  # a worker that got no batch reports nothing
    assert sum(w["images"] for w in workers.values()) == 5
    assert {w["backbone_loads"] for w in workers.values()} <= {0, 1}
    assert [w["gallery_loads"] for w in workers.values()] == [1] * len(workers)
    assert len(workers) < batches or batches == 1


# ---------------------------------------------------------------- edge cases of the image set


def test_score_preprocesses_with_the_convention_recorded_in_the_model_card(fitted: Fitted, model: SpadeModel) -> None:
    """A card that records another mean/std than the backbone's own (a model fitted under another
    convention) is scored with the recorded one, as the in-process API does."""
    recorded = dataclasses.replace(model.card.preprocessing, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))
    other = dataclasses.replace(model, card=dataclasses.replace(model.card, preprocessing=recorded))
    other_uri = f"{fitted.bucket}/model-other-convention"
    other.save(other_uri, fitted.settings.fsspec_options())
    source = upload(fitted, {"only.png": fitted.file("test", "good/001.png")}, "convention")
    out = f"{fitted.bucket}/out-convention"
    run_score(other_uri, source, out, fitted.settings)
    row = read_rows(out, fitted.settings)["only.png"]

    image = fitted.image("test", "good/001.png")
    (expected,) = detector.score(other, [image], fitted.settings)
    (own_convention,) = detector.score(model, [image], fitted.settings)
    assert row["image_score"] == pytest.approx(expected.score, rel=1e-5)
    assert abs(row["image_score"] / own_convention.score - 1) > 0.01


def test_a_single_image_and_its_overlay_the_heat_map_over_the_original_image(fitted: Fitted, model: SpadeModel) -> None:
    source = upload(fitted, {"only.png": fitted.file("test", "spot/000.png")}, "single")
    out = Outputs(f"{fitted.bucket}/out-single")
    summary = run_score(fitted.model_uri, source, out.root, fitted.settings.replace(save_overlays=True))
    rows = read_rows(out.root, fitted.settings)
    assert list(rows) == ["only.png"] and rows["only.png"]["error"] is None
    assert (summary.images, summary.scored, summary.resumed) == (1, 1, 0)
    assert summary.model_workers == 1, "one batch starts one model actor, whatever the cores"
    image = fitted.image("test", "spot/000.png")
    assert read_png(out.mask("only.png"), fitted.settings).shape == image.shape[:2]
    with Image.open(io.BytesIO(storage.read_bytes(out.overlay("only.png"), fitted.settings.fsspec_options()))) as im:
        written = np.asarray(im.convert("RGB"))
    (expected,) = detector.score(model, [image], fitted.settings)
    full = resize_map(expected.anomaly_map, *image.shape[:2])
    reference = overlay(image, full, 0.0, 2 * model.card.thresholds.pixel)
    assert written.shape == image.shape
    assert np.abs(written.astype(int) - reference.astype(int)).max() <= 1  # float noise between processes


def test_an_empty_image_set_is_a_clear_error(fitted: Fitted) -> None:
    storage.write_text(f"{fitted.bucket}/empty/readme.txt", "no images here", fitted.settings.fsspec_options())
    with pytest.raises(ValueError, match=f"no image files .* found under {fitted.bucket}/empty"):
        run_score(fitted.model_uri, f"{fitted.bucket}/empty", f"{fitted.bucket}/out-empty", fitted.settings)
    with pytest.raises(ValueError, match=f"no image files .* found under {fitted.bucket}/empty"):
        run_fit(f"{fitted.bucket}/empty", f"{fitted.bucket}/model-empty", fitted.settings)
    assert not storage.exists(f"{fitted.bucket}/out-empty/scores", fitted.settings.fsspec_options())


def test_images_that_would_share_a_mask_path_get_an_error_row_and_the_others_are_scored(fitted: Fitted) -> None:
    jpeg = io.BytesIO()
    Image.fromarray(fitted.image("test", "good/000.png")).save(jpeg, format="JPEG")
    files = {"x/a.png": fitted.file("test", "good/000.png"), "x/a.jpg": jpeg.getvalue(), "y.png": fitted.file("test", "good/001.png")}
    source = upload(fitted, files, "same-stem")
    out = f"{fitted.bucket}/out-same-stem"
    summary = run_score(fitted.model_uri, source, out, fitted.settings)
    rows = read_rows(out, fitted.settings)
    rejected = f"{source}/x/a.png"  # x/a.jpg sorts first and keeps masks/x/a.png
    assert sorted(rows) == sorted([rejected, "x/a.jpg", "y.png"])
    assert rows[rejected]["error"].startswith("name rejected") and rows[rejected]["image_score"] is None
    assert rows["x/a.jpg"]["error"] is None and rows["x/a.jpg"]["mask_uri"] == Outputs(out).mask("x/a.jpg")
    assert (summary.images, summary.scored, summary.failed) == (3, 2, 1)


def test_a_corrupt_file_is_recorded_and_the_others_are_scored(fitted: Fitted) -> None:
    good = originals(fitted, ["good/000.png", "good/001.png", "spot/000.png"])
    truncated = fitted.file("test", "crack/000.png")[:200]
    source = upload(fitted, {**good, "bad/truncated.png": truncated}, "corrupt")
    out = f"{fitted.bucket}/out-corrupt"
    summary = run_score(fitted.model_uri, source, out, fitted.settings)
    rows = read_rows(out, fitted.settings)
    assert sorted(rows) == sorted([*good, "bad/truncated.png"])
    bad = rows["bad/truncated.png"]
    assert "bad/truncated.png" in bad["error"] and "cannot decode" in bad["error"]
    assert bad["image_score"] is None and bad["mask_uri"] is None
    assert all(rows[i]["error"] is None and rows[i]["image_score"] is not None for i in good)
    assert not storage.exists(Outputs(out).mask("bad/truncated.png"), fitted.settings.fsspec_options())
    run = read_json(Outputs(out).run_json, fitted.settings)
    assert (run["images"], run["scored"], run["failed"]) == (4, 3, 1)
    assert [f["id"] for f in run["failures"]] == ["bad/truncated.png"] and run["failures"][0]["error"] == bad["error"]
    assert summary.failed == 1


# ---------------------------------------------------------------- resume and overwrite


def test_a_killed_job_resumes_to_identical_outputs(fitted: Fitted) -> None:
    out = Outputs(f"{fitted.bucket}/out-resume")
    options = fitted.settings.fsspec_options()
    run_score(fitted.model_uri, fitted.test_uri, out.root, fitted.settings)
    complete = files_under(out.root, fitted.settings)
    rows = read_rows(out.root, fitted.settings)
    # A job killed while writing: one part file never written, one of its masks written, the other not.
    parts = listing.list_files(out.scores, None, options)
    lost = pq.read_table(io.BytesIO(storage.read_bytes(parts[0], options))).column("id").to_pylist()
    storage.remove(parts[0], options)
    storage.remove(out.mask(lost[0]), options)
    storage.remove(out.run_json, options)

    summary = run_score(fitted.model_uri, fitted.test_uri, out.root, fitted.settings)

    resumed = files_under(out.root, fitted.settings)
    assert resumed.keys() == complete.keys()
    for name in resumed:
        if name.startswith("masks/"):
            assert resumed[name] == complete[name], name
    again = read_rows(out.root, fitted.settings)
    assert again.keys() == rows.keys()
    for image_id, row in again.items():
        # Rescored images may share a backbone batch with other images this time: float noise only.
        floats = ("image_score", "max_pixel_score", "anomalous_fraction")
        assert {k: v for k, v in row.items() if k not in floats} == {k: v for k, v in rows[image_id].items() if k not in floats}
        assert [row[k] for k in floats] == pytest.approx([rows[image_id][k] for k in floats], rel=1e-5)
    assert (summary.resumed, summary.images, summary.scored) == (5 - len(lost), 5, 5)
    assert read_json(out.run_json, fitted.settings)["resumed"] == 5 - len(lost)


def test_other_images_into_the_same_output_need_overwrite(fitted: Fitted, scored: Scored) -> None:
    settings = fitted.settings.replace(save_maps=True)  # the module's run, copied: the first run here
    out = Outputs(copy_tree(scored.out.root, f"{fitted.bucket}/out-reuse", settings.fsspec_options()))
    second = upload(fitted, originals(fitted, ["crack/000.png"]), "second")
    with pytest.raises(FileExistsError, match=f"{out.root} holds a run with other images; pass --overwrite"):
        run_score(fitted.model_uri, second, out.root, settings)

    summary = run_score(fitted.model_uri, second, out.root, settings.replace(overwrite=True))

    assert list(read_rows(out.root, settings)) == ["crack/000.png"]
    for folder, path in (("masks", out.mask), ("maps", out.map)):
        written = listing.list_files(storage.join(out.root, folder), None, settings.fsspec_options())
        assert written == [path("crack/000.png")], f"{folder} of the replaced run must not stay behind"
    assert (summary.images, summary.resumed) == (1, 0)


def test_a_run_into_an_output_a_live_run_holds_is_refused_and_a_lock_left_by_a_killed_run_is_broken(fitted: Fitted) -> None:
    """A live holder's lock refuses the run, which writes nothing; once the holder is a killed run on this host
    (its pid names no process), the same run breaks the lock, scores, and releases its own."""
    out = f"{fitted.bucket}/out-locked"
    options = fitted.settings.fsspec_options()
    lock = acquire_lock(storage.join(out, LOCK_NAME), "the other nightly run", options)
    with pytest.raises(LockHeldError, match=f"{out}/{LOCK_NAME} is held by the other nightly run"):
        run_score(fitted.model_uri, fitted.test_uri, out, fitted.settings)
    assert listing.list_files(out, None, options) == [storage.join(out, LOCK_NAME)], "the refused run wrote nothing"
    release_lock(lock, options)
    killed = subprocess.Popen([sys.executable, "-c", "pass"])
    killed.wait()  # its pid now names no process
    record = {"uri": storage.join(out, LOCK_NAME), "owner": "a killed run", "host": socket.gethostname(),
              "pid": killed.pid, "since": "2026-01-01T00:00:00+00:00", "token": "stale"}
    storage.write_text(storage.join(out, LOCK_NAME), json.dumps(record), options)

    summary = run_score(fitted.model_uri, fitted.test_uri, out, fitted.settings)

    assert summary.scored == len(fitted.ids("test"))
    assert not storage.exists(storage.join(out, LOCK_NAME), options), "a finished run releases its lock"


# ---------------------------------------------------------------- model checks


def test_fit_refuses_to_replace_a_model_without_overwrite(fitted: Fitted) -> None:
    card = storage.read_text(storage.join(fitted.model_uri, CARD_NAME), fitted.settings.fsspec_options())
    with pytest.raises(FileExistsError, match=f"a model already exists at {fitted.model_uri}; pass --overwrite"):
        run_fit(fitted.train_uri, fitted.model_uri, fitted.settings)
    assert storage.read_text(storage.join(fitted.model_uri, CARD_NAME), fitted.settings.fsspec_options()) == card


def test_a_killed_fit_resumes_only_for_the_same_images(fitted: Fitted, uncalibrated: Uncalibrated) -> None:
    settings = uncalibrated.settings
    options = settings.fsspec_options()
    model_uri = copy_tree(uncalibrated.model_uri, f"{fitted.bucket}/model-resume", options)
    card_uri = storage.join(model_uri, CARD_NAME)
    complete = SpadeModel.load(model_uri, options)
    # Killed while extracting: no card yet, one feature part missing; another cut short since (a copy interrupted).
    storage.remove(card_uri, options)
    parts = listing.list_files(storage.join(model_uri, "features"), (".parquet",), options)
    storage.remove(parts[-1], options)
    storage.write_bytes(parts[0], storage.read_bytes(parts[0], options)[:-100], options)
    with pytest.raises(parquet_parts.DamagedPartError, match=rf"part file {re.escape(parts[0])} is damaged .*delete it and re-run the same command"):
        run_fit(fitted.train_uri, model_uri, settings)
    storage.remove(parts[0], options)  # as the message says
    run_fit(fitted.train_uri, model_uri, settings)
    resumed = SpadeModel.load(model_uri, options)
    assert resumed.train_ids == complete.train_ids
    for layer, expected in zip(resumed.gallery, complete.gallery):
        np.testing.assert_array_equal(layer, expected)
    np.testing.assert_array_equal(resumed.centre.global_mean, complete.centre.global_mean)

    storage.remove(card_uri, options)
    # Parts written by a release with another feature schema are never mixed into this one's gallery.
    inputs_uri = storage.join(model_uri, "features", "inputs.json")
    recorded = storage.read_text(inputs_uri, options)
    storage.write_text(inputs_uri, json.dumps({**json.loads(recorded), "feature_schema": 1}), options)
    with pytest.raises(FileExistsError, match=f"{model_uri}/features holds a run with other feature_schema; pass --overwrite"):
        run_fit(fitted.train_uri, model_uri, settings)
    storage.write_text(inputs_uri, recorded, options)
    others = upload(fitted, originals(fitted, fitted.ids("test")), "others")
    with pytest.raises(FileExistsError, match=f"{model_uri}/features holds a run with other images; pass --overwrite"):
        run_fit(others, model_uri, settings)
    run_fit(others, model_uri, settings.replace(overwrite=True))
    assert SpadeModel.load(model_uri, options).train_ids == fitted.ids("test")


def test_score_refuses_a_model_fitted_with_other_explicit_settings(fitted: Fitted) -> None:
    with pytest.raises(ConfigError, match=r"k=5 \(model: 3\)"):
        run_score(fitted.model_uri, fitted.test_uri, f"{fitted.bucket}/out-k", fitted.settings.replace(k=5), frozenset({"k"}))
    assert not storage.exists(f"{fitted.bucket}/out-k", fitted.settings.fsspec_options())


def test_without_calibration_masks_are_scaled_maps(fitted: Fitted, uncalibrated: Uncalibrated) -> None:
    settings, model_uri, summary = uncalibrated.settings, uncalibrated.model_uri, uncalibrated.summary
    card = read_json(storage.join(model_uri, CARD_NAME), settings)
    assert (card["thresholds"]["image"], card["thresholds"]["pixel"]) == (None, None)
    assert summary.calibration_images == 0 and summary.gallery_images == N_TRAIN

    source = upload(fitted, originals(fitted, ["good/000.png", "scratch/000.png"]), "uncal")
    out = Outputs(f"{fitted.bucket}/out-uncalibrated")
    run_score(model_uri, source, out.root, settings)

    run = read_json(out.run_json, settings)
    assert run["mask_kind"].startswith("scaled_map_per_image") and run["anomalous"] is None
    model = SpadeModel.load(model_uri, settings.fsspec_options())
    for image_id, row in read_rows(out.root, settings).items():
        assert row["is_anomalous"] is None and row["anomalous_fraction"] is None
        image = fitted.image("test", image_id)
        full = resize_map(detector.score(model, [image], settings)[0].anomaly_map, *image.shape[:2])
        expected = 255 * (full - full.min()) / (full.max() - full.min())
        mask = read_png(out.mask(image_id), settings)
        assert mask.min() == 0 and mask.max() == 255
        np.testing.assert_allclose(mask, expected, atol=0.5 + 1e-3)  # rounding to uint8, plus float noise


def test_options_beyond_the_paper_on_ray_equal_the_in_process_fit(fitted: Fitted) -> None:
    """layer_normalise, image_score combined and the search options (match_radius, feature_pool): fit on Ray learns
    the scales the in-process fit learns (from the same held-out images, stored as float16), and score on Ray writes
    the model's own combined scores and maps. The in-process restricted search and pooling equal numpy's
    (tests/unit/method/test_detector.py), so through Ray they do too."""
    settings = fitted.settings.replace(layer_normalise=True, image_score="combined", map_top=0.02, match_radius=16, feature_pool=3)
    model_uri = f"{fitted.bucket}/model-options"
    run_fit(fitted.train_uri, model_uri, settings)
    model = SpadeModel.load(model_uri, settings.fsspec_options())
    assert (model.card.settings.match_radius, model.card.settings.feature_pool) == (16, 3)
    ids = fitted.ids("train")
    in_process = detector.fit([fitted.image("train", i) for i in ids], settings, ids=ids)
    learnt, expected = (m.card.normalisation for m in (model, in_process))
    assert learnt.layer_scales is not None and learnt.knn is not None and learnt.map is not None
    np.testing.assert_allclose(learnt.layer_scales, expected.layer_scales, rtol=1e-2)
    np.testing.assert_allclose([*learnt.knn, *learnt.map], [*expected.knn, *expected.map], rtol=1e-2)
    assert model.card.thresholds.image == pytest.approx(in_process.card.thresholds.image, rel=1e-2, abs=1e-2)

    out = f"{fitted.bucket}/out-options"
    run_score(model_uri, fitted.test_uri, out, settings.replace(save_maps=True))
    rows = read_rows(out, settings)
    test_ids = fitted.ids("test")
    for image_id, result in zip(test_ids, detector.score(model, [fitted.image("test", i) for i in test_ids], settings)):
        assert rows[image_id]["image_score"] == pytest.approx(result.score, rel=1e-5, abs=1e-6)
        assert rows[image_id]["max_pixel_score"] == pytest.approx(float(result.anomaly_map.max()), rel=1e-5)
