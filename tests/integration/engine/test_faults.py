"""Faults through the real pipeline: what a nightly operator sees, and that nothing is lost or mixed.

Each scenario scores a small archive (demo images, 48-80 px, resnet18 with random weights at
64 px) on the session's local Ray, under one fault: storage throttling, resets and slow reads
from a fault-injecting proxy in front of the S3 server (tests/integration/fault_proxy.py); a model actor's
process SIGKILLed mid-run; the driver SIGKILLed mid-run, then the same command again; a second
run started into an output a first run holds. (A node removed from a multi-node cluster is in
tests/integration/engine/test_pipeline_multinode.py.) Each ends with every image's row present exactly once, masks
that equal the in-process API's (spade_batch.method.detector) on the same images, and the exit status
and message the operator acts on.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from spade_batch import cli
from spade_batch.config import Settings
from spade_batch.engine.score import run_score
from spade_batch.formats import listing, storage
from spade_batch.formats.images import decode_image, resize_map
from spade_batch.formats.layout import Outputs
from spade_batch.formats.locks import LOCK_NAME
from spade_batch.formats.manifest import output_stem
from spade_batch.formats.model import SpadeModel
from spade_batch.method import detector

pytestmark = pytest.mark.usefixtures("ray_local")

REPO = Path(__file__).resolve().parents[3]
RUN_FLAGS = ["--device", "cpu", "--batch-size", "1", "--shard-size", "1", "--model-workers", "1"]
"""Small batches and parts: many points at which a run can be interrupted. One model actor: what a fault does to a
run does not depend on how many there are (several, and one removed with its node, are in test_pipeline*.py), and
each actor's start (a process, torch, the backbone and the gallery) is most of a small run's time."""


@dataclass(frozen=True)
class Archive:
    """A fitted model (local folder) and test images with the masks the in-process API gives them."""

    model: str
    images: Path
    maps: dict[str, np.ndarray]  # id -> anomaly map at the image's original size
    pixel_threshold: float

    @property
    def ids(self) -> list[str]:
        return sorted(self.maps)

    def files(self) -> dict[str, bytes]:
        return {image_id: (self.images / image_id).read_bytes() for image_id in self.ids}

    def settings(self, **overrides: Any) -> Settings:
        """Run settings (the model's own come from its card)."""
        return Settings(**{"device": "cpu", "batch_size": 1, "shard_size": 1, **overrides})


@pytest.fixture(scope="module")
def archive(tiny_model: Any) -> Archive:
    images = Path(tiny_model.train) / "test"
    ids = sorted(str(f.relative_to(images)) for f in images.rglob("*.png"))
    decoded = [decode_image((images / i).read_bytes(), i) for i in ids]
    model = SpadeModel.load(tiny_model.path)
    maps = {i: resize_map(result.anomaly_map, *image.shape[:2])
            for i, image, result in zip(ids, decoded, detector.score(model, decoded, tiny_model.settings))}
    return Archive(tiny_model.path, images, maps, model.card.thresholds.pixel)


# ---------------------------------------------------------------- checks


def read_rows(out: str, options: dict[str, Any] | None) -> dict[str, dict[str, Any]]:
    """Every row of every scores part under out, by id; fails when an id has more than one row."""
    storage.filesystem(out, options)[0].invalidate_cache()  # other processes wrote there since this one last listed
    parts = listing.list_files(storage.join(out, "scores"), (".parquet",), options)
    rows = pa.concat_tables([pq.read_table(io.BytesIO(storage.read_bytes(p, options))) for p in parts],
                            promote_options="default").to_pylist()  # parts of an older version have fewer columns
    by_id = {row["id"]: row for row in rows}
    assert len(by_id) == len(rows), f"an image has more than one row: {sorted(row['id'] for row in rows)}"
    return by_id


def assert_complete(archive: Archive, out: str, options: dict[str, Any] | None, ids: list[str] | None = None) -> None:
    """Exactly one error-free row per image, and each mask equal to the in-process API's.

    Pixels within float noise (1e-4 relative) of the threshold may go either way: batch
    composition changes float rounding between processes.
    """
    ids = ids or archive.ids
    rows = read_rows(out, options)
    assert sorted(rows) == ids
    assert [i for i, row in rows.items() if row["error"] is not None] == []
    masks = listing.list_files(storage.join(out, "masks"), None, options)
    assert masks == sorted(Outputs(out).mask(i) for i in ids), "a mask is missing, or one is left from another run"
    for image_id in ids:
        with Image.open(io.BytesIO(storage.read_bytes(Outputs(out).mask(image_id), options))) as im:
            mask = np.asarray(im)
        expected = archive.maps[image_id]
        clear = np.abs(expected - archive.pixel_threshold) > 1e-4 * archive.pixel_threshold
        assert mask.shape == expected.shape
        np.testing.assert_array_equal(mask[clear] == 255, expected[clear] > archive.pixel_threshold, err_msg=image_id)


def run_cli_here(argv: list[str]) -> int:
    """`spade-batch argv` in this process (it joins the session's Ray); the root logger is restored after."""
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    try:
        return cli.main(argv)
    finally:
        root.handlers[:] = handlers
        root.setLevel(level)


def cli_process(argv: list[str], env: dict[str, str] | None = None) -> subprocess.Popen:
    """`spade-batch argv` as a new process, stdout and stderr together."""
    return subprocess.Popen([sys.executable, "-m", "spade_batch.cli", *argv], cwd=str(REPO),
                            env={**os.environ, "PYTHONPATH": str(REPO), **(env or {})},
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def ray_address() -> str:
    import ray

    return ray.get_runtime_context().gcs_address


def upload(files: dict[str, bytes], prefix: str, options: dict[str, Any]) -> str:
    for image_id, data in files.items():
        storage.write_bytes(storage.join(prefix, image_id), data, options)
    return prefix


# ---------------------------------------------------------------- storage faults


def test_throttled_reset_and_slow_reads_are_retried_and_a_persistent_fault_is_retried_by_a_plain_rerun(
    archive: Archive, faulty_s3: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    images = upload(archive.files(), f"{faulty_s3.bucket}/imgs", faulty_s3.direct_options)
    out = f"{faulty_s3.bucket}/out"
    throttled, reset, slow, down, mask_throttled = archive.ids[:5]
    proxy = faulty_s3.proxy
    # Ray workers retry under the session's SPADE_BATCH_RETRY (3 attempts, milliseconds apart; s3fs retries a
    # SlowDown 5 times within each): 7 SlowDowns and 2 resets pass; a key that answers SlowDown to every request does not.
    proxy.inject(f"imgs/{throttled}", "slowdown", times=7)
    proxy.inject(f"imgs/{reset}", "reset", times=2)
    proxy.inject(f"imgs/{slow}", "delay", times=1, delay_s=2.0)
    proxy.inject(f"imgs/{down}", "slowdown", times=None)
    proxy.inject(f"out/masks/{output_stem(mask_throttled)}.png", "slowdown", times=6, method="PUT")
    argv = ["score", "--model", archive.model, "--images", images, "--out", out, *RUN_FLAGS,
            "--storage-options", json.dumps(faulty_s3.options)]

    status = run_cli_here(argv)

    printed = capsys.readouterr()
    assert status == 75, printed
    assert "1 (transient read failures: re-run the same command)" in printed.out
    assert "1 images could not be read for a transient reason (e.g. " in printed.err and "re-run the same command" in printed.err
    for key in (f"imgs/{throttled}", f"imgs/{reset}", f"imgs/{slow}", f"out/masks/{output_stem(mask_throttled)}.png"):
        assert proxy.faults_served[key] >= 1, key
    assert down not in read_rows(out, faulty_s3.direct_options), "a transient failure is never recorded as a bad image"
    run = json.loads(storage.read_text(f"{out}/run.json", faulty_s3.direct_options))
    assert (run["retryable"], run["failed"], run["scored"]) == (1, 0, len(archive.ids) - 1)
    assert [f["id"] for f in run["retryable_failures"]] == [down] and "Re-run the same command" in run["retryable_failures"][0]["error"]

    for image_id in archive.ids:  # the faults pass; from now on count what the re-run reads
        proxy.inject(f"imgs/{image_id}", "slowdown", times=0)
    status = run_cli_here(argv)

    printed = capsys.readouterr()
    assert status == 0, printed
    drawn = report_images(out, faulty_s3.direct_options)
    assert {i: proxy.requests[f"imgs/{i}"] for i in archive.ids} == {i: int(i == down) + int(i in drawn) for i in archive.ids}, \
        "a plain re-run reads exactly the images that failed transiently (and the run report the anomalies it draws)"
    assert_complete(archive, out, faulty_s3.direct_options)
    run = json.loads(storage.read_text(f"{out}/run.json", faulty_s3.direct_options))
    assert (run["retryable"], run["resumed"], run["scored"]) == (0, len(archive.ids) - 1, len(archive.ids))


def report_images(out: str, options: Any) -> set[str]:
    """The ids whose original image the run report reads again, to draw them among the top anomalies."""
    from spade_batch.reports.run_report import read_run_scores

    return {str(row["id"]) for row in read_run_scores(out, options).top}


# ---------------------------------------------------------------- killed processes


def _killing_stage(calls_file: str, kill_on_call: int) -> type:
    """The real ScoreStage, whose process SIGKILLs itself on its kill_on_call-th batch (once per run)."""
    from spade_batch.engine.stages import ScoreStage

    class KillingStage(ScoreStage):
        def __call__(self, batch: dict[str, Any]) -> dict[str, Any]:
            with open(calls_file, "a") as calls:
                calls.write(f"{os.getpid()}\n")
            with open(calls_file) as calls:
                if len(calls.read().split()) == kill_on_call:
                    os.kill(os.getpid(), signal.SIGKILL)
            return super().__call__(batch)

    return KillingStage


def test_a_model_worker_killed_mid_run_is_replaced_and_nothing_is_lost(archive: Archive, tmp_path: Path) -> None:
    calls = tmp_path / "calls"
    out = str(tmp_path / "out")

    summary = run_score(archive.model, str(archive.images), out, archive.settings(), stage=_killing_stage(str(calls), 3))

    pids = calls.read_text().split()
    killed = pids[2]
    assert len(set(pids)) >= 2 and pids[-1] != killed, "the killed actor's process was replaced by a new one"
    with pytest.raises(ProcessLookupError):
        os.kill(int(killed), 0)
    assert (summary.scored, summary.failed, summary.retryable) == (len(archive.ids), 0, 0)
    assert_complete(archive, out, None)


def test_a_driver_killed_mid_run_resumes_with_the_same_command(archive: Archive, faulty_s3: Any, tmp_path: Path) -> None:
    """The driver (the spade-batch process) SIGKILLed once some scores parts are written; its lock is
    left behind. The same command again breaks the dead process's lock and scores only what is missing."""
    images = upload(archive.files(), f"{faulty_s3.bucket}/imgs", faulty_s3.direct_options)
    for image_id in archive.ids[2:]:  # slow reads (not timeouts): the run is still under way when it is killed
        faulty_s3.proxy.inject(f"imgs/{image_id}", "delay", times=None, delay_s=1.5)
    options = {**faulty_s3.options, "config_kwargs": {"read_timeout": 10, "retries": {"total_max_attempts": 1}}}
    out = tmp_path / "out"
    argv = ["score", "--model", archive.model, "--images", images, "--out", str(out), *RUN_FLAGS,
            "--storage-options", json.dumps(options), "--ray-address", ray_address()]

    driver = cli_process(argv)
    deadline = time.monotonic() + 240
    while not list(out.glob("scores/*.parquet")):
        assert driver.poll() is None and time.monotonic() < deadline, driver.communicate()[0]
        time.sleep(0.05)
    driver.send_signal(signal.SIGKILL)
    driver.communicate()
    done_when_killed = len(read_rows(str(out), None))
    assert 0 < done_when_killed < len(archive.ids) and (out / LOCK_NAME).exists()

    for image_id in archive.ids:
        faulty_s3.proxy.inject(f"imgs/{image_id}", "delay", times=0)
    rerun = cli_process(argv)
    printed = rerun.communicate(timeout=300)[0]

    assert rerun.returncode == 0, printed
    assert f"resumed (already done)  {done_when_killed}" in printed
    assert f"{out / LOCK_NAME} was left by spade-batch score into {out} (pid {driver.pid} on this host, no longer running); breaking it" in printed
    assert_complete(archive, str(out), None)
    assert not (out / LOCK_NAME).exists()
    drawn = report_images(str(out), None)
    assert sum(faulty_s3.proxy.requests[f"imgs/{i}"] for i in archive.ids) == len(archive.ids) - done_when_killed + len(drawn), \
        "the re-run reads only the images not yet scored (and the run report the anomalies it draws)"


# ---------------------------------------------------------------- concurrent runs


def _gated_stage(gate: str) -> type:
    """The real ScoreStage, which waits until the file `gate` exists before its first batch."""
    from spade_batch.engine.stages import ScoreStage

    class GatedStage(ScoreStage):
        def __call__(self, batch: dict[str, Any]) -> dict[str, Any]:
            while not os.path.exists(gate):
                time.sleep(0.05)
            return super().__call__(batch)

    return GatedStage


@contextlib.contextmanager
def running(target: Any) -> Iterator[dict[str, Any]]:
    """target() in a thread; yields a dict that holds its "result" or "error" once the block exits."""
    outcome: dict[str, Any] = {}

    def run() -> None:
        try:
            outcome["result"] = target()
        except BaseException as error:  # noqa: BLE001 - re-raised by the test
            outcome["error"] = error

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    try:
        yield outcome
    finally:
        thread.join(300)


def test_a_second_run_into_a_held_output_is_refused_and_nothing_is_mixed(archive: Archive, s3: Any, s3_bucket: str, tmp_path: Path) -> None:
    options = s3.storage_options
    files = archive.files()
    first_ids, second_ids = archive.ids[:3], archive.ids[3:]
    first = upload({i: files[i] for i in first_ids}, f"{s3_bucket}/first", options)
    second = upload({i: files[i] for i in second_ids}, f"{s3_bucket}/second", options)
    out = f"{s3_bucket}/out"
    gate = tmp_path / "gate"
    settings = archive.settings(storage_options=options)

    with running(lambda: run_score(archive.model, first, out, settings, stage=_gated_stage(str(gate)))) as outcome:
        deadline = time.monotonic() + 120
        while not storage.exists(storage.join(out, LOCK_NAME), options):
            assert time.monotonic() < deadline and not outcome, outcome
            time.sleep(0.05)
        region = json.dumps({"client_kwargs": {"region_name": options["client_kwargs"]["region_name"]}})
        other = cli_process(["score", "--model", archive.model, "--images", second, "--out", out, *RUN_FLAGS,
                             "--endpoint-url", s3.endpoint_url, "--storage-options", region])
        printed = other.communicate(timeout=300)[0]
        gate.touch()

    assert other.returncode == 2, printed
    assert f"spade-batch score: error: {out}/{LOCK_NAME} is held by spade-batch score into {out}" in printed
    assert f"delete {out}/{LOCK_NAME} and start this run again" in printed
    assert "error" not in outcome, outcome.get("error")
    assert outcome["result"].scored == len(first_ids)
    assert_complete(archive, out, options, first_ids)
    run = json.loads(storage.read_text(f"{out}/run.json", options))
    assert (run["images"], run["scored"]) == (len(first_ids), len(first_ids))
    assert not storage.exists(storage.join(out, LOCK_NAME), options)


# ---------------------------------------------------------------- a model that is not what its card says

MODEL_DAMAGES = {
    "nan pixel threshold": "spade.json",
    "string image threshold": "spade.json",
    "global.faiss of another fit (same N and D)": "global.faiss",
    "pyramid file cut short": "pyramid/layer1.npy",
    "half-synced folder: a pyramid file of another fit": "pyramid/layer2.npy",
}


def damage_model(source: str, target: Path, damage: str) -> str:
    """A copy of the model at source in target, with one damage of MODEL_DAMAGES; returns the damaged file's name."""
    import shutil

    import faiss

    shutil.copytree(source, target)
    name = MODEL_DAMAGES[damage]
    path = target / name
    if "threshold" in damage:
        card = json.loads(path.read_text())
        card["thresholds"] = {**card["thresholds"], **({"pixel": float("nan")} if "nan" in damage else {"image": "0.7"})}
        path.write_text(json.dumps(card))  # json writes NaN as the bare literal NaN, which json reads back
    elif name == "global.faiss":  # another fit of as many images: other vectors, the same N x D flat index
        index = faiss.read_index(str(path))
        vectors = index.reconstruct_n(0, index.ntotal) + 0.5
        other = faiss.IndexFlatL2(index.d)
        other.add(vectors)
        faiss.write_index(other, str(path))
        assert path.stat().st_size == (Path(source) / name).stat().st_size
    elif "cut short" in damage:
        path.write_bytes(path.read_bytes()[:-64])
    else:  # another fit's gallery of the same shape: other rows
        gallery = np.load(path)
        np.save(path, gallery[::-1].copy())
        assert path.stat().st_size == (Path(source) / name).stat().st_size
    return name


@pytest.mark.parametrize("where", ["local", "s3"])
@pytest.mark.parametrize("damage", list(MODEL_DAMAGES))
def test_a_model_that_is_not_what_its_card_says_is_refused_before_any_image_is_scored(
    archive: Archive, tiny_model: Any, tmp_path: Path, s3: Any, s3_bucket: str, where: str, damage: str,
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("SPADE_BATCH_CACHE", str(tmp_path / "cache"))  # no copy verified by another test
    name = damage_model(tiny_model.path, tmp_path / "model", damage)
    model, out, options = str(tmp_path / "model"), str(tmp_path / "out"), s3.storage_options
    flags = [*RUN_FLAGS, "--storage-options", json.dumps(options)]
    if where == "s3":
        model, out = f"{s3_bucket}/model", f"{s3_bucket}/out"
        for file in (tmp_path / "model").rglob("*"):
            if file.is_file():
                storage.put_file(str(file), f"{model}/{file.relative_to(tmp_path / 'model')}", options)

    status = run_cli_here(["score", "--model", model, "--images", str(archive.images), "--out", out, *flags])

    printed = capsys.readouterr()
    lines = [line for line in printed.err.strip().splitlines() if line.startswith("spade-batch")]  # less the logs
    assert status == 2, printed
    assert len(lines) == 1 and lines[0].startswith("spade-batch score: error: "), printed.err
    assert printed.err.strip().endswith(lines[0]) and "\x1b[" not in lines[0]
    assert f"{model}/{name}" in lines[0]
    if "threshold" in damage:
        assert "thresholds." in lines[0] and "fit the model again" in lines[0]
    else:
        assert "re-sync the whole model folder" in lines[0] and "fit the model again" in lines[0]
    assert not storage.exists(storage.join(out, "scores"), options) and not storage.exists(storage.join(out, "masks"), options), \
        "no image was scored"
    assert not storage.exists(storage.join(out, "run.json"), options)
    assert not [p.name for p in (tmp_path / "cache").glob("*") if p.is_dir()], "no damaged copy is kept"


# ---------------------------------------------------------------- an output location that cannot be written


def cli_without_root_powers(argv: list[str], ray_tmp: Path) -> subprocess.CompletedProcess:
    """`spade-batch argv` as a new process with its own Ray, unable to write where permissions forbid it.

    As root, permissions do not stop a write: the process, and so its Ray workers, run without the
    capabilities that bypass them (CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH)."""
    prefix = ["setpriv", "--bounding-set=-dac_override,-dac_read_search"] if os.geteuid() == 0 else []
    env = {key: value for key, value in os.environ.items() if key != "RAY_ADDRESS"}
    return subprocess.run([*prefix, sys.executable, "-m", "spade_batch.cli", *argv], cwd=str(REPO),
                          env={**env, "PYTHONPATH": str(REPO), "RAY_TMPDIR": str(ray_tmp)},
                          capture_output=True, text=True, timeout=400)


def one_error_line(printed: str) -> str:
    """The one line the CLI prints for a failed command: clean, and the only one of its kind (Ray's own
    logs may come before and after it)."""
    lines = [line for line in printed.strip().splitlines() if line.startswith("spade-batch score: ")]
    assert len(lines) == 1, printed
    assert "\x1b[" not in lines[0] and "UDF failed" not in lines[0] and "ActorDiedError" not in lines[0], lines[0]
    return lines[0]


@pytest.mark.parametrize("blocked", ["masks", "masks/good"])
def test_a_file_where_an_output_folder_should_be_is_one_line_naming_it(
    archive: Archive, tmp_path: Path, blocked: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """The output stage (a Ray task) cannot create the folder: the CLI names the file in the way, exit 1."""
    out = tmp_path / "out"
    (out / blocked).parent.mkdir(parents=True)
    (out / blocked).write_text("not a folder")

    status = run_cli_here(["score", "--model", archive.model, "--images", str(archive.images), "--out", str(out), *RUN_FLAGS])

    printed = capsys.readouterr()
    assert status == 1, printed
    line = one_error_line(printed.err)
    assert line == (f"spade-batch score: failed: {out / blocked}: a file is where a folder is needed; "
                    "remove or rename that file, or choose another output location")
    assert not (out / "run.json").exists()


@pytest.mark.parametrize("read_only", ["out", "out/masks"])
def test_a_read_only_output_folder_is_one_line_naming_it(archive: Archive, tmp_path: Path, read_only: str) -> None:
    """out: the driver cannot take the output's lock. out/masks: the output stage (a Ray task) cannot write a mask."""
    import shutil
    import tempfile

    out = tmp_path / "out"
    (tmp_path / read_only).mkdir(parents=True)
    (tmp_path / read_only).chmod(0o555)
    ray_tmp = Path(tempfile.mkdtemp(prefix="ray", dir="/tmp"))  # short: Ray's socket paths are limited to 107 bytes
    try:
        job = cli_without_root_powers(["score", "--model", archive.model, "--images", str(archive.images), "--out", str(out),
                                       *RUN_FLAGS], ray_tmp)
    finally:
        (tmp_path / read_only).chmod(0o755)
        shutil.rmtree(ray_tmp, ignore_errors=True)

    printed = job.stdout + job.stderr
    assert job.returncode == 1, printed
    line = one_error_line(job.stderr)
    folder = re.escape(str(out)) if read_only == "out" else re.escape(str(out / "masks")) + r"/\w+"  # a defect's folder
    assert re.fullmatch(rf"spade-batch score: failed: {folder}: permission denied; "
                        "give this job access there or choose another location", line), line
    assert not (out / "run.json").exists()


# ---------------------------------------------------------------- an output path the store cannot take


@pytest.mark.parametrize("where", ["local", "s3 (enforcing AWS's 1,024-byte keys)"])
def test_an_image_whose_outputs_would_not_fit_the_store_fails_alone(
    archive: Archive, tmp_path: Path, s3: Any, s3_bucket: str, where: str, capsys: pytest.CaptureFixture[str],
    request: pytest.FixtureRequest,
) -> None:
    """A deep path: the image is readable, but its mask's key (or local path) under OUT would be over the
    store's limit. It gets an error row naming the limit; the other images are scored (exit 3)."""
    from tests.integration.fault_proxy import AWS_MAX_KEY_BYTES, FaultProxy

    files = archive.files()
    segment = "d" * 200
    if where == "local":  # a 3,700-byte id: readable below imgs/, too long below a 500-byte OUT
        deep = "/".join([segment] * 18) + "/x.png"
        images, out, options = tmp_path / "imgs", tmp_path / ("o" * 250) / ("o" * 250), None
        for image_id, data in {**files, deep: files[archive.ids[0]]}.items():
            (images / image_id).parent.mkdir(parents=True, exist_ok=True)
            (images / image_id).write_bytes(data)
        images, out = str(images), str(out)
        limit = "4,000 bytes a local file system allows"
    else:  # an 814-byte id: its key below imgs/ fits, below a 205-byte OUT prefix it does not
        proxy = FaultProxy(s3.endpoint_url, max_key_bytes=AWS_MAX_KEY_BYTES)
        request.addfinalizer(proxy.close)
        options = s3.storage_options
        options["client_kwargs"]["endpoint_url"] = proxy.endpoint_url
        deep = "deep/" + "/".join([segment] * 4) + "/x.png"
        images = upload({**files, deep: files[archive.ids[0]]}, f"{s3_bucket}/imgs", options)
        out = f"{s3_bucket}/out-{'o' * 200}"
        limit = "1,024 bytes S3 allows"
        with pytest.raises(OSError, match="KeyTooLong|too long"):  # the proxy enforces AWS's limit, as the test server does not
            storage.write_bytes(Outputs(out).mask(deep), b"x", options)

    status = run_cli_here(["score", "--model", archive.model, "--images", images, "--out", out, *RUN_FLAGS,
                           "--storage-options", json.dumps(options or {})])

    printed = capsys.readouterr()
    assert status == 3, printed
    rows = read_rows(out, options)
    deep_uri = storage.join(images, deep)
    assert sorted(rows) == sorted([*archive.ids, deep_uri])
    assert [i for i, row in rows.items() if row["error"] is not None] == [deep_uri]
    assert rows[deep_uri]["error"].startswith("name rejected: its output ") and f"over the {limit}" in rows[deep_uri]["error"]
    run = json.loads(storage.read_text(Outputs(out).run_json, options))
    assert (run["images"], run["scored"], run["failed"]) == (len(archive.ids) + 1, len(archive.ids), 1)
    if where != "local":
        assert proxy.keys_refused == [Outputs(out).mask(deep).split("/", 3)[3]], "no other request was refused"


# ---------------------------------------------------------------- files in scores/ that the run did not write


@pytest.mark.parametrize("when", ["before the run", "between a run and its re-run"])
def test_stray_parquet_files_in_scores_are_reported_and_never_read(
    archive: Archive, tmp_path: Path, when: str, capsys: pytest.CaptureFixture[str],
) -> None:
    """Another run's part (rows for every image: read, they would mark every image done, or count each twice),
    a copy of a part under an older name, and a file that is not Parquet at all (read, it would be 'damaged')."""
    from spade_batch.formats.layout import part_name
    from spade_batch.formats.score_table import ScoreRow, write_scores

    out = tmp_path / "out"
    argv = ["score", "--model", archive.model, "--images", str(archive.images), "--out", str(out), *RUN_FLAGS]
    if when != "before the run":
        assert run_cli_here(argv) == 0
    scores = out / "scores"
    scores.mkdir(parents=True, exist_ok=True)
    foreign = [ScoreRow(id=i, uri=f"/elsewhere/{i}", image_score=1e9, is_anomalous=True) for i in archive.ids]
    strangers = [scores / part_name(archive.ids, "0badc0de"), scores / "part-0123456789abcdef.parquet", scores / "notes.parquet"]
    write_scores(str(strangers[0]), foreign)
    if when == "before the run":
        write_scores(str(strangers[1]), foreign)
    else:  # a copy of one of the run's own parts, under a name of another form
        strangers[1].write_bytes(sorted(scores.glob("part-*-*.parquet"))[0].read_bytes())
    strangers[2].write_bytes(b"not Parquet: someone's notes")
    capsys.readouterr()

    status = run_cli_here(argv)

    printed = capsys.readouterr()
    assert status == 0, printed
    assert f"3 Parquet files in {scores} are not this run's parts (e.g. " in printed.err
    assert "they are not read: remove them" in printed.err and "damaged" not in printed.err
    run = json.loads((out / "run.json").read_text())
    assert (run["images"], run["scored"], run["failed"]) == (len(archive.ids), len(archive.ids), 0)
    assert run["resumed"] == (0 if when == "before the run" else len(archive.ids))
    assert run["strangers"] == sorted(str(p) for p in strangers)
    own = Outputs(str(out)).parts(None)
    assert sorted(own.strangers) == sorted(str(p) for p in strangers)
    rows = [row for part in own.own for row in pq.read_table(part).to_pylist()]
    assert sorted(row["id"] for row in rows) == archive.ids and all(row["image_score"] < 1e9 for row in rows)

    assert run_cli_here(["show", str(out), "--json"]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert shown["counts"]["scored"] == len(archive.ids) and shown["failures"] == []
    assert all(row["image_score"] < 1e9 for row in shown["top"]), "the run's page and summary read only its own parts"


# ---------------------------------------------------------------- an image whose content changed under its name


def gallery_image(archive: Archive, tiny_model: Any) -> tuple[bytes, np.ndarray]:
    """A training image in the model's gallery (a normal image: its own pixels match it) and its anomaly map
    from the in-process API, at its size."""
    model = SpadeModel.load(archive.model)
    data = (Path(tiny_model.train) / "train" / model.train_ids[0]).read_bytes()
    image = decode_image(data, model.train_ids[0])
    (result,) = detector.score(model, [image], tiny_model.settings)
    return data, resize_map(result.anomaly_map, *image.shape[:2])


def images_at(archive: Archive, where: str, tmp_path: Path, s3: Any, bucket: str) -> tuple[str, str, dict[str, Any] | None]:
    """The archive's images copied to a local folder or a bucket: (images, out, storage options)."""
    if where == "local":
        upload(archive.files(), str(tmp_path / "imgs"), None)
        return str(tmp_path / "imgs"), str(tmp_path / "out"), None
    return upload(archive.files(), f"{bucket}/imgs", s3.storage_options), f"{bucket}/out", s3.storage_options


@pytest.mark.parametrize("where", ["local", "s3"])
def test_an_image_rewritten_with_other_content_or_whose_mask_is_gone_is_scored_again_and_keeps_one_row(
    archive: Archive, tiny_model: Any, tmp_path: Path, s3: Any, s3_bucket: str, where: str, capsys: pytest.CaptureFixture[str],
) -> None:
    """A camera uploads an image again with other pixels: the re-run scores it again (the listing's size and
    modification time, or its ETag, changed) and replaces its row, mask and map. A mask deleted since the run
    (its row still points at it) is written again the same way."""
    images, out, options = images_at(archive, where, tmp_path, s3, s3_bucket)
    argv = ["score", "--model", archive.model, "--images", images, "--out", out, *RUN_FLAGS, "--storage-options", json.dumps(options or {})]
    assert run_cli_here(argv) == 0
    before = read_rows(out, options)
    flagged = max((i for i in archive.ids if before[i]["is_anomalous"]), key=lambda i: before[i]["image_score"])
    assert storage.exists(Outputs(out).map(flagged), options)
    normal, normal_map = gallery_image(archive, tiny_model)
    storage.write_bytes(storage.join(images, flagged), normal, options)  # a normal image's pixels, under its name
    unmasked = next(i for i in archive.ids if i != flagged)
    storage.remove(Outputs(out).mask(unmasked), options)
    capsys.readouterr()

    status = run_cli_here(argv)

    printed = capsys.readouterr()
    assert status == 0, printed
    assert re.search(r"\nre-scored: changed +1 \(changed since the last run: rows, masks, maps replaced\)\n", printed.out)
    assert "1 images changed since they were scored" in printed.err
    assert re.search(r"\nre-scored: no mask +1 \(their masks were gone: written again\)\n", printed.out)
    assert "1 scored images have lost their mask" in printed.err
    after = read_rows(out, options)  # one row per image
    assert after[flagged]["image_score"] < before[flagged]["image_score"] and after[flagged]["is_anomalous"] is False
    assert after[flagged]["fingerprint"] != before[flagged]["fingerprint"]
    assert after[unmasked]["image_score"] == pytest.approx(before[unmasked]["image_score"], rel=1e-4)
    assert {i: row for i, row in after.items() if i not in (flagged, unmasked)} == \
        {i: row for i, row in before.items() if i not in (flagged, unmasked)}, "the other images are resumed, not scored again"
    assert not storage.exists(Outputs(out).map(flagged), options), "the map of its old verdict is gone with it"
    assert_complete(Archive(archive.model, archive.images, {**archive.maps, flagged: normal_map}, archive.pixel_threshold), out, options)
    run = json.loads(storage.read_text(Outputs(out).run_json, options))
    assert (run["changed"], run["restored"], run["resumed"], run["scored"]) == (1, 1, len(archive.ids) - 2, len(archive.ids))
    assert run["anomalous"] == sum(row["is_anomalous"] for row in after.values()) and run["pictures_missing"] == []


def test_a_re_run_over_a_killed_run_s_parts_and_an_older_version_s_scores_the_missing_and_the_changed(
    archive: Archive, tmp_path: Path, capsys: pytest.CaptureFixture[str],
) -> None:
    """What a re-run may find: a batch whose part was never written (the run was killed), a part written
    before fingerprints were kept (taken as unchanged), and an image changed since it was scored."""
    images, out, _ = images_at(archive, "local", tmp_path, None, "")
    argv = ["score", "--model", archive.model, "--images", images, "--out", out, *RUN_FLAGS]
    assert run_cli_here(argv) == 0
    before = read_rows(out, None)
    part_of = {pq.read_table(part).column("id")[0].as_py(): part for part in Outputs(out).parts(None).own}  # one image per part
    unwritten, older, changed = archive.ids[:3]
    os.remove(part_of[unwritten])
    pq.write_table(pq.read_table(part_of[older]).drop_columns(["fingerprint"]), part_of[older], write_page_checksum=True)
    (Path(images) / changed).write_bytes(archive.files()[unwritten])
    capsys.readouterr()

    status = run_cli_here(argv)

    printed = capsys.readouterr()
    assert status == 0, printed
    run = json.loads((Path(out) / "run.json").read_text())
    assert (run["changed"], run["restored"], run["resumed"], run["scored"]) == (1, 0, len(archive.ids) - 2, len(archive.ids))
    after = read_rows(out, None)
    assert after[older] == {**before[older], "fingerprint": None}, "a row without a fingerprint is resumed, as unchanged"
    assert after[changed]["image_score"] == pytest.approx(before[unwritten]["image_score"], rel=1e-4)
    assert_complete(Archive(archive.model, archive.images, {**archive.maps, changed: archive.maps[unwritten]}, archive.pixel_threshold),
                    out, None)


# ---------------------------------------------------------------- the run report never fails a scored run


def test_a_picture_gone_between_scoring_and_the_report_is_drawn_missing_and_the_run_exits_by_its_scoring(
    archive: Archive, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
) -> None:
    """While the run scored, one source image was moved away and one mask deleted: the report draws them grey
    with a note, and the run's status is what its scoring was (every image scored: 0)."""
    from spade_batch.engine import score as engine_score

    images, out, _ = images_at(archive, "local", tmp_path, None, "")
    moved, unmasked = archive.ids[:2]
    scoring = engine_score.run_score

    def then_lose_two_pictures(*args: Any, **kwargs: Any) -> Any:
        summary = scoring(*args, **kwargs)
        (Path(images) / moved).rename(tmp_path / "moved.png")
        Path(Outputs(out).mask(unmasked)).unlink()
        return summary

    monkeypatch.setattr(engine_score, "run_score", then_lose_two_pictures)
    status = run_cli_here(["score", "--model", archive.model, "--images", images, "--out", out, *RUN_FLAGS])

    printed = capsys.readouterr()
    assert status == 0, printed
    assert "[2 pictures missing]" in printed.out and re.search(rf"scored\s+{len(archive.ids)}\n", printed.out)
    assert f"report: the image of {moved} could not be read, drawn as missing: FileNotFoundError: " in printed.err
    assert f"report: the mask of {unmasked} could not be read, drawn as missing: FileNotFoundError: " in printed.err
    run = json.loads((Path(out) / "run.json").read_text())
    assert sorted((note["id"], note["picture"], note["transient"]) for note in run["pictures_missing"]) == \
        sorted([(moved, "image", False), (unmasked, "mask", False)])
    page = (Path(out) / "report.html").read_text()
    assert "2 pictures could not be read and are drawn grey" in page and "the image is no longer where it was scored" in page


def test_a_mask_that_cannot_be_read_for_a_transient_reason_is_retryable_and_the_re_run_draws_it(
    archive: Archive, faulty_s3: Any, capsys: pytest.CaptureFixture[str],
) -> None:
    """The store throttles every read of one mask while the report draws it: the run prints its summary and
    writes its report, the mask drawn grey, and exits 75; the re-run scores nothing and draws it."""
    images = upload(archive.files(), f"{faulty_s3.bucket}/imgs", faulty_s3.direct_options)
    out, image_id = f"{faulty_s3.bucket}/out", archive.ids[0]
    faulty_s3.proxy.inject(f"out/masks/{output_stem(image_id)}.png", "slowdown", times=None)
    argv = ["score", "--model", archive.model, "--images", images, "--out", out, *RUN_FLAGS, "--storage-options", json.dumps(faulty_s3.options)]

    status = run_cli_here(argv)

    printed = capsys.readouterr()
    assert status == 75, printed
    assert re.search(rf"scored\s+{len(archive.ids)}\n", printed.out) and "[1 pictures missing]" in printed.out
    assert f"report: the mask of {image_id} could not be read, drawn as missing: TransientStorageError: " in printed.err
    run = json.loads(storage.read_text(f"{out}/run.json", faulty_s3.direct_options))
    assert [(note["id"], note["picture"], note["transient"]) for note in run["pictures_missing"]] == [(image_id, "mask", True)]
    assert "re-run the same command to draw it" in storage.read_text(f"{out}/report.html", faulty_s3.direct_options)

    faulty_s3.proxy.inject(f"out/masks/{output_stem(image_id)}.png", "slowdown", times=0)
    assert run_cli_here(argv) == 0
    run = json.loads(storage.read_text(f"{out}/run.json", faulty_s3.direct_options))
    assert (run["resumed"], run["restored"], run["pictures_missing"]) == (len(archive.ids), 0, [])
    assert faulty_s3.proxy.requests[f"out/masks/{output_stem(image_id)}.png"] == 1, "the re-run read the mask once: to draw it"


def test_a_run_started_with_a_relative_out_resumes_from_another_folder(
    archive: Archive, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
) -> None:
    """Its rows name their masks by absolute paths; rows of an older version named them relative to where the
    run started, and the re-run and its report find the masks by the run's layout, not by that name."""
    images, _, _ = images_at(archive, "local", tmp_path, None, "")
    (tmp_path / "started-here").mkdir()
    monkeypatch.chdir(tmp_path / "started-here")
    assert run_cli_here(["score", "--model", archive.model, "--images", images, "--out", "runs/night", *RUN_FLAGS]) == 0
    out = tmp_path / "started-here" / "runs" / "night"
    assert all(row["mask_uri"] == Outputs(str(out)).mask(i) for i, row in read_rows(str(out), None).items())
    for part in Outputs(str(out)).parts(None).own:  # as an older version wrote them
        table = pq.read_table(part)
        relative = pa.array([os.path.relpath(uri) for uri in table.column("mask_uri").to_pylist()])
        pq.write_table(table.set_column(table.schema.get_field_index("mask_uri"), "mask_uri", relative), part, write_page_checksum=True)
    monkeypatch.chdir(tmp_path)
    capsys.readouterr()

    status = run_cli_here(["score", "--model", archive.model, "--images", images, "--out", "started-here/runs/night", *RUN_FLAGS])

    printed = capsys.readouterr()
    assert status == 0, printed
    run = json.loads((out / "run.json").read_text())
    assert (run["out_uri"], run["resumed"], run["restored"], run["pictures_missing"]) == (str(out), len(archive.ids), 0, [])


# ---------------------------------------------------------------- storage down when the run starts


@pytest.mark.parametrize("down", ["the endpoint refuses connections", "the model's files answer SlowDown"])
def test_storage_down_at_the_start_is_retryable(
    archive: Archive, faulty_s3: Any, down: str, capsys: pytest.CaptureFixture[str],
) -> None:
    """Before any image is read: the model card (or the listing) cannot be reached, or the model's files are
    throttled while the driver checks them against the card. Exit 75, never 'a damaged model' (2)."""
    model = f"{faulty_s3.bucket}/model"
    for file in Path(archive.model).rglob("*"):
        if file.is_file():
            storage.put_file(str(file), f"{model}/{file.relative_to(archive.model)}", faulty_s3.direct_options)
    options = faulty_s3.options
    if down == "the endpoint refuses connections":
        faulty_s3.proxy.close()
    else:
        for method in ("HEAD", "GET"):
            faulty_s3.proxy.inject("model/global.faiss", "slowdown", times=None, method=method)

    status = run_cli_here(["score", "--model", model, "--images", str(archive.images), "--out", f"{faulty_s3.bucket}/out", *RUN_FLAGS,
                           "--storage-options", json.dumps(options)])

    line = one_error_line(capsys.readouterr().err)
    assert status == 75, line
    assert "for a transient reason" in line and line.endswith("; re-run the same command")
