"""add on Ray, local and on the S3 test server: fit on A, then add B, is one fit on A and B.

Per storage, one module fixture fits images A (5) and adds images B (3) on the session's local Ray; the
reference, A and B fitted in one go, is fitted once, in process (the pipeline's fit is the same recipe)
(resnet18, random weights, 64 px; a hold-out by id hash that takes images of both A and B, so that the
thresholds depend on both). The tests compare the two models, count what add extracted, and replay the
same add, an add of changed images and a killed add.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import os
import re
import signal
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pytest
import yaml

from spade_batch import cli
from spade_batch.config import CALIBRATION_KEYS, Settings
from spade_batch.engine.add import AddSummary, run_add
from spade_batch.engine.fit import run_fit
from spade_batch.engine.score import run_score
from spade_batch.exit_codes import ExitCode
from spade_batch.formats import parquet_parts, storage
from spade_batch.formats.card import load_card
from spade_batch.formats.datasets import make_demo_data
from spade_batch.formats.images import decode_image
from spade_batch.formats.layout import EvaluationOutputs, ModelLayout, Outputs, PlanOutputs, done_ids, part_files, record_inputs
from spade_batch.formats.locks import LockHeldError, acquire_lock, release_lock
from spade_batch.formats.manifest import build_manifest, pairs_sha256
from spade_batch.formats.model import SpadeModel
from spade_batch.formats.versions import current_number, make_current, resolve, version_numbers
from spade_batch.method import calibrate, detector
from tests import tiny
from tests.integration.conftest import copy_tree
from tests.integration.engine.test_faults import _gated_stage, cli_process, ray_address, running

if TYPE_CHECKING:
    from collections.abc import Callable

    from tests.integration.conftest import S3Server

pytestmark = pytest.mark.usefixtures("ray_local")

A = [f"good/{i:03d}.png" for i in range(5)]
B = [f"good/{i:03d}.png" for i in range(5, 8)]
# float16 features, extracted in other batches by the two fits: rounding differs by at most one step (2**-11).
FLOAT16_RTOL = 2.0**-10


@dataclass(frozen=True)
class Grown:
    """Where the images are, the model grown by add (A, then B) and the model fitted on A and B at once."""

    local: str  # the demo category folder on local disk
    root: str  # where images and models live (a local folder or a bucket)
    settings: Settings
    grown: str
    whole: str  # a local folder, shared by both storages' tests
    added: AddSummary

    @property
    def options(self) -> dict[str, Any]:
        return self.settings.fsspec_options()

    def image(self, split: str, image_id: str) -> np.ndarray:
        path = os.path.join(self.local, split, image_id)
        with open(path, "rb") as f:
            return decode_image(f.read(), path)

    def upload(self, files: dict[str, bytes], prefix: str) -> str:
        """Put files under root/prefix as the given ids; returns the prefix URI."""
        for image_id, data in files.items():
            storage.write_bytes(storage.join(self.root, prefix, image_id), data, self.options)
        return storage.join(self.root, prefix)

    def add(self, source: str, settings: Settings | None = None) -> AddSummary:
        """run_add of the images at source to the grown model."""
        return run_add(build_manifest(source, self.options), self.grown, settings or self.settings)

    def file(self, image_id: str, split: str = "train") -> bytes:
        with open(os.path.join(self.local, split, image_id), "rb") as f:
            return f.read()


SETTINGS = tiny.SETTINGS.replace(k=2, batch_size=2, shard_size=2, calibration_fraction=0.25, image_fpr=0.5)


@pytest.fixture(scope="module")
def category(tmp_path_factory: pytest.TempPathFactory) -> str:
    """The demo category both storages' models are made of, on local disk."""
    return make_demo_data(str(tmp_path_factory.mktemp("data")), n_train=12, n_test_good=1, n_test_per_defect=1, min_size=48, max_size=80)


@pytest.fixture(scope="module")
def whole(category: str, tmp_path_factory: pytest.TempPathFactory) -> str:
    """A model fitted on A and B at once by the in-process API (the pipeline's fit is the same recipe:
    tests/integration/engine/test_pipeline.py), in a local folder; never changed."""
    folder = str(tmp_path_factory.mktemp("whole") / "model")
    fit_in_process(category, A + B, folder)
    return folder


