"""The command line as a new process against the S3 test server: no credential reaches any output.

The in-process checks of the command line are in tests/unit/test_cli.py.
"""

from __future__ import annotations

import io
import json
import os
import pathlib
import shutil
import subprocess
import sys
import tempfile

import numpy as np
from PIL import Image

from spade_batch.formats import listing, storage
from spade_batch.formats.datasets import make_demo_data
from tests.unit.test_cli import table

REPO = pathlib.Path(__file__).resolve().parents[2]


SECRETS = {
    "AWS_ACCESS_KEY_ID": "AKIAENVKEYID00000001",
    "AWS_SECRET_ACCESS_KEY": "env-secret-access-key-value",
    "AWS_SESSION_TOKEN": "env-session-token-value",
}


OPTION_SECRETS = {"key": "AKIAOPTKEYID00000002", "secret": "option-secret-value", "token": "option-session-token"}


def run_cli(*argv: str, env: dict[str, str]) -> subprocess.CompletedProcess:
    """`spade-batch argv` in a new process; stdout and stderr together."""
    return subprocess.run(
        [sys.executable, "-m", "spade_batch.cli", *argv],
        env={**os.environ, "PYTHONPATH": str(REPO), **env},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        timeout=300,
    )


def test_no_credential_reaches_the_output_at_debug_level(s3, s3_bucket):
    for name in ("a.png", "b.png"):
        buffer = io.BytesIO()
        Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(buffer, format="PNG")
        storage.write_bytes(storage.join(s3_bucket, "imgs", name), buffer.getvalue(), s3.storage_options)
    options = json.dumps({**OPTION_SECRETS, "client_kwargs": {"region_name": "us-west-2"}})
    common = ["--endpoint-url", s3.endpoint_url, "--storage-options", options, "--log-level", "DEBUG"]
    model, out = storage.join(s3_bucket, "model"), storage.join(s3_bucket, "out")

    dry_run = run_cli("score", "--model", model, "--images", storage.join(s3_bucket, "imgs"), "--out", out, "--dry-run", *common, env=SECRETS)
    failed_read = run_cli("score", "--model", model, "--images", "s3://no-such-bucket-here/imgs", "--out", out, "--dry-run", *common, env=SECRETS)

    assert dry_run.returncode == 0, dry_run.stdout
    assert table(dry_run.stdout)["images"] == ["2"]
    assert failed_read.returncode == 2 and "no-such-bucket-here" in failed_read.stdout
    for result in (dry_run, failed_read):
        for secret in (*SECRETS.values(), *OPTION_SECRETS.values()):
            assert secret not in result.stdout


def test_no_credential_reaches_any_byte_a_debug_fit_and_score_write(s3, s3_bucket):
    """fit and score on Ray at DEBUG, secrets in the environment and in --storage-options: every byte on
    stdout/stderr, in the outputs and model on S3, and in Ray's session folder (logs) is searched. One
    `nightly` process runs both (the model is missing: it is fitted, then the images are scored), on one Ray."""
    local = make_demo_data(tempfile.mkdtemp(), n_train=6, n_test_good=2, n_test_per_defect=1, min_size=32, max_size=40)
    fs, path = storage.filesystem(s3_bucket, s3.storage_options)
    fs.put(local, f"{path}/data", recursive=True)
    options = json.dumps({**OPTION_SECRETS, "client_kwargs": {"region_name": "us-west-2"}})
    common = ["--endpoint-url", s3.endpoint_url, "--storage-options", options, "--log-level", "DEBUG"]
    model, out = storage.join(s3_bucket, "model"), storage.join(s3_bucket, "out")
    ray_root = tempfile.mkdtemp(prefix="rs", dir="/tmp")  # short: Ray's unix socket paths are limited
    env = {**SECRETS, "RAY_TMPDIR": ray_root}
    try:
        nightly = run_cli("nightly", "--train", storage.join(s3_bucket, "data", "train"), "--model", model,
                          "--images", storage.join(s3_bucket, "data", "test"), "--out", out, "--backbone", "resnet18",
                          "--weights", "random", "--image-size", "32", "--k", "2", "--calibration-fraction", "0.3",
                          "--device", "cpu", "--save-maps", "--save-overlays", *common, env=env)
        assert nightly.returncode == 0, nightly.stdout[-3000:]
        assert f"nightly: no model at {model} yet; fitting it" in nightly.stdout, nightly.stdout[-3000:]
        written = {"nightly output": nightly.stdout.encode()}
        written.update({uri: storage.read_bytes(uri, s3.storage_options) for uri in listing.list_files(s3_bucket, None, s3.storage_options)})
        for folder, _, names in os.walk(ray_root):
            for name in names:
                file = os.path.join(folder, name)
                if os.path.isfile(file) and not os.path.islink(file):
                    with open(file, "rb") as f:
                        written[file] = f.read()
    finally:
        shutil.rmtree(ray_root, ignore_errors=True)
    assert any("/logs/" in name for name in written), "Ray's session logs were searched"
    assert any(name.endswith("run.json") for name in written) and any(name.endswith("/model/spade.json") for name in written)
    for secret in (*SECRETS.values(), *OPTION_SECRETS.values()):
        leaks = [name for name, data in written.items() if secret.encode() in data]
        assert not leaks, f"{secret} found in {leaks[:5]}"
