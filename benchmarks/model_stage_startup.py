"""What a small run pays before its first image: the model stage as an actor pool, or as pooled task workers.

On one local Ray (the CPUs of this machine), fits a small model in process, then scores the same small image set
`--runs` times with each kind of model worker, alternating: actors (a new pool per run: a process start and the torch
and torchvision imports per actor, then the backbone and gallery) and what run_score does on CPUs (ModelStage.for_run:
up to SMALL_RUN_IMAGES one pooled worker, engine.runtime.pooled_stage, whose process outlives the run; beyond, actors). Prints each run's wall time and the median ratio; the last line is the headline.

    python benchmarks/model_stage_startup.py [--runs 4] [--images 8] [--workers 1]
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time

from spade_batch.config import Settings
from spade_batch.engine.runtime import ModelStage, init_ray
from spade_batch.engine.score import run_score
from spade_batch.formats.datasets import make_demo_data
from spade_batch.formats.images import decode_image
from spade_batch.method import detector

SETTINGS = Settings(backbone="resnet18", weights="random", k=3, image_size=64, batch_size=4, shard_size=4, device="cpu")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=4, help="score runs of each kind")
    parser.add_argument("--images", type=int, default=8, help="test images per run")
    parser.add_argument("--workers", type=int, default=1, help="model workers of each run (0: automatic)")
    parser.add_argument("--train", type=int, default=10, help="training images of the model")
    parser.add_argument("--image-size", type=int, default=64)
    args = parser.parse_args()
    settings = SETTINGS.replace(image_size=args.image_size)

    root = tempfile.mkdtemp(prefix="startup-")
    category = make_demo_data(os.path.join(root, "data"), n_train=args.train, n_test_good=args.images, n_test_per_defect=0,
                              min_size=64, max_size=64)
    train = sorted(os.path.join(dirpath, name) for dirpath, _, names in os.walk(os.path.join(category, "train")) for name in names)
    model = detector.fit([decode_image(open(path, "rb").read(), path) for path in train], settings.replace(calibration_fraction=0.3),
                         ids=[os.path.relpath(path, os.path.join(category, "train")) for path in train])
    model.save(os.path.join(root, "model"))
    init_ray()
    pooled = ModelStage.on_cluster(settings.replace(model_workers=args.workers))
    kinds = {"actors": ModelStage(pooled.workers, pooled.resources), "pooled": pooled}
    seconds: dict[str, list[float]] = {kind: [] for kind in kinds}
    for run in range(args.runs):
        for kind, stage in kinds.items():
            started = time.perf_counter()
            summary = run_score(os.path.join(root, "model"), os.path.join(category, "test"), os.path.join(root, f"out-{kind}-{run}"),
                                settings, actors=stage)
            seconds[kind].append(time.perf_counter() - started)
            assert summary.scored == args.images, summary
            loads = sum(worker["gallery_loads"] for worker in summary.workers.values())
            print(f"run {run + 1} {kind:>6}: {seconds[kind][-1]:.2f} s ({summary.scored} images, {summary.model_workers} model workers, "
                  f"{len(summary.workers)} stages built, {loads} gallery loads)", flush=True)
    actors, pooled_s = statistics.median(seconds["actors"]), statistics.median(seconds["pooled"])
    print(f"median of {args.runs} runs of {args.images} images: actors {actors:.2f} s, pooled workers {pooled_s:.2f} s; "
          f"pooled/actors = {pooled_s / actors:.3f}")


if __name__ == "__main__":
    main()