def fit_in_process(category: str, ids: list[str], folder: str | None = None) -> SpadeModel:
    """detector.fit on these training images of the category, with the module's settings."""
    images = [decode_image(Path(category, "train", image_id).read_bytes(), image_id) for image_id in ids]
    return detector.fit(images, SETTINGS, ids=ids, folder=folder)


@pytest.fixture(scope="module", params=["local", "s3"])
def grown(request: pytest.FixtureRequest, category: str, whole: str, tmp_path_factory: pytest.TempPathFactory) -> Grown:
    if request.param == "local":
        root, options = str(tmp_path_factory.mktemp("root")), {}
    else:
        s3: S3Server = request.getfixturevalue("s3")
        new_bucket: Callable[[], str] = request.getfixturevalue("new_bucket")
        root, options = new_bucket(), s3.storage_options
    settings = SETTINGS.replace(storage_options=options)
    held = [i for i in A + B if calibrate.is_held_out(i, settings.calibration_fraction, settings.seed)]
    assert set(held) & set(A) and set(held) & set(B) and len(set(A) - set(held)) >= settings.k  # the setup the tests need
    grown = Grown(category, root, settings, storage.join(root, "grown"), whole, None)  # type: ignore[arg-type]
    for name, ids in (("a", A), ("b", B)):
        grown.upload({image_id: grown.file(image_id) for image_id in ids}, name)
    run_fit(storage.join(root, "a"), grown.grown, settings)
    added = grown.add(storage.join(root, "b"), settings.replace(calibration_fraction=0.9))  # the model's own is used
    return Grown(category, root, settings, grown.grown, whole, added)


def test_fit_on_a_then_add_of_b_is_one_fit_on_a_and_b(grown: Grown) -> None:
    """The same gallery ids, calibration images, thresholds and scores on test images, as version 2 of the model."""
    assert version_numbers(grown.grown, grown.options) == [1, 2]
    added = SpadeModel.load(ModelLayout(grown.grown).version(2).root, grown.options)
    whole = SpadeModel.load(grown.whole)
    assert added.train_ids == whole.train_ids and set(added.train_ids) & set(B)
    assert added.card.calibration.count == whole.card.calibration.count >= 2
    assert added.card.calibration.image_scores == pytest.approx(whole.card.calibration.image_scores, rel=FLOAT16_RTOL)
    for kind in ("image", "pixel"):
        assert getattr(added.card.thresholds, kind) == pytest.approx(getattr(whole.card.thresholds, kind), rel=FLOAT16_RTOL)
    assert added.card.thresholds != SpadeModel.load(grown.grown, grown.options).card.thresholds, "version 1's thresholds were recalibrated"
    test_ids = ["good/000.png", "crack/000.png", "spot/000.png"]
    images = [grown.image("test", i) for i in test_ids]
    for a, b in zip(detector.score(added, images, grown.settings), detector.score(whole, images, grown.settings)):
        assert a.neighbours.tolist() == b.neighbours.tolist()
        assert a.score == pytest.approx(b.score, rel=FLOAT16_RTOL)
        np.testing.assert_allclose(a.anomaly_map, b.anomaly_map, rtol=FLOAT16_RTOL, atol=1e-4)
    uris = [storage.join(grown.root, "b", image_id) for image_id in B]
    assert (added.card.version.number, added.card.version.parent) == (2, 1)
    assert (added.card.version.images_added, added.card.version.added_sha256) == (3, pairs_sha256(B, [storage.normalize(u, grown.options) for u in uris]))


def test_adding_m_images_extracts_m_and_the_same_add_again_nothing(grown: Grown) -> None:
    summary = grown.added
    assert (summary.images, summary.added, summary.extracted, summary.skipped, summary.version, summary.parent) == (3, 3, 3, 0, 2, 1)
    parts = part_files(ModelLayout(grown.grown).version(2).features, grown.options)
    assert sum(parquet_parts.read_part(p, grown.options, columns=["id"]).num_rows for p in parts) == 3, "version 2's features: the added images only"

    again = grown.add(storage.join(grown.root, "b"))

    assert (again.added, again.extracted, again.skipped, again.version, again.published) == (0, 0, 3, 2, False)
    assert version_numbers(grown.grown, grown.options) == [1, 2]


