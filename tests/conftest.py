"""Fixtures both lanes use: a tiny model fitted in-process (no Ray, no S3).

Server and Ray fixtures are in tests/integration/conftest.py, where only the integration lane sees them.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import pytest

from spade_batch.config import Settings
from tests import tiny

# Ray reads this when it is imported (ray_constants), so it is set here, before any test module
# imports ray: a single-node Ray then binds and advertises 127.0.0.1 only.
os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
# One torch thread per process, read when torch is imported: `make test` runs two pytest processes on 2 cores, and a
# thread per core in each oversubscribes them (the unit lane in two processes: 88 s, 47 s with one thread each). Ray's
# model workers set their own (engine.runtime.ModelStage).
os.environ.setdefault("OMP_NUM_THREADS", "1")


@dataclass(frozen=True)
class TinyModel:
    """A small model fitted in-process (no Ray) and saved to a local folder, and its training images."""

    path: str
    train: str
    settings: Settings


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> TinyModel:
    """The tiny settings (tests/tiny.py), fitted on 8 demo images of 48-80 px, 2 held out to calibrate."""
    from pathlib import Path

    from spade_batch.formats.datasets import make_demo_data
    from spade_batch.formats.images import decode_image
    from spade_batch.method import detector

    root = tmp_path_factory.mktemp("tiny-model")
    category = Path(make_demo_data(str(root / "data"), n_train=8, n_test_good=2, n_test_per_defect=1, min_size=48, max_size=80))
    settings = tiny.SETTINGS.replace(calibration_images="held_out", calibration_fraction=0.25)
    train = sorted(category.joinpath("train").rglob("*.png"))
    model = detector.fit([decode_image(f.read_bytes(), str(f)) for f in train], settings,
                         ids=[str(f.relative_to(category / "train")) for f in train])
    model.save(str(root / "model"))
    return TinyModel(str(root / "model"), str(category), settings)
