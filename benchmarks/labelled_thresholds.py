"""How close do thresholds set from a few labelled images come to the label-chosen optimum?

Fits a model on train/good of an MVTec-layout category (efficientnet_lite0, ImageNet weights, K = 5, the product's
defaults otherwise), scores every test image once with the engine (maps kept), then for each seed draws 5 normal and
5 defective test images as the labelled set and sets the thresholds from them exactly as `spade-batch thresholds
--labelled` does (reports.labelled.choose_thresholds: image threshold at best F1, pixel threshold at best SegF1 with
the model's mask rules). Decisions are measured on the other test images, beside the calibrated thresholds (normal
images only) and the label-chosen optimum (the same choice with every test image's label), measured on the same
images. For the first seed it also runs the command itself (a dry run on a folder of those 10 images under the work
folder) and checks it sets the same thresholds.

    nice -n 10 python benchmarks/labelled_thresholds.py [--data ../shared/data/magnetic_tile] [--work /tmp/labels-bench]
"""

from __future__ import annotations

import argparse
import os
import shutil
import time

import numpy as np

from spade_batch.config import Settings
from spade_batch.engine.fit import run_fit
from spade_batch.formats.card import load_card
from spade_batch.formats.datasets import read_mvtec_category
from spade_batch.formats.layout import EvaluationOutputs, ModelLayout
from spade_batch.reports.evaluate import sample_uri, score_samples
from spade_batch.reports.labelled import Target, choose_thresholds, decisions, labelled_images, run_thresholds

REPOSITORY = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_DATA = os.path.join(REPOSITORY, "..", "shared", "data", "magnetic_tile")


def labelled_folder(samples: list, folder: str) -> str:
    """An MVTec-layout folder of these test samples (test/<label>/, ground_truth/<label>/<stem>_mask.png), linked."""
    shutil.rmtree(folder, ignore_errors=True)
    for sample in samples:
        os.makedirs(os.path.join(folder, "test", sample.label), exist_ok=True)
        os.symlink(sample.path, os.path.join(folder, "test", sample.label, os.path.basename(sample.path)))
        if sample.mask_path:
            os.makedirs(os.path.join(folder, "ground_truth", sample.label), exist_ok=True)
            os.symlink(sample.mask_path, os.path.join(folder, "ground_truth", sample.label, os.path.basename(sample.mask_path)))
    return folder


def row(name: str, made: dict) -> str:
    image, pixel = made["image"], made["pixel"]
    return (f"| {name} | {image['fpr']:.3f} | {image['tpr']:.3f} | {image['f1']:.3f} | {pixel['seg_f1']:.3f} | "
            f"{pixel['normal_images_flagged']} of {pixel['normal_images']} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default=DEFAULT_DATA)
    parser.add_argument("--work", default="/tmp/labels-bench", help="model, scoring run and labelled folders (the model is reused)")
    parser.add_argument("--seeds", type=int, default=10)
    parser.add_argument("--normal", type=int, default=5)
    parser.add_argument("--defective", type=int, default=5)
    args = parser.parse_args()

    settings = Settings(backbone="efficientnet_lite0", weights="imagenet", k=5, log_level="WARNING")
    model = os.path.join(args.work, "model")
    started = time.perf_counter()
    if not os.path.exists(ModelLayout(model).card):
        run_fit(os.path.join(args.data, "train", "good"), model, settings)
    fitted = time.perf_counter()
    card = load_card(model)
    tests = read_mvtec_category(args.data).test
    written = EvaluationOutputs(os.path.join(args.work, "all"))
    scored = score_samples(model, tests, written, settings, frozenset(), None)
    everything = labelled_images(scored, written, card, has_masks=True)
    scored_at = time.perf_counter()
    print(f"{args.data}: {len(tests)} test images ({int(everything.labels.sum())} defective), model fit in {fitted - started:.0f} s, "
          f"test images scored in {scored_at - fitted:.0f} s; efficientnet_lite0 imagenet, K = 5; mask rules: "
          f"gate_masks {card.thresholds.gate_masks}, min_region {card.thresholds.min_region}")
    optimum = choose_thresholds(everything, card.thresholds, Target())
    print(f"calibrated: image {card.thresholds.image:.4g}, pixel {card.thresholds.pixel:.4g}; "
          f"optimum (labels of all test images): image {optimum.image:.4g}, pixel {optimum.pixel:.4g}")

    rng = np.random.default_rng(0)
    normal, defective = np.flatnonzero(~everything.labels), np.flatnonzero(everything.labels)
    ratios = []
    print("\n| seed | thresholds | image FPR | image TPR | image F1 | SegF1 | normal images flagged |")
    print("|---|---|---|---|---|---|---|")
    for seed in range(args.seeds):
        chosen = sorted([*rng.choice(normal, args.normal, replace=False), *rng.choice(defective, args.defective, replace=False)])
        others = everything.subset([i for i in range(len(everything.ids)) if i not in set(chosen)])
        labelled = everything.subset(chosen)
        label_set = choose_thresholds(labelled, card.thresholds, Target())
        if seed == 0:
            by_uri = {sample_uri(sample): sample for sample in tests}
            check_command(model, [by_uri[scored.images[i].uri] for i in chosen], args.work, settings, label_set)
        made = {name: decisions(others, rule) for name, rule in
                (("calibrated", card.thresholds), ("label-set (5 + 5)", label_set), ("optimum (all labels)", optimum))}
        for name, values in made.items():
            print(row(f"{seed} | {name}", values))
        best = made["optimum (all labels)"]
        ratios.append((made["label-set (5 + 5)"]["pixel"]["seg_f1"] / best["pixel"]["seg_f1"],
                       made["label-set (5 + 5)"]["image"]["f1"] / best["image"]["f1"]))
    share = np.array(ratios)
    print(f"\nlabel-set from {args.normal} + {args.defective} images, share of the optimum on the other test images over "
          f"{args.seeds} draws: SegF1 median {np.median(share[:, 0]):.2f} (min {share[:, 0].min():.2f}), "
          f"image F1 median {np.median(share[:, 1]):.2f} (min {share[:, 1].min():.2f}); "
          f"draws reaching 80% of both: {int(np.sum((share >= 0.8).all(axis=1)))} of {args.seeds}")


def check_command(model: str, samples: list, work: str, settings: Settings, expected) -> None:
    """Run `thresholds --labelled` (dry run) on a folder of these samples; it must set the thresholds computed here."""
    folder = labelled_folder(samples, os.path.join(work, "labelled"))
    result = run_thresholds(model, folder, settings, dry_run=True)
    got = result.record.after
    gap = max(abs(got[key] - getattr(expected, key)) / abs(getattr(expected, key)) for key in ("image", "pixel"))
    # The command scores the 10 images in a run of their own: other batches, so scores may differ in the last float32 digits.
    print(f"the command on {folder} (seed 0, dry run): image {got['image']:.6g}, pixel {got['pixel']:.6g}; here: image "
          f"{expected.image:.6g}, pixel {expected.pixel:.6g}: {'the same' if gap < 1e-4 else 'DIFFERENT'} (relative gap {gap:.1e})")


if __name__ == "__main__":
    main()