def test_an_image_the_model_holds_with_other_bytes_is_refused_naming_it(grown: Grown) -> None:
    changed = grown.upload({"good/001.png": grown.file("good/006.png"), "good/100.png": grown.file("good/000.png")}, "changed")
    with pytest.raises(ValueError, match="1 images have the id of an image the model holds but other content .first: good/001.png."):
        grown.add(changed)
    assert version_numbers(grown.grown, grown.options) == [1, 2]


def test_a_second_add_while_one_holds_the_model_is_refused_with_the_lock_message(grown: Grown) -> None:
    lock = acquire_lock(ModelLayout(grown.grown).lock, "another add", grown.options)
    try:
        with pytest.raises(LockHeldError, match="is held by another add"):
            grown.add(storage.join(grown.root, "b"))
    finally:
        release_lock(lock, grown.options)


def test_an_add_to_where_no_model_is_says_so_and_leaves_no_folder(tmp_path: Path) -> None:
    images = tmp_path / "images"
    images.mkdir()
    (images / "a.png").write_bytes(b"never read")
    with pytest.raises(FileNotFoundError, match="no model at .*run `spade-batch fit` first"):
        run_add(build_manifest(str(images)), str(tmp_path / "none"), Settings(device="cpu"))
    assert not (tmp_path / "none").exists()


@pytest.mark.parametrize("grown", ["s3"], indirect=True)  # the store where a kill leaves most behind; local resumes as fit does
def test_a_killed_add_resumes_extracting_only_what_it_had_not_and_publishes_what_one_add_would(grown: Grown, faulty_s3: Any) -> None:
    """`spade-batch add` SIGKILLed once it has written a feature part, before publishing: version 3 is not
    published and the lock is left. The same command again breaks the dead process's lock, extracts only
    the images the killed one had not, and publishes version 3 as one uninterrupted add would: the
    re-run searches its calibration images on a model actor (--model-workers 1), from version 2's
    kept matches."""
    new = {f"good/{n:03d}.png": grown.file(f"good/{n:03d}.png") for n in range(8, 12)}  # images the model has not seen
    source = f"{faulty_s3.bucket}/killed-add"
    for image_id, data in new.items():
        storage.write_bytes(f"{source}/{image_id}", data, faulty_s3.direct_options)
    for image_id in list(new)[1:]:  # slow reads: the add is still extracting when it is killed
        faulty_s3.proxy.inject(f"killed-add/{image_id}", "delay", times=None, delay_s=1.5)
    options = {**faulty_s3.options, "config_kwargs": {"read_timeout": 10, "retries": {"total_max_attempts": 1}}}
    argv = ["add", "--model", grown.grown, "--images", source, "--shard-size", "1", "--batch-size", "1", "--device", "cpu",
            "--storage-options", json.dumps(options), "--ray-address", ray_address()]
    target = ModelLayout(grown.grown).version(3)

    killed = cli_process(argv)
    deadline = time.monotonic() + 240
    while not part_files(target.features, grown.options):
        assert killed.poll() is None and time.monotonic() < deadline, killed.communicate()[0]
        time.sleep(0.05)
    killed.send_signal(signal.SIGKILL)
    killed.communicate()
    assert version_numbers(grown.grown, grown.options) == [1, 2], "a version without its card is not published"
    assert storage.exists(ModelLayout(grown.grown).lock, grown.options)
    extracted_when_killed = len(done_ids(target.features, grown.options))

    for image_id in new:
        faulty_s3.proxy.inject(f"killed-add/{image_id}", "delay", times=0)
    rerun = cli_process([*argv, "--model-workers", "1"])
    printed = rerun.communicate(timeout=300)[0]

    assert rerun.returncode == 0, printed
    assert f"was left by spade-batch add to {grown.grown} (pid {killed.pid} on this host, no longer running); breaking it" in printed
    assert 0 < extracted_when_killed < len(new)
    assert re.search(rf"extracted now\s+{len(new) - extracted_when_killed}\b", printed), printed
    assert "calibration images retrieve the images they did in the version added to" in printed
    assert version_numbers(grown.grown, grown.options) == [1, 2, 3] and not storage.exists(ModelLayout(grown.grown).lock, grown.options)
    resumed = SpadeModel.load(target.root, grown.options)
    refit = fit_in_process(grown.local, sorted([*A, *B, *new]))
    assert resumed.train_ids == refit.train_ids and set(new) <= set(resumed.train_ids)
    for kind in ("image", "pixel"):
        assert getattr(resumed.card.thresholds, kind) == pytest.approx(getattr(refit.card.thresholds, kind), rel=FLOAT16_RTOL)


