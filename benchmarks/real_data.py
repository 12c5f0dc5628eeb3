"""Accuracy on real data: fit and evaluate named configurations on one MVTec-layout category.

Each configuration runs the path users run: spade_batch.engine.fit.run_fit on train/good, then
spade_batch.reports.evaluate.run_evaluate on the test split (local Ray, local storage). Prints one markdown
table (config, image ROCAUC, pixel ROCAUC, PRO, scoring images/s, settings); the headline is the last line.

Results go under --work: <config>/model, <config>/eval (metrics.json, report) and <config>/result.json.
A configuration whose result.json already holds the same settings, data and --every is not run again,
so the table can be assembled from runs made one configuration at a time (--rerun forces them).

    python benchmarks/real_data.py [--data ../shared/data/magnetic_tile] [--configs k5-full k50-full ...]
        [--work /tmp/spade-real-data] [--every N] [--rerun]
"""

from __future__ import annotations

import argparse
import json
import os
import time
from typing import Any

from spade_batch.config import load_settings
from spade_batch.engine.fit import run_fit
from spade_batch.reports.evaluate import run_evaluate

REPOSITORY = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_DATA = os.path.join(REPOSITORY, "..", "shared", "data", "magnetic_tile")
BASE = {"backbone": "efficientnet_lite0", "weights": "imagenet", "device": "cpu", "log_level": "WARNING"}
"""Settings every configuration shares; each configuration's own settings override them."""

CONFIGS: dict[str, dict[str, Any]] = {
    # The paper's image score (knn) at K = 5 and 50, both preprocessing modes.
    "k5-full": {"k": 5, "image_score": "knn"},
    "k5-paper": {"k": 5, "preprocess": "paper", "image_score": "knn"},
    "k50-full": {"k": 50, "image_score": "knn"},
    "k50-paper": {"k": 50, "preprocess": "paper", "image_score": "knn"},
    "k5-paper-no-hold-out": {"k": 5, "preprocess": "paper", "image_score": "knn", "calibration_fraction": 0.0},
    # Options beyond the paper, one at a time on k5-full.
    "k5-map-max": {"k": 5, "image_score": "map", "map_top": 0.0},
    "k5-map-top1%": {"k": 5, "image_score": "map", "map_top": 0.01},
    "k5-combined-top1%": {"k": 5, "image_score": "combined", "map_top": 0.01},
    "k5-layer-norm": {"k": 5, "image_score": "knn", "layer_normalise": True},
    "k5-full-320px": {"k": 5, "image_score": "knn", "image_size": 320},
}


def run_config(name: str, data: str, work: str, every: int, rerun: bool) -> dict[str, Any]:
    """Fit + evaluate one configuration (or reuse its earlier result); returns its result.json."""
    folder = os.path.join(work, name)
    settings = load_settings(None, {**BASE, **CONFIGS[name], "overwrite": True})
    wanted = {"settings": CONFIGS[name], "data": os.path.abspath(data), "every": every}
    result_path = os.path.join(folder, "result.json")
    if not rerun and os.path.exists(result_path):
        with open(result_path) as f:
            earlier = json.load(f)
        if {key: earlier.get(key) for key in wanted} == wanted:
            return earlier
    started = time.perf_counter()
    run_fit(os.path.join(data, "train", "good"), os.path.join(folder, "model"), settings)
    fitted = time.perf_counter()
    metrics = run_evaluate(os.path.join(folder, "model"), data, os.path.join(folder, "eval"), settings, every=every)
    result = {
        **wanted,
        "name": name,
        "image_rocauc": metrics["overall"]["image_rocauc"],
        "pixel_rocauc": metrics["overall"]["pixel_rocauc"],
        "pro": metrics["overall"]["pro"],
        "images_per_second": metrics["images_per_second"],
        "test_images": metrics["counts"]["images"],
        "fit_seconds": fitted - started,
        "evaluate_seconds": time.perf_counter() - fitted,
        "preprocessing": metrics["preprocessing"],
    }
    os.makedirs(folder, exist_ok=True)
    with open(result_path, "w") as f:
        json.dump(result, f, indent=2)
    return result


def table(results: list[dict[str, Any]]) -> str:
    lines = ["| config | image ROCAUC | pixel ROCAUC | PRO | images/s | settings |", "|---|---|---|---|---|---|"]
    for r in results:
        settings = ", ".join(f"{key}={value}" for key, value in r["settings"].items())
        lines.append(
            f"| {r['name']} | {r['image_rocauc']:.3f} | {r['pixel_rocauc']:.3f} | {r['pro']:.3f} | "
            f"{r['images_per_second']:.1f} | {settings} |"
        )
    return "\n".join(lines)


def headline(results: list[dict[str, Any]]) -> str:
    best = max(results, key=lambda r: r["image_rocauc"])
    first = results[0]
    return (
        f"headline: {first['name']} image ROCAUC {first['image_rocauc']:.3f}, pixel ROCAUC {first['pixel_rocauc']:.3f}, "
        f"PRO {first['pro']:.3f}; best image ROCAUC {best['image_rocauc']:.3f} ({best['name']})"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default=DEFAULT_DATA, help="MVTec-layout category folder (train/good, test/<label>, ground_truth)")
    parser.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=list(CONFIGS), metavar="NAME",
                        help=f"configurations to run, in table order; known: {', '.join(CONFIGS)}")
    parser.add_argument("--work", default="/tmp/spade-real-data", help="folder for models, evaluations and result.json files")
    parser.add_argument("--every", type=int, default=1, help="evaluate every N-th test image of each label (1 = all; >1 for trial runs)")
    parser.add_argument("--rerun", action="store_true", help="run configurations again even if their result.json matches")
    args = parser.parse_args()
    if not os.path.isdir(os.path.join(args.data, "train", "good")):
        parser.error(f"--data {args.data} is not an MVTec-layout category (no train/good); pass the category folder")
    data = os.path.abspath(args.data)
    print(f"data: {data}; base settings: {BASE}; every {args.every}; {os.cpu_count()} CPUs")
    results = []
    for name in args.configs:
        results.append(run_config(name, data, args.work, args.every, args.rerun))
        print(f"{name}: {json.dumps({k: results[-1][k] for k in ('image_rocauc', 'pixel_rocauc', 'pro', 'images_per_second')})}", flush=True)
    with open(os.path.join(args.work, "results.json"), "w") as f:
        json.dump(results, f, indent=2)
    print(table(results))
    print(headline(results))


if __name__ == "__main__":
    main()
