"""Synthetic production nights for the run-report, drift and plan tests: a line (fitted in process) and archives to score.

Normal images are the demo dataset's; a defective night pastes a seeded noise square over a third
of each normal image's side, far outside anything the gallery holds.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from spade_batch.formats.datasets import make_demo_data
from spade_batch.formats.images import decode_image
from spade_batch.method import detector
from tests import tiny

SETTINGS = tiny.SETTINGS.replace(calibration_fraction=0.3)
FLAGS = tiny.flags(SETTINGS)


@dataclass(frozen=True)
class Line:
    """One line's data on local disk: normal training images, a normal night, a defective night, a fitted model."""

    train: Path
    normal_night: Path
    model: Path


def make_line(root: Path, n_train: int = 30, night: int = 12, fit: bool = True) -> Line:
    """Demo data under root; the night folders hold `night` images each; the model is fitted when `fit`."""
    data = Path(make_demo_data(str(root / "data"), n_train=n_train + night, n_test_good=1, n_test_per_defect=0,
                               min_size=48, max_size=80))
    pictures = sorted((data / "train").rglob("*.png"))
    train, normal_night = root / "train", root / "nights" / "normal"
    train.mkdir(parents=True)
    normal_night.mkdir(parents=True)
    for index, picture in enumerate(pictures):
        picture.rename((normal_night if index < night else train) / picture.name)
    line = Line(train, normal_night, root / "model")
    if fit:  # in process: what the nights test is the scoring of them, and the fit on Ray is the same recipe
        pictures = sorted(line.train.glob("*.png"))
        detector.fit([decode_image(p.read_bytes(), p.name) for p in pictures], SETTINGS, ids=[p.name for p in pictures],
                     folder=str(line.model))
    return line


def defective_night(line: Line, folder: Path, seed: int = 0) -> Path:
    """The normal night's images, each with a noise square over a third of its side; returns folder."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True)
    for picture in sorted(line.normal_night.glob("*.png")):
        image = np.asarray(Image.open(picture).convert("RGB")).copy()
        side = max(image.shape[:2]) // 3
        top, left = rng.integers(0, image.shape[0] - side + 1), rng.integers(0, image.shape[1] - side + 1)
        image[top : top + side, left : left + side] = rng.integers(0, 256, size=(side, side, 3), dtype=np.uint8)
        buffer = io.BytesIO()
        Image.fromarray(image).save(buffer, format="PNG")
        (folder / picture.name).write_bytes(buffer.getvalue())
    return folder
