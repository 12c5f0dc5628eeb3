"""Which calibration and pixel rule give decisions a user can act on? Measured on the masks a run writes.

For each calibration mode (held_out: 10% of the normal images leave the gallery; leave_one_out: every
normal image stays and each is scored against the others), fits on train/good of an MVTec-layout
category and scores the test split once, and the calibration images once. Then, for each pixel rule,
it sets the thresholds from those calibration scores (calibrate.calibrate_from_samples) and applies the model's decisions as a scoring run writes them
(method.masks.mask_from_map at each image's original size, image verdict score > threshold), and
prints per configuration: image FPR / TPR, pooled pixel SegF1 (MVTec AD 2), pixel TPR / FPR, and
the share of normal test images with any flagged pixel. Rule-independent ranking metrics are in
benchmarks/real_data.py.

    python benchmarks/decision_rules.py [--data ../shared/data/magnetic_tile] [--min-region 16] [--k 5]
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time

import numpy as np

from spade_batch.config import Settings
from spade_batch.formats.datasets import read_mask, read_mvtec_category
from spade_batch.formats.feature_index import StoredFeatures
from spade_batch.formats.images import decode_image
from spade_batch.formats.layout import ModelLayout, part_files
from spade_batch.method.calibrate import calibrate_from_samples, region_size
from spade_batch.method.calibration_search import InProcessHeldOut, calibration_matches, calibration_scores
from spade_batch.method.detector import Extractor, Scorer, fit
from spade_batch.method.masks import mask_from_map
from spade_batch.method.recipe import split_fit_ids
from spade_batch.method.trainset import size_outliers
from spade_batch.reports.metrics import PixelDecisions, image_decisions

REPOSITORY = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_DATA = os.path.join(REPOSITORY, "..", "shared", "data", "magnetic_tile")
RULES = {
    "quantile": {"pixel_rule": "quantile", "gate_masks": False},
    "quantile, gated": {"pixel_rule": "quantile", "gate_masks": True},
    "mean_3sigma": {"pixel_rule": "mean_3sigma", "gate_masks": False},
    "mean_3sigma, gated": {"pixel_rule": "mean_3sigma", "gate_masks": True},
    "region": {"pixel_rule": "region", "min_region": None, "gate_masks": False},
    "region, gated": {"pixel_rule": "region", "min_region": None, "gate_masks": True},
}
"""Pixel rules compared; min_region None takes --min-region."""


def decisions(results: list, images: list, truths: list, labels: np.ndarray, thresholds) -> dict:
    """Image and pooled pixel decision quality of the masks mask_from_map writes under these thresholds."""
    flagged = np.array([r.score > thresholds.image for r in results])
    pixels = PixelDecisions()
    for result, image, truth, defective in zip(results, images, truths, labels):
        mask = mask_from_map(result.anomaly_map, *image.shape[:2], thresholds, result.score) > 0
        pixels.update(mask, truth, normal_image=not defective)
    return {"image": image_decisions(flagged, labels), "pixel": pixels.to_dict()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default=DEFAULT_DATA)
    parser.add_argument("--min-region", type=int, default=16, help="pixels at the working size")
    parser.add_argument("--k", type=int, default=5)
    parser.add_argument("--image-fpr", type=float, default=0.01)
    args = parser.parse_args()

    category = read_mvtec_category(args.data)
    train = [decode_image(open(s.path, "rb").read(), s.path) for s in category.train]
    train_ids = [os.path.relpath(s.path, args.data) for s in category.train]
    tests = sorted(category.test, key=lambda s: s.path)
    images = [decode_image(open(s.path, "rb").read(), s.path) for s in tests]
    truths = [read_mask(s.mask_path, *image.shape[:2]) for s, image in zip(tests, images)]
    labels = np.array([s.is_anomalous for s in tests])
    base = Settings(backbone="efficientnet_lite0", weights="imagenet", k=args.k, device="cpu", image_fpr=args.image_fpr,
                    calibration_sample=0, log_level="WARNING")
    print(f"{args.data}: {len(train)} normal training images, {len(tests)} test images ({labels.sum()} defective); "
          f"efficientnet_lite0, K = {args.k}, image_fpr {args.image_fpr}, min_region {args.min_region}")
    print("| calibration | pixel rule | calibration images | image FPR | image TPR | SegF1 | pixel TPR | pixel FPR | normal images flagged |")
    print("|---|---|---|---|---|---|---|---|---|")
    for mode in ("held_out", "leave_one_out"):
        started = time.perf_counter()
        folder = tempfile.mkdtemp(prefix=f"decision-rules-{mode}-")
        settings = base.replace(calibration_images=mode, min_region=args.min_region)
        model = fit(train, settings, ids=train_ids, folder=folder)
        extractor = Extractor(settings, preprocessing=model.card.preprocessing)
        results = Scorer(model, extractor).score(images)  # the gallery, so the maps, do not depend on the pixel rule
        # The calibration images' scores, once: each rule then only sets thresholds from them.
        stored = StoredFeatures.index(part_files(ModelLayout(folder).features, None))
        usable = sorted(stored.sizes)
        outliers = size_outliers(usable, [stored.sizes[i][0] for i in usable], [stored.sizes[i][1] for i in usable])
        _, calibration_ids = split_fit_ids([i for i in usable if i not in outliers], settings)
        with_regions = settings.replace(pixel_rule="region")  # every rule's scores, the region scores included
        matched = calibration_matches(model, calibration_ids, stored, InProcessHeldOut(stored, extractor, with_regions), {})
        scores = calibration_scores(model, calibration_ids, matched, region_size(with_regions.calibration))
        print(f"<!-- {mode}: fit, scoring and calibration scores {time.perf_counter() - started:.0f} s -->", flush=True)
        for name, changes in RULES.items():
            rule_settings = settings.replace(**{"min_region": 0, **{k: (args.min_region if v is None else v) for k, v in changes.items()}})
            calibrated = calibrate_from_samples(model, scores, rule_settings.calibration)
            measured = decisions(results, images, truths, labels, calibrated.card.thresholds)
            image, pixel = measured["image"], measured["pixel"]
            print(f"| {mode} | {name} | {calibrated.card.calibration.count} | {image['fpr']:.3f} ({image['flagged_normal']}) | "
                  f"{image['tpr']:.3f} | {pixel['seg_f1']:.3f} | {pixel['tpr']:.3f} | {pixel['fpr']:.4f} | "
                  f"{pixel['normal_images_flagged'] / pixel['normal_images']:.3f} ({pixel['normal_images_flagged']}) |", flush=True)


if __name__ == "__main__":
    main()