@pytest.mark.parametrize("grown", ["local"], indirect=True)
def test_a_score_under_way_while_add_publishes_a_version_keeps_the_version_it_started_with(grown: Grown, tmp_path: Path) -> None:
    """The score has chosen its version and its model actors wait at a gate; add publishes the next version
    (in process: the score's actors hold the session's CPUs); the gate opens and the score ends on the version it started with."""
    options = grown.options
    started_on = current_number(grown.grown, options)
    night = grown.upload({i: grown.file(i, "test") for i in ("good/000.png", "crack/000.png")}, "night-during-add")
    out, gate = Outputs(storage.join(grown.root, "out-during-add")), tmp_path / "gate"
    with running(lambda: run_score(grown.grown, night, out.root, grown.settings, stage=_gated_stage(str(gate)))) as outcome:
        deadline = time.monotonic() + 120
        while not storage.exists(out.inputs_json, options):  # written once the run has chosen its version
            assert time.monotonic() < deadline, "the score did not start"
            time.sleep(0.05)
        published = detector.add(grown.grown, [grown.image("train", "good/008.png")], ["good/008.png"], grown.settings)
        assert published.card.version.number == current_number(grown.grown, options) == started_on + 1
        gate.touch()
    assert "error" not in outcome, outcome.get("error")
    summary = outcome["result"]
    assert summary.model_version == started_on and json.loads(storage.read_text(out.run_json, options))["model_version"] == started_on
    assert summary.thresholds["image"] == load_card(ModelLayout(grown.grown).version(started_on).root, options).thresholds.image
    assert summary.thresholds["image"] != published.card.thresholds.image


@pytest.mark.parametrize("grown", ["local"], indirect=True)
def test_the_loop_a_night_reviewed_its_false_alarm_added_and_the_night_kept_on_its_version(
    grown: Grown, capsys: pytest.CaptureFixture[str]
) -> None:
    """Version 1 made current again; a night is scored on it; its review sheet is exported and filled in; the night's
    rerun is killed; the false alarm is added to version 1 (the next version, now current) while the night resumes, which keeps version 1
    to its end. The verdicts are counted; a score pinned to version 2 scores version 2; a refit drops the versions.
    It changes the model: a copy of the module's."""
    options = grown.options
    model = copy_tree(grown.grown, storage.join(grown.root, "loop-model"), options)
    make_current(model, 1, options)
    test_ids = sorted(os.path.relpath(os.path.join(d, f), os.path.join(grown.local, "test"))
                      for d, _, files in os.walk(os.path.join(grown.local, "test")) for f in files)
    night = grown.upload({i: grown.file(i, "test") for i in test_ids}, "night")
    out = Outputs(storage.join(grown.root, "out"))
    assert run_score(model, night, out.root, grown.settings).model_version == 1
    capsys.readouterr()
    assert cli.main(["score", "--model", model, "--images", night, "--out", out.root, "--device", "cpu"]) == 0  # resumed: nothing left
    report = storage.read_text(out.report, options)
    assert f"model {model} (version 1)" in report and f"spade-batch show {out.root} --top" in report and "--verdicts review.csv" in report
    capsys.readouterr()
    assert cli.main(["show", out.root, "--top", "3", "--format", "csv"]) == 0
    rows = list(csv.DictReader(io.StringIO(capsys.readouterr().out)))
    assert len(rows) >= 2 and all(row["verdict"] == "" for row in rows)  # the night flagged some images
    rows[0]["verdict"], rows[1]["verdict"] = "normal", "Defect"
    filled = io.StringIO()
    writer = csv.DictWriter(filled, fieldnames=list(rows[0]))
    writer.writeheader()
    writer.writerows([*rows, rows[0]])  # a row copied twice counts once
    sheet = storage.join(grown.root, "review.csv")
    storage.write_text(sheet, filled.getvalue(), options)

    lost = parquet_parts.read_part(out.parts(options).own[0], options, columns=["id"]).num_rows
    storage.remove(out.parts(options).own[0], options)  # killed: a part and run.json never written
    storage.remove(out.run_json, options)
    next_version = version_numbers(model, options)[-1] + 1  # other tests of this module may have published versions
    assert cli.main(["add", "--model", model, "--verdicts", sheet, "--device", "cpu"]) == 0
    added = load_card(ModelLayout(model).version(next_version).root, options).version
    assert (current_number(model, options), added.parent, added.images_added) == (next_version, 1, 1)
    resumed = run_score(model, night, out.root, grown.settings)

    assert (resumed.model_version, resumed.resumed, resumed.scored) == (1, len(test_ids) - lost, len(test_ids))
    assert resumed.thresholds["image"] == load_card(model, options).thresholds.image
    assert json.loads(storage.read_text(out.run_json, options))["model_version"] == 1
    capsys.readouterr()
    assert cli.main(["show", out.root, "--verdicts", sheet, "--json"]) == 0
    judged = json.loads(capsys.readouterr().out)
    assert (judged["flagged"], judged["reviewed"], judged["confirmed_defects"], judged["false_alarms"], judged["precision"]) == (
        resumed.anomalous, 2, 1, 1, 0.5)

    pinned = storage.join(grown.root, "pinned")
    assert cli.main(["score", "--model", model, "--images", night, "--out", pinned, "--model-version", "2", "--device", "cpu"]) == 0
    assert f"{model} (version 2)" in capsys.readouterr().out
    run = json.loads(storage.read_text(Outputs(pinned).run_json, options))
    assert run["model_version"] == 2 and run["thresholds"]["image"] == load_card(ModelLayout(model).version(2).root, options).thresholds.image

    nightly, evaluated = storage.join(grown.root, "nightly-pinned"), EvaluationOutputs(storage.join(grown.root, "evaluated"))
    assert cli.main(["nightly", "--train", storage.join(grown.root, "a"), "--model", model, "--images", night, "--out", nightly,
                     "--model-version", "2", "--device", "cpu"]) == 0
    assert cli.main(["evaluate", "--model", model, "--data", grown.local, "--out", evaluated.root, "--model-version", "2",
                     "--device", "cpu"]) == 0
    assert json.loads(storage.read_text(Outputs(nightly).run_json, options))["model_version"] == 2
    assert json.loads(storage.read_text(evaluated.metrics_json, options))["model_version"] == 2

    run_fit(storage.join(grown.root, "a"), model, grown.settings.replace(overwrite=True))
    assert version_numbers(model, options) == [1], "a refit replaces the model: its versions go with it"


