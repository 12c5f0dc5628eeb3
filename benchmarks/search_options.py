"""The search options (match_radius, feature_pool, layers) on a texture and on aligned parts.

Each configuration runs the path users run: engine.fit.run_fit on train/good (leave-one-out calibration), then
reports.evaluate.run_evaluate on the test split, on two sets: Magnetic Tile (a texture: where a pixel lies says
nothing of how it should look) and the synthetic aligned set (formats.datasets.make_aligned_data: a fixtured part,
a few px of jitter). Prints one markdown table: image ROCAUC, pixel ROCAUC, PRO, AU-PRO@0.05, the written
decisions (SegF1 of the masks, image FPR / TPR of is_anomalous, share of normal test images with a flagged pixel),
fit seconds and scoring seconds per image (evaluate's, the whole scoring stream: decode, backbone and pixel stage).

Subsamples keep it to minutes on 2 CPU cores: --train N training images (the first N by name), --every N-th test image.

    python benchmarks/search_options.py [--sets magnetic_tile aligned] [--configs full r8 ...] [--train 60] [--every 4]
"""

from __future__ import annotations

import argparse
import json
import os
import time
from typing import Any

from spade_batch.config import load_settings
from spade_batch.engine.fit import run_fit
from spade_batch.formats.card import load_card
from spade_batch.formats.datasets import make_aligned_data
from spade_batch.method.alignment import suggestion
from spade_batch.reports.evaluate import run_evaluate
from spade_batch.reports.evaluation_measure import AU_PRO_KEY

REPOSITORY = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MAGNETIC_TILE = os.path.join(REPOSITORY, "..", "shared", "data", "magnetic_tile")
BASE = {"backbone": "efficientnet_lite0", "weights": "imagenet", "k": 5, "device": "cpu", "log_level": "WARNING"}
"""Settings every configuration shares (the issue's reference: Lite0 ImageNet, K = 5); each configuration adds its own."""

CONFIGS: dict[str, dict[str, Any]] = {
    "full": {},
    "r8": {"match_radius": 8},
    "r16": {"match_radius": 16},
    "pool3": {"feature_pool": 3},
    "layers23": {"layers": "2,3"},
    "r8+pool3": {"match_radius": 8, "feature_pool": 3},
    "r8+layers23": {"match_radius": 8, "layers": "2,3"},
}


def train_subset(data: str, count: int, work: str) -> str:
    """A folder of links to the first `count` images of data/train/good (all when count is 0)."""
    source = os.path.join(data, "train", "good")
    names = sorted(os.listdir(source))[: count or None]
    folder = os.path.join(work, f"train-{len(names)}")
    os.makedirs(folder, exist_ok=True)
    for name in names:
        link = os.path.join(folder, name)
        if not os.path.exists(link):
            os.symlink(os.path.join(source, name), link)
    return folder


def aligned_data(work: str) -> str:
    """The synthetic aligned set under work/data, written once and reused by later runs (it is seeded)."""
    root = os.path.join(work, "data", "parts")
    return root if os.path.isdir(os.path.join(root, "test")) else make_aligned_data(os.path.join(work, "data"))


def save(rows: list[dict[str, Any]], path: str) -> None:
    """Merge rows into path's results (a row replaces the earlier one of its set and config), so a run of one set keeps the other's."""
    kept = json.load(open(path)) if os.path.exists(path) else []
    new = {(row["set"], row["config"]) for row in rows}
    merged = [row for row in kept if (row["set"], row["config"]) not in new] + rows
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        json.dump(merged, f, indent=2)


def run_config(name: str, data: str, train: str, work: str, every: int) -> dict[str, Any]:
    """Fit + evaluate one configuration on one set; its row of the table."""
    folder = os.path.join(work, name)
    settings = load_settings(None, {**BASE, **CONFIGS[name], "overwrite": True})
    started = time.perf_counter()
    run_fit(train, os.path.join(folder, "model"), settings)
    fitted = time.perf_counter()
    metrics = run_evaluate(os.path.join(folder, "model"), data, os.path.join(folder, "eval"), settings, every=every)
    image, pixel = metrics["decisions"]["image"] or {}, metrics["decisions"]["pixel"] or {}
    overall = metrics["overall"]
    card = load_card(os.path.join(folder, "model"))
    return {
        "alignment": suggestion(card.alignment, card.layer_shapes, card.preprocessing.size),
        "config": name,
        "image_rocauc": overall["image_rocauc"], "pixel_rocauc": overall["pixel_rocauc"], "pro": overall["pro"],
        "au_pro": overall[AU_PRO_KEY], "seg_f1": pixel.get("seg_f1"), "image_fpr": image.get("fpr"), "image_tpr": image.get("tpr"),
        "normal_flagged": pixel.get("share_normal_images_flagged"), "fit_seconds": fitted - started,
        "seconds_per_image": 1 / max(metrics["images_per_second"], 1e-9), "test_images": metrics["counts"]["images"],
    }


def table(rows: list[dict[str, Any]]) -> str:
    columns = ["set", "config", "image_rocauc", "pixel_rocauc", "pro", "au_pro", "seg_f1", "image_fpr", "image_tpr",
               "normal_flagged", "fit_seconds", "seconds_per_image"]
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for row in rows:
        cells = [f"{row[c]:.3f}" if isinstance(row[c], float) else ("-" if row[c] is None else str(row[c])) for c in columns]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sets", nargs="+", default=["magnetic_tile", "aligned"], choices=["magnetic_tile", "aligned"])
    parser.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=list(CONFIGS), metavar="NAME")
    parser.add_argument("--magnetic-tile", default=MAGNETIC_TILE, help="the Magnetic Tile category folder (MVTec layout; default: ../shared beside the checkout)")
    parser.add_argument("--train", type=int, default=60, help="training images (the first N by name; 0: all)")
    parser.add_argument("--every", type=int, default=4, help="evaluate every N-th test image of each label")
    parser.add_argument("--work", default="/tmp/spade-search-options")
    args = parser.parse_args()
    rows = []
    for data_set in args.sets:
        work = os.path.join(args.work, data_set)
        data = os.path.abspath(args.magnetic_tile) if data_set == "magnetic_tile" else aligned_data(work)
        train = train_subset(data, args.train, work)
        for name in args.configs:
            rows.append({"set": data_set, **run_config(name, data, train, work, args.every)})
            print(json.dumps(rows[-1]), flush=True)
            save(rows[-1:], os.path.join(args.work, "results.json"))
        print(f"{data_set}: alignment measured at fit ({args.configs[0]}): {rows[-len(args.configs)]['alignment']}", flush=True)
    print(table(rows))


if __name__ == "__main__":
    main()
