"""Fixtures of the reports' integration tests: a small demo category and a model fitted on it (shared; copy it
before changing it)."""

from __future__ import annotations

import os

import pytest

from spade_batch.engine.fit import run_fit
from spade_batch.formats.datasets import make_demo_data
from tests import tiny

SETTINGS = tiny.SETTINGS.replace(shard_size=8, batch_size=8, calibration_fraction=0.25)


@pytest.fixture(scope="session")
def category(tmp_path_factory) -> str:
    """Demo data (6 good + 3 per defect type in test) plus one undecodable test image."""
    root = make_demo_data(str(tmp_path_factory.mktemp("data")), n_train=16, n_test_good=6, n_test_per_defect=3,
                          min_size=64, max_size=96)
    with open(os.path.join(root, "test", "good", "999_broken.png"), "wb") as f:
        f.write(b"\x89PNG\r\n\x1a\n not really a png")
    return root


@pytest.fixture(scope="session")
def model_uri(ray_local, category, tmp_path_factory) -> str:
    """A model fitted on the category's train/good with SETTINGS; never changed (tests copy it)."""
    uri = str(tmp_path_factory.mktemp("model"))
    run_fit(os.path.join(category, "train"), uri, SETTINGS)
    return uri