@pytest.mark.parametrize("grown", ["local"], indirect=True)
def test_an_add_names_the_images_it_could_not_read_and_publishes_nothing_when_it_read_none(
    grown: Grown, capsys: pytest.CaptureFixture[str]
) -> None:
    """A corrupt file beside a good one: the good one is added, the corrupt one named, exit 3. The same add again is a
    no-op with the first run's outcome (issue 27.3; on main it tried the corrupt file again and exited 1): the corrupt
    file, recorded as failed with these bytes, is not tried again; nothing is published, exit 3. An add of only a new
    corrupt file publishes nothing, exit 1. Parts left unpublished by an add of other images (a killed one) are discarded
    by the next add instead of blocking it."""
    options = grown.options
    source = grown.upload({"good/corrupt.png": b"not an image", "good/009.png": grown.file("good/009.png")}, "with-a-corrupt-file")
    argv = ["add", "--model", grown.grown, "--images", source, "--device", "cpu"]
    capsys.readouterr()
    assert cli.main(argv) == ExitCode.IMAGES_FAILED
    printed = capsys.readouterr().out
    assert re.search(r"added\s+1\b", printed) and re.search(r"failed images\s+1\b", printed) and "failed: good/corrupt.png: " in printed
    published = version_numbers(grown.grown, options)[-1]
    card = load_card(ModelLayout(grown.grown).version(published).root, options)
    assert card.version.images_added == 1 and "good/corrupt.png" in {entry["id"] for entry in card.failed_train_images}
    assert "good/009.png" in SpadeModel.load(ModelLayout(grown.grown).version(published).root, options).train_ids

    assert cli.main(argv) == ExitCode.IMAGES_FAILED
    captured = capsys.readouterr()
    assert "unchanged" in captured.out and "failed: good/corrupt.png: " in captured.out and re.search(r"extracted now\s+0\b", captured.out)
    assert version_numbers(grown.grown, options)[-1] == published == current_number(grown.grown, options)
    assert not storage.exists(ModelLayout(grown.grown).version(published + 1).root, options)

    only_corrupt = grown.upload({"good/corrupt-2.png": b"not an image either"}, "only-a-corrupt-file")
    assert cli.main(["add", "--model", grown.grown, "--images", only_corrupt, "--device", "cpu"]) == ExitCode.FAILED
    captured = capsys.readouterr()
    assert "none of the 1 new images could be read; nothing published" in captured.err and "failed: good/corrupt-2.png: " in captured.out
    assert version_numbers(grown.grown, options)[-1] == published

    left = ModelLayout(grown.grown).version(published + 1)
    record_inputs(left.features, left.features_inputs, {"parent": published, "images": "other images"}, options)
    assert cli.main(["add", "--model", grown.grown, "--images", grown.upload({"good/010.png": grown.file("good/010.png")}, "after-a-kill"),
                     "--device", "cpu"]) == ExitCode.OK
    assert current_number(grown.grown, options) == published + 1
    assert "good/010.png" in SpadeModel.load(left.root, options).train_ids


