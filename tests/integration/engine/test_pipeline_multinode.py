"""The Ray pipeline on a simulated multi-node cluster (ray.cluster_utils.Cluster): real raylets on loopback.

A head node (1 CPU: decoding and writing) and two worker nodes that each declare 1 CPU and 1 GPU;
the model stage asks for a GPU per actor (gpus_per_task=1, the computation stays on the CPU:
torch sees no real GPU here), so each worker node holds exactly one model actor.

Ray is initialised once per process and the session's `ray_local` may already be up in this one,
so each cluster scenario runs in its own Python process (this file run as a script); it prints
its findings as JSON, and the test checks them and the output files.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

REPO = Path(__file__).resolve().parents[3]
SCENARIO_TIMEOUT_S = 300
REMOVED_NODE_TIMEOUT_S = 150
SPREAD_IMAGES = 24
REMOVE_IMAGES = 60
DELAY_S = 0.25


@dataclass(frozen=True)
class Prepared:
    model: str
    root: Path


def _settings(**overrides: Any):
    from tests import tiny

    return tiny.SETTINGS.replace(calibration_fraction=0.25, gpus_per_task=1.0, cpus_per_task=1.0, model_workers=2, **overrides)


def _images(folder: Path, count: int, seed: int) -> Path:
    """`count` small PNGs (48..80 px) under folder/good (normal images of a demo set)."""
    from spade_batch.formats.datasets import make_demo_data

    category = make_demo_data(str(folder), n_train=count, n_test_good=0, n_test_per_defect=0, min_size=48, max_size=80, seed=seed)
    return Path(category) / "train"


@pytest.fixture(scope="module")
def prepared(tmp_path_factory: pytest.TempPathFactory) -> Prepared:
    """A tiny model fitted in-process (no Ray) and saved to local disk, which every simulated node shares."""
    from spade_batch.formats.images import decode_image
    from spade_batch.method import detector

    root = tmp_path_factory.mktemp("multinode")
    train = _images(root / "fit", 8, seed=0)
    files = sorted(train.rglob("*.png"))
    images = [decode_image(f.read_bytes(), str(f)) for f in files]
    model = str(root / "model")
    detector.fit(images, _settings(), ids=[str(f.relative_to(train)) for f in files]).save(model)
    return Prepared(model, root)


def _marking_stage(folder: str, delay_s: float) -> type:
    """The real ScoreStage, which also leaves a file per batch (folder/<node id>.<uuid>.<images>) and
    takes delay_s longer per batch: the model stage is then the bottleneck, as on a real cluster,
    so both actors hold queued work (with the real stage alone, decoding on the head's CPUs may
    be the slower stage and one idle actor can take every batch)."""
    import uuid

    import ray

    from spade_batch.engine.stages import ScoreStage

    class MarkingStage(ScoreStage):
        def __call__(self, batch: dict[str, Any]) -> dict[str, Any]:
            time.sleep(delay_s)
            result = super().__call__(batch)
            node = ray.get_runtime_context().get_node_id()
            Path(folder, f"{node}.{uuid.uuid4().hex}.{len(batch['id'])}").touch()
            return result

    return MarkingStage


def _marked(folder: Path) -> dict[str, int]:
    """Images the model stage has computed so far, by node (retried batches counted again)."""
    counts: dict[str, int] = {}
    for marker in folder.iterdir():
        node, _, images = marker.name.split(".")
        counts[node] = counts.get(node, 0) + int(images)
    return counts


def _scenario(model: str, spread_images: str, spread_out: str, remove_images: str, remove_out: str) -> dict[str, Any]:
    """Run in a fresh process: start the cluster, score twice on it, report each run (or its error).

    "spread": score spread_images with both model actors up. "remove_node": score remove_images and,
    once a few scores parts are written, remove one worker node (its model actor dies with it).
    """
    import ray
    from ray.cluster_utils import Cluster

    from spade_batch.engine.score import run_score

    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 2, "include_dashboard": False})
    try:
        workers = [cluster.add_node(num_cpus=1, num_gpus=1) for _ in range(2)]
        ray.init(address=cluster.address)
        assert ray.util.get_node_ip_address() == "127.0.0.1", "the test cluster must stay on loopback"
        report: dict[str, Any] = {"head": cluster.head_node.node_id, "workers": [w.node_id for w in workers]}
        # Ray Data dispatches as soon as one actor of the pool is up; on a small, busy machine one
        # actor could score all images before the other has loaded. Wait for both.
        ray.data.DataContext.get_current().wait_for_min_actors_s = 120
        markers = Path(spread_out).parent / "markers-spread"
        markers.mkdir()
        stage = _marking_stage(str(markers), DELAY_S)
        report["spread"] = _timed(lambda: run_score(model, spread_images, spread_out, _settings(), stage=stage))
        report["spread"]["marked"] = _marked(markers)
        report["remove_node"] = _timed(lambda: _score_removing_a_node(cluster, workers[1], model, remove_images, remove_out))
        return report
    finally:
        ray.shutdown()
        cluster.shutdown()


def _timed(run: Any) -> dict[str, Any]:
    started = time.monotonic()
    try:
        value = run()
    except Exception as error:  # noqa: BLE001 - reported to the test, which fails with it
        return {"error": f"{type(error).__name__}: {error}", "seconds": time.monotonic() - started}
    summary, extra = value if isinstance(value, tuple) else (value, {})
    return {"images": summary.images, "scored": summary.scored, "failed": summary.failed, "retryable": summary.retryable,
            "workers": summary.workers, "model_workers": summary.model_workers, "seconds": time.monotonic() - started, **extra}


def _score_removing_a_node(cluster: Any, victim: Any, model: str, images: str, out: str) -> tuple[Any, dict[str, Any]]:
    from spade_batch.engine.score import run_score

    result: dict[str, Any] = {}
    markers = Path(out).parent / "markers-remove"
    markers.mkdir()
    stage = _marking_stage(str(markers), DELAY_S)

    def score() -> None:
        try:
            result["summary"] = run_score(model, images, out, _settings(batch_size=2, shard_size=2), stage=stage)
        except BaseException as error:  # noqa: BLE001 - re-raised below
            result["error"] = error

    thread = threading.Thread(target=score, daemon=True)
    thread.start()
    scores = Path(out) / "scores"
    deadline = time.monotonic() + 120
    # Remove the node once its actor has scored some batches (it has queued ones too: the model
    # stage is the bottleneck) and some scores parts are written.
    while not (scores.is_dir() and len(list(scores.glob("*.parquet"))) >= 2 and _marked(markers).get(victim.node_id, 0) >= 4):
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError(f"the removed node's actor did no work before the node was to be removed: {result}, {_marked(markers)}")
        time.sleep(0.05)
    written = sum(pq.read_metadata(p).num_rows for p in scores.glob("*.parquet"))
    before = _marked(markers)
    cluster.remove_node(victim)
    thread.join(REMOVED_NODE_TIMEOUT_S)
    if thread.is_alive():
        raise TimeoutError(f"the run did not finish within {REMOVED_NODE_TIMEOUT_S} s after a node was removed")
    if "error" in result:
        raise result["error"]
    return result["summary"], {"removed": victim.node_id, "rows_when_removed": written, "marked_before": before, "marked": _marked(markers)}


def _run_scenario(prepared: Prepared, spread: Path, remove: Path) -> dict[str, Any]:
    # Ray's files (the cluster address, unix sockets of at most 107 bytes, logs) go to a short
    # folder private to this run, never to the shared /tmp/ray.
    temp_dir = tempfile.mkdtemp(prefix="rmn", dir="/tmp")
    env = {**os.environ, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_TMPDIR": temp_dir,
           "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    args = [prepared.model, str(spread), str(prepared.root / "out-spread"), str(remove), str(prepared.root / "out-remove")]
    try:
        process = subprocess.run([sys.executable, __file__, *args], capture_output=True, text=True,
                                 timeout=SCENARIO_TIMEOUT_S, env=env, cwd=str(REPO), check=False)
    finally:
        shutil.rmtree(temp_dir, ignore_errors=True)
    lines = [line for line in process.stdout.splitlines() if line.startswith("RESULT ")]
    assert process.returncode == 0 and lines, f"the cluster scenario failed (rc {process.returncode}):\n{process.stdout[-4000:]}\n{process.stderr[-8000:]}"
    (prepared.root / "report.json").write_text(lines[-1][len("RESULT "):])  # kept with the outputs, for a failure's diagnosis
    return json.loads(lines[-1][len("RESULT "):])


def _check_outputs(out: Path, images: Path) -> dict[str, dict[str, Any]]:
    """Every image has exactly one row, no error, and its mask at its own size; returns the rows by id."""
    ids = sorted(str(p.relative_to(images)) for p in images.rglob("*.png"))
    rows = pa.concat_tables([pq.read_table(p) for p in sorted((out / "scores").glob("*.parquet"))]).to_pylist()
    listed = sorted(row["id"] for row in rows)
    assert listed == ids, "every image must have exactly one row"
    assert all(row["error"] is None for row in rows)
    masks = sorted(str(p.relative_to(out / "masks")) for p in (out / "masks").rglob("*.png"))
    assert masks == ids
    for image_id in ids:
        with Image.open(images / image_id) as source, Image.open(out / "masks" / image_id) as mask:
            assert mask.size == source.size and mask.mode == "L"
    return {row["id"]: row for row in rows}


@pytest.fixture(scope="module")
def cluster_runs(prepared: Prepared) -> dict[str, Any]:
    return _run_scenario(prepared, _images(prepared.root / "spread", SPREAD_IMAGES, seed=1),
                         _images(prepared.root / "remove", REMOVE_IMAGES, seed=2))


def _run(cluster_runs: dict[str, Any], name: str) -> dict[str, Any]:
    run = cluster_runs[name]
    assert "error" not in run, f"the {name} run failed: {run.get('error')}"
    return run


def test_model_work_lands_on_every_worker_node(prepared: Prepared, cluster_runs: dict[str, Any]) -> None:
    run = _run(cluster_runs, "spread")
    workers = run["workers"]
    assert run["model_workers"] == 2 and (run["images"], run["scored"], run["failed"]) == (SPREAD_IMAGES,) * 2 + (0,)
    assert sorted(w["node"] for w in workers.values()) == sorted(cluster_runs["workers"]), "one model actor on each GPU node"
    assert all(w["images"] > 0 for w in workers.values())
    assert sorted(run["marked"]) == sorted(cluster_runs["workers"])
    assert sum(w["images"] for w in workers.values()) == SPREAD_IMAGES
    assert [(w["backbone_loads"], w["gallery_loads"]) for w in workers.values()] == [(1, 1)] * 2
    out = prepared.root / "out-spread"
    assert json.loads((out / "run.json").read_text())["workers"] == workers
    _check_outputs(out, prepared.root / "spread" / "tiles" / "train")


def test_a_node_removed_mid_run_every_row_exactly_once_and_every_mask(prepared: Prepared, cluster_runs: dict[str, Any]) -> None:
    run = _run(cluster_runs, "remove_node")
    assert run["removed"] in cluster_runs["workers"]
    assert 0 < run["rows_when_removed"] < REMOVE_IMAGES, "the node must be removed while the run is under way"
    assert (run["images"], run["scored"], run["failed"], run["retryable"]) == (REMOVE_IMAGES, REMOVE_IMAGES, 0, 0)
    assert sum(w["images"] for w in run["workers"].values()) == REMOVE_IMAGES
    survivor = next(node for node in cluster_runs["workers"] if node != run["removed"])
    assert run["marked_before"][run["removed"]] > 0, "the removed node's model actor was working"
    assert run["marked"][run["removed"]] == run["marked_before"][run["removed"]], "nothing ran on the node after it was removed"
    # The survivor finished the run: it computed every image the removed node's actor had not
    # delivered (batches lost with the node are computed again, so marked may exceed the count).
    assert run["marked"].get(survivor, 0) > run["marked_before"].get(survivor, 0)
    assert sum(run["marked"].values()) >= REMOVE_IMAGES
    assert survivor in {w["node"] for w in run["workers"].values()}
    _check_outputs(prepared.root / "out-remove", prepared.root / "remove" / "tiles" / "train")


if __name__ == "__main__":
    print("RESULT " + json.dumps(_scenario(*sys.argv[1:6])), flush=True)
