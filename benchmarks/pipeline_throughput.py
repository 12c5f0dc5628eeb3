"""Fit and score throughput of the Ray pipeline, against the in-process API on the same images.

Generates the synthetic dataset, then times (in one run, same machine):
  baseline: spade_batch.method.detector fit + score in this process (no Ray, no storage), once before
            the pipeline and once after it (Ray shut down), so that a slow spell of a noisy
            machine shows as a spread instead of skewing the ratio;
  pipeline: run_fit + run_score on a local Ray with local storage (decode, shards, Parquet, masks).
Prints images/s for each and the pipeline's ratio to the baseline's mean; the score ratio is the
last line. With --in-process-only (a machine without Ray, such as the GPU machine) it prints the
in-process rates alone, score's last.

    python benchmarks/pipeline_throughput.py [--backbone resnet18] [--weights random] [--image-size 128] [--k 10]
        [--train 400] [--test-per-defect 100] [--calibration-images leave_one_out|held_out] [--calibration-fraction 0.1]
        [--device auto|cpu|cuda] [--in-process-only]
"""

from __future__ import annotations

import argparse
import glob
import os
import tempfile
import time

import numpy as np

from spade_batch.config import Settings
from spade_batch.formats.datasets import make_demo_data
from spade_batch.formats.images import decode_image
from spade_batch.method.detector import fit, score


def load(paths: list[str]) -> list[np.ndarray]:
    return [decode_image(open(path, "rb").read(), path) for path in paths]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backbone", default="resnet18")
    parser.add_argument("--weights", default="random")
    parser.add_argument("--image-size", type=int, default=128)
    parser.add_argument("--k", type=int, default=10)
    parser.add_argument("--train", type=int, default=400)
    parser.add_argument("--test-per-defect", type=int, default=100, help="test images per label (4 labels)")
    parser.add_argument("--shard-size", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--calibration-images", default=Settings.calibration_images, choices=["leave_one_out", "held_out"])
    parser.add_argument("--calibration-fraction", type=float, default=Settings.calibration_fraction,
                        help="held-out training images that calibrate the thresholds (default: the product's)")
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    parser.add_argument("--in-process-only", action="store_true", help="no Ray: time the in-process API alone")
    args = parser.parse_args()
    settings = Settings(
        backbone=args.backbone, weights=args.weights, image_size=args.image_size, k=args.k,
        shard_size=args.shard_size, batch_size=args.batch_size, calibration_images=args.calibration_images, calibration_fraction=args.calibration_fraction,
        device=args.device,
    )
    work = tempfile.mkdtemp(prefix="spade-bench-")
    root = make_demo_data(work, n_train=args.train, n_test_good=args.test_per_defect, n_test_per_defect=args.test_per_defect)
    train_paths = sorted(glob.glob(os.path.join(root, "train", "good", "*.png")))
    test_paths = sorted(glob.glob(os.path.join(root, "test", "*", "*.png")))
    print(f"config: {args.backbone} ({args.weights}) {args.image_size}px K={args.k}, {len(train_paths)} train "
          f"(calibration {settings.calibration_images}: sample {settings.calibration_sample}, held-out fraction "
          f"{args.calibration_fraction:g}), "
          f"{len(test_paths)} test images, shard {args.shard_size}, {os.cpu_count()} CPUs")

    def in_process() -> tuple[float, float]:
        start = time.perf_counter()
        model = fit(load(train_paths), settings)
        fit_rate = len(train_paths) / (time.perf_counter() - start)
        start = time.perf_counter()
        score(model, load(test_paths), settings)
        return fit_rate, len(test_paths) / (time.perf_counter() - start)

    before = in_process()
    if args.in_process_only:
        print(f"in-process on {args.device}: fit {before[0]:.2f} img/s")
        print(f"in-process on {args.device}: score {before[1]:.2f} img/s")
        return
    fit_pipe, score_pipe = pipeline(root, work, settings, len(train_paths), len(test_paths))
    after = in_process()

    for name, pipe, base in (("fit", fit_pipe, (before[0], after[0])), ("score", score_pipe, (before[1], after[1]))):
        print(f"{name + ':':6} in-process {base[0]:7.2f} / {base[1]:7.2f} img/s (before / after)   pipeline {pipe:7.2f} img/s"
              f"   ratio {pipe / np.mean(base):.2f}")


def pipeline(root: str, work: str, settings: Settings, train_count: int, test_count: int) -> tuple[float, float]:
    """(fit, score) images/s of run_fit and run_score on a local Ray, shut down afterwards."""
    import ray  # here, so that --in-process-only runs where Ray is not installed

    from spade_batch.engine.fit import run_fit
    from spade_batch.engine.runtime import init_ray
    from spade_batch.engine.score import run_score

    init_ray(None)  # started before timing: Ray's start-up is not per-image cost
    start = time.perf_counter()
    run_fit(os.path.join(root, "train"), os.path.join(work, "model"), settings)
    fit_rate = train_count / (time.perf_counter() - start)
    start = time.perf_counter()
    run_score(os.path.join(work, "model"), os.path.join(root, "test"), os.path.join(work, "out"), settings)
    score_rate = test_count / (time.perf_counter() - start)
    ray.shutdown()
    return fit_rate, score_rate


if __name__ == "__main__":
    main()