def _storage_flags(grown: Grown) -> list[str]:
    """The command line's flags that reach grown's storage."""
    return ["--storage-options", json.dumps(grown.options)] if grown.options else []


def test_a_runs_masks_or_a_model_are_never_added_or_fitted_as_normal_images(grown: Grown, capsys: pytest.CaptureFixture[str]) -> None:
    """`add --images OUT` once added a run's 31 mask PNGs as normal images (image threshold 1.93 -> 114.9). A listing that is,
    lies inside or holds a run or a model is refused, exit 2, naming it; nothing is extracted or published."""
    options = grown.options
    night = grown.upload({i: grown.file(i, "test") for i in ("good/000.png", "crack/000.png")}, "night-outputs")
    out = Outputs(storage.join(grown.root, "out-outputs"))
    assert run_score(grown.grown, night, out.root, grown.settings).scored == 2
    versions = version_numbers(grown.grown, options)
    refused = {
        ("add", out.root): f"--images {out.root} is a run written by spade-batch ({storage.normalize(out.root, options)})",
        ("add", out.masks): f"--images {out.masks} lies inside a run written by spade-batch",
        ("add", grown.root): f"--images {grown.root} holds a ",  # a model (grown), or a run other tests left there
        ("fit", out.root): f"--train {out.root} is a run written by spade-batch",
    }
    fitted = storage.join(grown.root, "fitted-on-masks")
    for (command, source), message in refused.items():
        argv = (["add", "--model", grown.grown, "--images", source] if command == "add" else ["fit", "--train", source, "--model", fitted])
        capsys.readouterr()
        assert cli.main([*argv, "--device", "cpu", *_storage_flags(grown)]) == ExitCode.USAGE
        err = capsys.readouterr().err.splitlines()[-1]  # after the S3 test server's own log lines
        assert err.startswith(f"spade-batch {command}: error: ") and message in err and "never normal images" in err
    assert version_numbers(grown.grown, options) == versions and not storage.exists(fitted, options)


def test_a_score_or_fit_into_its_own_images_folder_is_refused_before_it_writes(grown: Grown, capsys: pytest.CaptureFixture[str]) -> None:
    """`score --images night3 --out night3/results` worked once, then its re-run listed its own masks as images ("holds a run
    with other images"): a killed run could not resume, and the next night scored the masks. --out and --images must be apart,
    and so must fit's (and add's) --model and images."""
    options = grown.options
    night = grown.upload({i: grown.file(i, "test") for i in ("good/000.png", "crack/000.png")}, "night-with-its-out")
    for out, relation in ((storage.join(night, "results"), "is inside"), (night, "is the same place as")):
        capsys.readouterr()
        code = cli.main(["score", "--model", grown.grown, "--images", night, "--out", out, "--device", "cpu", *_storage_flags(grown)])
        assert code == ExitCode.USAGE
        assert f"--out {storage.normalize(out, options)} {relation} --images {night}: the run's masks would be listed" in capsys.readouterr().err
    assert not storage.exists(storage.join(night, "results"), options) and not storage.exists(Outputs(night).inputs_json, options)
    model = storage.join(night, "model")  # a model inside its training images: a killed fit's parts would be listed on its re-run
    for argv in (["fit", "--train", night, "--model", model], ["add", "--model", model, "--images", night]):
        capsys.readouterr()
        assert cli.main([*argv, "--device", "cpu", *_storage_flags(grown)]) == ExitCode.USAGE
        assert f"--model {model} is inside {argv[1 if argv[0] == 'fit' else 3]} {night}: the model's files would be listed" in capsys.readouterr().err
    assert not storage.exists(model, options)


