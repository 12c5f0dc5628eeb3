"""`ray job submit` of jobs/nightly.py to a Ray head that the test starts, on loopback only.

The head is a separate Ray (its own temp dir, ports and auth token), so it runs beside the
session's `ray_local` and beside any other Ray on this machine. It is stopped by process id, never
with `ray stop` (which stops every Ray of this machine): `ray start` runs in a new session, every
Ray daemon it starts stays in that session, and the workers are the raylet's children; teardown
signals exactly those processes.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from spade_batch.formats.datasets import make_demo_data
from tests import tiny

REPO = Path(__file__).resolve().parents[2]
RAY = Path(sys.executable).parent / "ray"  # the venv's ray, whose python has spade_batch installed

pytestmark = pytest.mark.skipif(not Path("/proc").is_dir(), reason="stopping the head by process id reads /proc (Linux)")


@dataclass(frozen=True)
class Head:
    """A running Ray head: its job API address and the environment that reaches it."""

    dashboard: str
    env: dict[str, str]


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def process_table() -> dict[int, tuple[int, int, str]]:
    """pid -> (parent pid, session id, state) of every process in /proc."""
    table = {}
    for entry in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{entry}/stat") as stat:
                fields = stat.read().rsplit(")", 1)[1].split()  # the name in (...) may hold spaces
        except OSError:
            continue  # exited meanwhile
        table[int(entry)] = (int(fields[1]), int(fields[3]), fields[0])
    return table


def session_processes(session: int) -> set[int]:
    """Live processes of `session` and all their descendants (a Ray worker may start its own group)."""
    table = {pid: row for pid, row in process_table().items() if row[2] != "Z"}
    found = {pid for pid, (_, sid, _) in table.items() if sid == session}
    while children := {pid for pid, (ppid, _, _) in table.items() if ppid in found} - found:
        found |= children
    return found


def stop_session(session: int, grace_s: float = 3.0) -> None:
    """SIGTERM the processes of `session` (and descendants), then SIGKILL what is left after grace_s."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid in session_processes(session):
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + grace_s
        while session_processes(session) and time.monotonic() < deadline:
            time.sleep(0.2)
    assert not session_processes(session), "the test's Ray head did not stop"


@pytest.fixture
def ray_head() -> Iterator[Head]:
    """`ray start --head` with the dashboard (the job API) on 127.0.0.1; stopped afterwards."""
    temp_dir = tempfile.mkdtemp(prefix="rayj", dir="/tmp")  # short: unix socket paths are limited
    env = {key: value for key, value in os.environ.items() if key != "RAY_ADDRESS"}
    env.update(
        RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0",  # bind and advertise 127.0.0.1 only
        # Ray's HTTP job API needs a token once any Ray on this machine has made ~/.ray/auth_token;
        # a token of our own keeps the test independent of that file.
        RAY_AUTH_MODE="token",
        RAY_AUTH_TOKEN=secrets.token_hex(32),
        PATH=f"{RAY.parent}{os.pathsep}{os.environ.get('PATH', '')}",  # `python` in the entrypoint is the venv's
    )
    dashboard_port = free_port()
    ports = {
        "--port": free_port(),
        "--dashboard-port": dashboard_port,
        "--ray-client-server-port": free_port(),
        "--dashboard-agent-listen-port": free_port(),
        "--dashboard-agent-grpc-port": free_port(),
        "--runtime-env-agent-port": free_port(),
        "--metrics-export-port": free_port(),
    }
    command = [
        str(RAY), "start", "--head", "--dashboard-host=127.0.0.1", "--num-cpus=2", f"--temp-dir={temp_dir}",
        "--include-dashboard=true", "--disable-usage-stats", *(f"{flag}={port}" for flag, port in ports.items()),
    ]
    log_path = Path(temp_dir) / "ray-start.log"
    with open(log_path, "w") as log:
        # A new session: every daemon `ray start` leaves behind can be found (and only those).
        start = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        if start.wait(timeout=180) != 0:
            pytest.fail(f"ray start failed (exit {start.returncode}):\n{log_path.read_text()}")
        assert (Path(temp_dir) / "ray_current_cluster").read_text().startswith("127.0.0.1:"), "the head must stay on loopback"
        yield Head(f"http://127.0.0.1:{dashboard_port}", env)
    finally:
        if start.poll() is None:
            start.kill()
            start.wait()
        stop_session(start.pid)
        shutil.rmtree(temp_dir, ignore_errors=True)


def test_nightly_job_fits_then_scores_the_archive_of_the_date(ray_head: Head, tmp_path: Path) -> None:
    data = Path(make_demo_data(str(tmp_path / "data"), n_train=6, n_test_good=2, n_test_per_defect=1, min_size=48, max_size=80))
    archive = tmp_path / "archive" / "2026-01-02"
    shutil.copytree(data / "test", archive)
    working_dir = tmp_path / "job"  # only jobs/: the job imports the installed package, not the repo
    shutil.copytree(REPO / "jobs", working_dir / "jobs", ignore=shutil.ignore_patterns("__pycache__"))
    model, out = tmp_path / "model", tmp_path / "out" / "2026-01-02"

    submit = subprocess.run(
        [
            str(RAY), "job", "submit", "--address", ray_head.dashboard, "--working-dir", str(working_dir),
            # One thread per process: the machine's cores are shared with the head's workers.
            "--runtime-env-json", json.dumps({"env_vars": {"OMP_NUM_THREADS": "1"}}),
            "--", "python", "jobs/nightly.py",
            "--train", str(data / "train"), "--model", str(model),
            "--images", str(tmp_path / "archive" / "{date}"), "--out", str(tmp_path / "out" / "{date}"),
            "--date", "2026-01-02", *tiny.flags(),
        ],
        env=ray_head.env, capture_output=True, text=True, timeout=400,
    )

    assert submit.returncode == 0, f"ray job submit failed:\n{submit.stdout}\n{submit.stderr}"
    ids = sorted(str(p.relative_to(archive)) for p in archive.rglob("*.png"))
    assert (model / "spade.json").is_file()
    run = json.loads((out / "run.json").read_text())
    assert (run["images"], run["scored"], run["failed"]) == (len(ids), len(ids), 0)
    rows = pq.read_table(out / "scores").to_pylist()
    assert sorted(row["id"] for row in rows) == ids
    for image_id in ids:
        mask = np.asarray(Image.open(out / "masks" / image_id))
        with Image.open(archive / image_id) as source:
            assert mask.shape == (source.height, source.width)
    assert sorted(str(p.relative_to(out / "masks")) for p in (out / "masks").rglob("*") if p.is_file()) == ids
