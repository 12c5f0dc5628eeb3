"""Do the calibrated thresholds keep their promise on normal images the model never saw?

Fits on part of an MVTec-layout category's normal training images (a deterministic half, by id
hash), scores the other normal images (the rest of train/good and all of test/good), and prints,
for each calibration mode and target image_fpr:

- the observed image false-positive rate (score > image threshold) and the binomial 99% interval
  of the rate the target predicts for that many images;
- the share of normal images whose written mask shows a flagged region, with the pixel rule
  `region` (the threshold at which about image_fpr of normal images show a region of at least
  min_region pixels), against the same interval.

In process (method.detector), so the figures are the method's, not the engine's.

    python benchmarks/fpr_honesty.py [--data ../shared/data/magnetic_tile] [--targets 0.01 0.05] [--min-region 16]
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time

import numpy as np
from scipy import stats

from spade_batch.config import Settings
from spade_batch.formats.datasets import read_mvtec_category
from spade_batch.formats.feature_index import StoredFeatures
from spade_batch.formats.images import decode_image
from spade_batch.formats.layout import ModelLayout, part_files
from spade_batch.method.calibrate import calibrate_from_samples, id_hash, region_size
from spade_batch.method.calibration_search import InProcessHeldOut, calibration_matches, calibration_scores
from spade_batch.method.detector import Extractor, Scorer, fit
from spade_batch.method.masks import mask_from_map
from spade_batch.method.recipe import split_fit_ids
from spade_batch.method.trainset import size_outliers

REPOSITORY = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_DATA = os.path.join(REPOSITORY, "..", "shared", "data", "magnetic_tile")


def load(paths: list[str]) -> list[np.ndarray]:
    return [decode_image(open(path, "rb").read(), path) for path in paths]


def interval(count: int, rate: float) -> tuple[float, float]:
    """The binomial 99% interval of the observed share among `count` images when the true rate is `rate`."""
    low, high = stats.binom.interval(0.99, count, rate)
    return low / count, high / count


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default=DEFAULT_DATA)
    parser.add_argument("--targets", type=float, nargs="+", default=[0.01, 0.05])
    parser.add_argument("--min-region", type=int, default=16, help="min_region of the region rule, pixels at the working size")
    parser.add_argument("--modes", nargs="+", default=["held_out", "leave_one_out"])
    parser.add_argument("--k", type=int, default=5)
    args = parser.parse_args()

    category = read_mvtec_category(args.data)
    train = sorted(s.path for s in category.train)
    fitted_on = [p for p in train if id_hash(os.path.relpath(p, args.data)) < 0.5]
    unseen = [p for p in train if p not in set(fitted_on)] + sorted(s.path for s in category.test if not s.is_anomalous)
    print(f"{args.data}: fit on {len(fitted_on)} normal images, score {len(unseen)} unseen normal images; "
          f"efficientnet_lite0, K = {args.k}, min_region {args.min_region}")
    images, ids = load(fitted_on), [os.path.relpath(p, args.data) for p in fitted_on]
    unseen_images = load(unseen)
    base = Settings(backbone="efficientnet_lite0", weights="imagenet", k=args.k, device="cpu", calibration_fraction=0.2,
                    calibration_sample=0, pixel_rule="region", min_region=args.min_region, gate_masks=False, log_level="WARNING")
    print("| calibration | target | calibration images | image FPR | region share | 99% interval | within |")
    print("|---|---|---|---|---|---|---|")
    for mode in args.modes:
        started = time.perf_counter()
        settings = base.replace(calibration_images=mode)
        folder = tempfile.mkdtemp(prefix=f"fpr-honesty-{mode}-")
        model = fit(images, settings, ids=ids, folder=folder)
        extractor = Extractor(settings, preprocessing=model.card.preprocessing)
        results = Scorer(model, extractor).score(unseen_images)  # maps and scores do not depend on the targets
        stored = StoredFeatures.index(part_files(ModelLayout(folder).features, None))
        usable = sorted(stored.sizes)
        outliers = size_outliers(usable, [stored.sizes[i][0] for i in usable], [stored.sizes[i][1] for i in usable])
        _, calibration_ids = split_fit_ids([i for i in usable if i not in outliers], settings)
        matched = calibration_matches(model, calibration_ids, stored, InProcessHeldOut(stored, extractor, settings), {})
        joined = calibration_scores(model, calibration_ids, matched, region_size(settings.calibration))
        print(f"<!-- {mode}: fit, scoring and calibration scores {time.perf_counter() - started:.0f} s -->", flush=True)
        for target in args.targets:
            rule = calibrate_from_samples(model, joined, settings.replace(image_fpr=target).calibration).card.thresholds
            flagged = np.array([r.score > rule.image for r in results])
            regions = np.array([mask_from_map(r.anomaly_map, *image.shape[:2], rule).any() for r, image in zip(results, unseen_images)])
            low, high = interval(len(results), target)
            within = "yes" if low <= flagged.mean() <= high and low <= regions.mean() <= high else "no"
            print(f"| {mode} | {target} | {joined.knn_scores.size} | {flagged.mean():.4f} ({flagged.sum()}/{len(flagged)}) | "
                  f"{regions.mean():.4f} ({regions.sum()}) | [{low:.4f}, {high:.4f}] | {within} |", flush=True)


if __name__ == "__main__":
    main()