@pytest.mark.parametrize("grown", ["local"], indirect=True)
def test_nightly_and_plan_lines_refuse_calibration_settings_other_than_the_models_and_record_the_models(
    grown: Grown, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`nightly --image-fpr 0.2 --pixel-rule quantile` on an existing model once scored with the model's thresholds and recorded
    image_fpr 0.2 in run.json; a plan line's settings did the same from its second night. They are refused unless they are the
    model's (what its fit applied), and run.json records the model's calibration settings."""
    options = grown.options
    fitted = load_card(resolve(grown.grown, None, options).uri, options).calibration_settings
    assert fitted is not None and fitted.image_fpr == grown.settings.image_fpr == 0.5
    night = grown.upload({i: grown.file(i, "test") for i in ("good/000.png", "crack/000.png")}, "night-settings")
    nightly = ["nightly", "--train", storage.join(grown.root, "a"), "--model", grown.grown, "--images", night, "--device", "cpu"]
    out = storage.join(grown.root, "nightly-settings")
    capsys.readouterr()
    assert cli.main([*nightly, "--out", out, "--image-fpr", "0.2", "--pixel-rule", "quantile"]) == ExitCode.USAGE
    err = capsys.readouterr().err
    assert f"image_fpr=0.2 (model: 0.5), pixel_rule='quantile' (model: {fitted.pixel_rule!r}); drop these options" in err
    assert not storage.exists(out, options)
    assert cli.main([*nightly, "--out", out, "--image-fpr", "0.5"]) == ExitCode.OK  # the model's own value: applied when it was fitted
    recorded = json.loads(storage.read_text(Outputs(out).run_json, options))["settings"]
    assert {key: recorded[key] for key in CALIBRATION_KEYS} == dataclasses.asdict(fitted)

    line = {"train": storage.join(grown.root, "a"), "model": grown.grown, "images": night, "out": f"{grown.root}/plan-lines/{{name}}"}
    plan = tmp_path / "plan.yaml"
    plan.write_text(yaml.safe_dump({"lines": [{"name": "same", **line, "settings": {"image_fpr": 0.5}},
                                              {"name": "other", **line, "settings": {"image_fpr": 0.02}}]}))
    page = storage.join(grown.root, "plan-page")
    assert cli.main(["nightly", "--plan", str(plan), "--out", page, "--device", "cpu"]) == ExitCode.LINES_FAILED
    rows = {row["line"]: row for row in json.loads(storage.read_text(PlanOutputs(page).plan_json, options))["lines"]}
    assert rows["same"]["exit"] == 0 and rows["same"]["scored"] == 2
    assert rows["other"]["status"] == "failed" and "image_fpr=0.02 (model: 0.5)" in rows["other"]["error"]
    assert not storage.exists(storage.join(grown.root, "plan-lines", "other"), options)


@pytest.mark.parametrize("grown", ["local"], indirect=True)
def test_an_add_of_the_models_images_under_other_names_adds_nothing(grown: Grown, capsys: pytest.CaptureFixture[str]) -> None:
    """Issue 27.1 through Ray: the model's images given one level up (ids copy/good/NNN.png, the same bytes). On main: 'added 5'
    and a version whose calibration images each had their copy at distance 0. Now each is named with the id kept, nothing is
    published and the thresholds stay those of the current version."""
    options = grown.options
    current = current_number(grown.grown, options)
    thresholds = load_card(ModelLayout(grown.grown).version(current).root, options).thresholds
    source = grown.upload({f"copy/{image_id}": grown.file(image_id) for image_id in A}, "renamed")
    capsys.readouterr()
    assert cli.main(["add", "--model", grown.grown, "--images", source, "--device", "cpu"]) == ExitCode.OK
    printed = capsys.readouterr().out
    assert re.search(r"added\s+0\b", printed) and re.search(r"left out\s+5\b", printed) and "unchanged: nothing published" in printed
    assert all(f"left out: copy/{image_id}: same content as {image_id} (kept)" in printed for image_id in A), printed
    assert current_number(grown.grown, options) == current == version_numbers(grown.grown, options)[-1]
    assert load_card(ModelLayout(grown.grown).version(current).root, options).thresholds == thresholds
