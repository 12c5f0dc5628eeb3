"""Wall time of `add` (a fraction more normal images to a fitted model) against a full refit on all the images.

Generates the synthetic dataset, fits a model on --train images (not timed), then times, in one run on
one local Ray with local storage: run_add of --add-fraction more images to it (extracts only those, then
the one recipe over every stored feature), and run_fit of all the images into a new model (extracts them
all). Prints both, and the ratio add / refit last; checks on the way that both give the same gallery and
thresholds (the add contract).

    python benchmarks/add_vs_refit.py [--train 2000] [--add-fraction 0.1] [--backbone resnet18] [--weights random]
        [--image-size 128] [--k 10] [--calibration-images leave_one_out|held_out] [--calibration-sample 1000]
        [--calibration-fraction 0.1] [--device auto|cpu|cuda]
"""

from __future__ import annotations

import argparse
import glob
import os
import tempfile
import time

import numpy as np

from spade_batch.config import Settings
from spade_batch.engine.add import run_add
from spade_batch.engine.fit import run_fit
from spade_batch.engine.runtime import init_ray
from spade_batch.formats.datasets import make_demo_data
from spade_batch.formats.layout import ModelLayout
from spade_batch.formats.manifest import build_manifest
from spade_batch.formats.model import SpadeModel


def link_folder(paths: list[str], folder: str) -> str:
    """A folder of hard links to these files, under their own names."""
    os.makedirs(folder)
    for path in paths:
        os.link(path, os.path.join(folder, os.path.basename(path)))
    return folder


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--train", type=int, default=2000, help="images of the fitted model")
    parser.add_argument("--add-fraction", type=float, default=0.1, help="images added, as a fraction of --train")
    parser.add_argument("--backbone", default="resnet18")
    parser.add_argument("--weights", default="random")
    parser.add_argument("--image-size", type=int, default=128)
    parser.add_argument("--k", type=int, default=10)
    parser.add_argument("--calibration-images", default=Settings.calibration_images, choices=["leave_one_out", "held_out"])
    parser.add_argument("--calibration-sample", type=int, default=Settings.calibration_sample)
    parser.add_argument("--calibration-fraction", type=float, default=Settings.calibration_fraction)
    parser.add_argument("--shard-size", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    args = parser.parse_args()
    settings = Settings(backbone=args.backbone, weights=args.weights, image_size=args.image_size, k=args.k,
                        calibration_images=args.calibration_images, calibration_sample=args.calibration_sample,
                        calibration_fraction=args.calibration_fraction, shard_size=args.shard_size, batch_size=args.batch_size,
                        device=args.device)
    added = max(1, round(args.train * args.add_fraction))
    work = tempfile.mkdtemp(prefix="spade-bench-add-")
    root = make_demo_data(work, n_train=args.train + added, n_test_good=0, n_test_per_defect=0)
    paths = sorted(glob.glob(os.path.join(root, "train", "good", "*.png")))
    base = link_folder(paths[: args.train], os.path.join(work, "base"))
    extra = link_folder(paths[args.train :], os.path.join(work, "extra"))
    everything = link_folder(paths, os.path.join(work, "all"))
    print(f"config: {args.backbone} ({args.weights}) {args.image_size}px K={args.k}, {args.train} images + {added} added, "
          f"calibration {args.calibration_images} (sample {args.calibration_sample}, fraction {args.calibration_fraction:g}), shard {args.shard_size}, {os.cpu_count()} CPUs")

    init_ray(None)  # started before timing: Ray's start-up is not the commands' cost
    grown, whole = os.path.join(work, "grown"), os.path.join(work, "whole")
    run_fit(base, grown, settings)
    start = time.perf_counter()
    summary = run_add(build_manifest(extra), grown, settings)
    add_seconds = time.perf_counter() - start
    start = time.perf_counter()
    run_fit(everything, whole, settings)
    refit_seconds = time.perf_counter() - start

    a, b = SpadeModel.load(ModelLayout(grown).version(summary.version).root), SpadeModel.load(whole)
    same = a.train_ids == b.train_ids and all(
        np.isclose(getattr(a.card.thresholds, kind) or 0.0, getattr(b.card.thresholds, kind) or 0.0, rtol=2**-10)
        for kind in ("image", "pixel"))
    print(f"add:   {add_seconds:8.1f} s  ({summary.extracted} images extracted, version {summary.version})")
    print(f"refit: {refit_seconds:8.1f} s  ({args.train + added} images extracted)")
    print(f"same gallery and thresholds: {same}")
    print(f"add / refit wall time: {add_seconds / refit_seconds:.3f}")


if __name__ == "__main__":
    main()
