"""Which decision defaults hold across training-set sizes and sets? Measured on the masks a run writes.

For each set (Magnetic Tile; the aligned synthetic set, formats.datasets.make_aligned_data; optionally
the demo texture) it draws 25, 50, 100, 200 and all normal training images from train/good (--seeds
draws of each size below all, the full set once), fits the product's defaults on them (efficientnet_lite0,
ImageNet weights, K = 5, 224 px, leave-one-out calibration of every training image) and scores the test
split. Then, per image-threshold estimator and mask rule, it applies the decisions as a scoring run
writes them (method.masks.shown_regions, which mask_from_map applies, at each image's original size) and
reports: image FPR on the normal test images against the target (pooled over the draws, with its
Clopper-Pearson 95% interval, and how many draws' intervals hold the target), image TPR, SegF1 of the
written masks, and the share of normal test images with flagged pixels; beside them the label-chosen
optimum (the best image F1 and the best SegF1 pixel threshold, chosen on the test labels: a ceiling).

Efficient on a few cores: every image's features are extracted ONCE into part files under --cache;
each draw builds its model from the cached parts (recipe.fit_from_features), re-reads its leave-one-out
matches to score every rule's calibration (no second search), and scores the test split from the cached
test features.

    python benchmarks/decision_sizes.py [--sets magnetic_tile aligned] [--sizes 25 50 100 200 0] [--seeds 3]
                                        [--cache /tmp/spade-decision-sizes] [--json decision_sizes.json]
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import os
import shutil
import time
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
from scipy import stats

from spade_batch.config import Settings
from spade_batch.formats import storage
from spade_batch.formats.calibration_matches import read_matches
from spade_batch.formats.card import Thresholds
from spade_batch.formats.datasets import Sample, make_aligned_data, make_demo_data, read_mask, read_mvtec_category
from spade_batch.formats.feature_index import StoredFeatures
from spade_batch.formats.features import read_features
from spade_batch.formats.images import decode_image, resize_map
from spade_batch.formats.layout import ModelLayout, part_files
from spade_batch.method import image_threshold
from spade_batch.method.calibrate import CalibrationScores, calibrate_from_samples
from spade_batch.method.calibration_search import InProcessHeldOut, calibration_matches, calibration_scores
from spade_batch.method.detector import Extractor, Scorer, extract_features
from spade_batch.method.extractor import Features
from spade_batch.method.masks import shown_regions
from spade_batch.method.recipe import fit_from_features
from spade_batch.method.score_rules import image_scores
from spade_batch.reports.metrics import PixelDecisions, PixelMetrics, f1_optimal_image_threshold, f1_optimal_pixel_threshold

REPOSITORY = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MAGNETIC_TILE = os.path.join(REPOSITORY, "..", "shared", "data", "magnetic_tile")
SIZE_FOLLOWING = "size_following"
"""Not a product estimator: the order statistic at a target that follows the calibration's size, max(target, 2 / (n + 1))
(the second largest of n < 2 / target scores), measured against the largest score that the 1% target gives below 100."""
ESTIMATORS = (*image_threshold.ESTIMATORS, SIZE_FOLLOWING)
"""Image-threshold estimators compared (image_threshold_for)."""
RULES = {
    "gated (today)": {"gate_masks": True},
    "ungated": {"gate_masks": False},
    "(a) gated + region evidence": {"gate_masks": True, "region_fpr": "image_fpr"},
    "(b) looser gate": {"gate_masks": True, "gate_fpr": "gate_fpr"},
    "(a+b) looser gate + region evidence": {"gate_masks": True, "gate_fpr": "gate_fpr", "region_fpr": "image_fpr"},
    "(c) region evidence only": {"gate_masks": False, "region_fpr": "image_fpr"},
}
"""Mask rules compared: calibration settings; a string value takes that command-line option's value."""


def estimate_for(scores: np.ndarray, image_fpr: float, estimator: str) -> image_threshold.ImageThreshold:
    """The image threshold an estimator sets from B calibration image scores (float64) for a target FPR, with the
    promise `show` states for it (its FprLaw).

    The one place the benchmark computes image thresholds: plug in the other estimators here.
    """
    if estimator == SIZE_FOLLOWING:
        return image_threshold.estimate_image_threshold(scores, max(image_fpr, 2 / (len(scores) + 1)), "order_statistic")
    return image_threshold.estimate_image_threshold(scores, image_fpr, estimator)


def image_threshold_for(scores: np.ndarray, image_fpr: float, estimator: str) -> float:
    return estimate_for(scores, image_fpr, estimator).threshold


def promise_interval(law: tuple[float, float], normal: int, level: float = 0.95) -> tuple[int, int]:
    """The central `level` interval of the false alarms among `normal` new normal images that a stated FPR law
    Beta(a, b) predicts (beta-binomial): a draw keeps its promise when its false alarms lie inside."""
    distribution = stats.betabinom(normal, *law)
    return int(distribution.ppf((1 - level) / 2)), int(distribution.ppf((1 + level) / 2))


def stated_law(record: dict, image_fpr: float) -> tuple[float, float] | None:
    """The FprLaw (a, b) `show` states for a record's image threshold: recorded, or (records written before it was)
    the order statistic's exact law from its rank, which needs no scores (None for a fitted estimator's)."""
    if "law" in record:
        return tuple(record["law"])
    if record["estimator"] not in ("order_statistic", SIZE_FOLLOWING):
        return None
    target = max(image_fpr, 2 / (record["size"] + 1)) if record["estimator"] == SIZE_FOLLOWING else image_fpr
    law = image_threshold.FprLaw.order_statistic(record["size"], image_threshold.order_statistic_rank(record["size"], target))
    return law.a, law.b


def clopper_pearson(flagged: int, total: int, level: float = 0.95) -> tuple[float, float]:
    """The exact binomial interval of a rate seen as flagged of total."""
    alpha = 1 - level
    low = 0.0 if flagged == 0 else float(stats.beta.ppf(alpha / 2, flagged, total - flagged + 1))
    high = 1.0 if flagged == total else float(stats.beta.ppf(1 - alpha / 2, flagged + 1, total - flagged))
    return low, high


# --- the sets and their cached features --------------------------------------------------------------------


def set_root(name: str, cache: str, data: str) -> str:
    """The MVTec-layout category of a set: Magnetic Tile, or a synthetic one written once under cache."""
    if name == "magnetic_tile":
        return data
    root = os.path.join(cache, "data", name)
    if not os.path.isdir(root):
        counts = {"n_train": 300, "n_test_good": 120, "n_test_per_defect": 30}
        maker = make_aligned_data if name == "aligned" else make_demo_data
        shutil.rmtree(os.path.join(cache, "data-tmp", name), ignore_errors=True)
        folder = maker(os.path.join(cache, "data-tmp"), category=name, **counts)
        os.makedirs(os.path.dirname(root), exist_ok=True)
        os.rename(folder, root)
    return root


def cached_features(samples: list[Sample], root: str, folder: str, extractor: Extractor, every: list[Sample]) -> StoredFeatures:
    """The part files of these images' features in folder (with a suffix naming them when they are not `every` image
    of the split, unless every image's are there), extracted once (a `done` file marks them complete)."""
    if len(samples) != len(every) and not os.path.exists(os.path.join(folder, "done")):
        folder += "-" + hashlib.sha256("\n".join(s.path for s in samples).encode()).hexdigest()[:10]
    done = os.path.join(folder, "done")
    if not os.path.exists(done):
        features = os.path.join(folder, "features")
        for start in range(0, len(samples), 64):
            shard = samples[start : start + 64]
            images = [decode_image(open(s.path, "rb").read(), s.path) for s in shard]
            extract_features(extractor, images, [os.path.relpath(s.path, root) for s in shard], features, 64)
        open(done, "w").close()
    return StoredFeatures.index(part_files(os.path.join(folder, "features"), None))


@dataclass
class TestSplit:
    """The test split: ids, labels (True = defective), original sizes, ground truth at that size, and features."""

    ids: list[str]
    labels: np.ndarray
    sizes: list[tuple[int, int]]
    truths: list[np.ndarray]
    features: StoredFeatures


def test_samples(category, per_defect: int) -> list[Sample]:
    """Every normal test image, and per defect type `per_defect` of its images evenly spread over them (0: all)."""
    chosen = [s for s in category.test if not s.is_anomalous]
    for defect in category.defect_types:
        images = [s for s in category.test if s.label == defect]
        if per_defect and per_defect < len(images):
            images = [images[i] for i in np.linspace(0, len(images) - 1, per_defect).round().astype(int)]
        chosen += images
    return chosen


def test_split(samples: list[Sample], root: str, features: StoredFeatures) -> TestSplit:
    ids = [os.path.relpath(s.path, root) for s in samples]
    sizes = [features.sizes[i] for i in ids]
    truths = [read_mask(s.mask_path, *size) for s, size in zip(samples, sizes)]
    return TestSplit(ids, np.array([s.is_anomalous for s in samples]), sizes, truths, features)


def draws(train_ids: list[str], sizes: list[int], seeds: int) -> Iterator[tuple[int, int, list[str]]]:
    """(size, seed, ids): `seeds` random draws of each size below the set's, the whole set once (size 0 or >= it)."""
    done_full = False
    for size in sizes:
        if size == 0 or size >= len(train_ids):
            if not done_full:
                done_full = True
                yield len(train_ids), 0, list(train_ids)
            continue
        for seed in range(seeds):
            chosen = np.random.default_rng([size, seed]).choice(len(train_ids), size, replace=False)
            yield size, seed, sorted(train_ids[i] for i in chosen)


def subset(stored: StoredFeatures, ids: list[str]) -> StoredFeatures:
    return StoredFeatures({i: stored.parts[i] for i in ids}, {i: stored.sizes[i] for i in ids}, [],
                          {i: stored.sources[i] for i in ids}, stored.options)


# --- one draw: model, calibration scores, test maps ---------------------------------------------------------


def fit_draw(stored: StoredFeatures, ids: list[str], extractor: Extractor, settings: Settings, folder: str):
    """The model of these training images, and its calibration images' scores with region scores at min_region."""
    shutil.rmtree(folder, ignore_errors=True)
    os.makedirs(folder)
    result = fit_from_features(subset(stored, ids), extractor, settings, folder)
    model = result.model
    matches = read_matches(storage.read_bytes(os.path.join(folder, ModelLayout.calibration_matches)), model.card.layer_shapes)
    features = subset(stored, ids)
    matched = calibration_matches(model, result.calibration_ids, features, InProcessHeldOut(features, extractor, settings), matches)
    return model, calibration_scores(model, result.calibration_ids, matched, settings.min_region)


def test_maps(model, extractor: Extractor, split: TestSplit) -> tuple[np.ndarray, list[np.ndarray]]:
    """The test images' scores (N float64) and their anomaly maps at each image's original size, in split order."""
    scorer = Scorer(model, extractor)
    by_id = {}
    for part in split.features.parts_of(split.ids):
        table = read_features([part])
        for image_id, result in zip(table.ids, scorer.score_features(Features.of_table(table))):
            by_id[image_id] = result
    scores = np.array([by_id[i].score for i in split.ids], np.float64)
    fulls = [resize_map(by_id[i].anomaly_map, *size) for i, size in zip(split.ids, split.sizes)]
    return scores, fulls


def rule_thresholds(model, scores: CalibrationScores, settings: Settings, changes: dict, estimator: str, args) -> tuple[Thresholds, tuple[float, float]]:
    """The thresholds of one mask rule and estimator (the product's calibration, its image levels from estimate_for),
    and the image threshold's stated FPR law (a, b)."""
    values = {key: (getattr(args, value) if isinstance(value, str) else value) for key, value in changes.items()}
    calibrated = calibrate_from_samples(model, scores, settings.replace(**{"region_fpr": 0.0, "gate_fpr": 0.0, **values}).calibration)
    normal = image_scores(scores.knn_scores, scores.map_scores, model.card.settings.image_score, calibrated.card.normalisation)
    thresholds = calibrated.card.thresholds
    gate = image_threshold_for(normal, values["gate_fpr"], estimator) if values.get("gate_fpr") else None
    image = estimate_for(normal, settings.image_fpr, estimator)
    return dataclasses.replace(thresholds, image=image.threshold, gate=gate), (image.law.a, image.law.b)


def measure(thresholds: Thresholds, scores: np.ndarray, fulls: list[np.ndarray], split: TestSplit, map_pixels: int) -> dict:
    """Decision quality of the written masks and verdicts on the test split."""
    flagged = scores > thresholds.image
    normal = ~split.labels
    pixels = PixelDecisions()
    for full, score, truth, defective in zip(fulls, scores, split.truths, split.labels):
        pixels.update(shown_regions(full, thresholds, float(score), map_pixels), truth, normal_image=not defective)
    counts = pixels.to_dict()
    true_pos = int((flagged & split.labels).sum())
    return {
        "false_alarms": int((flagged & normal).sum()), "normal": int(normal.sum()), "tpr": true_pos / int(split.labels.sum()),
        "image_f1": 2 * true_pos / (2 * true_pos + int((flagged & normal).sum()) + int((~flagged & split.labels).sum())),
        "seg_f1": counts["seg_f1"], "normal_images_flagged": counts["normal_images_flagged"],
    }


def optimum(scores: np.ndarray, fulls: list[np.ndarray], split: TestSplit) -> dict:
    """The label-chosen ceiling: best image F1 over the test scores, best SegF1 over pixel thresholds (every image's map)."""
    _, image_f1 = f1_optimal_image_threshold(scores, split.labels)
    metrics = PixelMetrics(min(float(f.min()) for f in fulls), max(float(f.max()) for f in fulls))
    for full, truth in zip(fulls, split.truths):
        metrics.update(full[None], truth[None])
    _, seg_f1 = f1_optimal_pixel_threshold(metrics)
    return {"image_f1": image_f1, "seg_f1": seg_f1}


# --- report ---------------------------------------------------------------------------------------------------


def summarise(records: list[dict], image_fpr: float) -> list[str]:
    """Markdown rows: per (set, size, estimator, rule) the draws pooled."""
    rows, groups = [], {}
    for record in records:
        groups.setdefault((record["set"], record["size"], record["estimator"], record["rule"]), []).append(record)
    for (name, size, estimator, rule), group in groups.items():
        alarms, normal = sum(r["false_alarms"] for r in group), sum(r["normal"] for r in group)
        low, high = clopper_pearson(alarms, normal)
        holding = sum(clopper_pearson(r["false_alarms"], r["normal"])[0] <= image_fpr <= clopper_pearson(r["false_alarms"], r["normal"])[1]
                      for r in group)
        laws = [stated_law(r, image_fpr) for r in group]
        if None in laws:
            stated, kept = "-", "-"
        else:
            stated = f"{np.mean([a / (a + b) for a, b in laws]):.3f}"
            kept = sum(low_ <= r["false_alarms"] <= high_ for r, law in zip(group, laws) for low_, high_ in [promise_interval(law, r["normal"])])
        mean = {key: float(np.mean([r[key] for r in group])) for key in ("tpr", "image_f1", "seg_f1", "opt_image_f1", "opt_seg_f1")}
        shown = sum(r["normal_images_flagged"] for r in group) / normal
        rows.append(f"| {name} | {size} | {estimator} | {rule} | {alarms / normal:.3f} [{low:.3f}, {high:.3f}] | {holding}/{len(group)} | "
                    f"{stated} | {kept}/{len(group)} | "
                    f"{mean['tpr']:.3f} | {mean['image_f1']:.3f} | {mean['seg_f1']:.3f} | {shown:.3f} | "
                    f"{mean['opt_image_f1']:.3f} | {mean['opt_seg_f1']:.3f} |")
    return rows


HEADER = ("| set | training images | estimator | mask rule | image FPR [95% CI] | draws holding target | stated FPR | draws keeping "
          "the stated promise | image TPR | image F1 | SegF1 | normal images with flagged pixels | optimum image F1 | optimum SegF1 |\n"
          "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default=MAGNETIC_TILE, help="Magnetic Tile's category folder")
    parser.add_argument("--sets", nargs="+", default=["magnetic_tile", "aligned"], choices=["magnetic_tile", "aligned", "texture"])
    parser.add_argument("--sizes", nargs="+", type=int, default=[25, 50, 100, 200, 0], help="training images; 0: all")
    parser.add_argument("--seeds", type=int, default=3, help="draws of each size below all")
    parser.add_argument("--cache", default="/tmp/spade-decision-sizes")
    parser.add_argument("--json", default="decision_sizes.json")
    parser.add_argument("--k", type=int, default=5)
    parser.add_argument("--image-fpr", type=float, default=0.01)
    parser.add_argument("--gate-fpr", type=float, default=0.05, help="the looser gate's FPR, rules (b)")
    parser.add_argument("--min-region", type=int, default=0, help="pixels at the working size (the product's default 0)")
    parser.add_argument("--test-defects", type=int, default=0, help="defective test images per defect type (0: all); every normal one is kept")
    parser.add_argument("--report", metavar="JSON", nargs="+", help="only print the tables of these JSON files' records")
    args = parser.parse_args()
    if args.report:
        records = [record for path in args.report for record in json.load(open(path))]
        print(HEADER)
        print("\n".join(summarise(sorted(records, key=lambda r: (r["set"], r["size"])), args.image_fpr)))
        return

    settings = Settings(backbone="efficientnet_lite0", weights="imagenet", k=args.k, device="cpu", image_fpr=args.image_fpr,
                        calibration_sample=0, min_region=args.min_region, log_level="WARNING")
    extractor = Extractor(settings)
    records: list[dict] = []
    print(f"efficientnet_lite0 (ImageNet), K = {args.k}, 224 px, leave-one-out, pixel rule {settings.pixel_rule}, "
          f"image_fpr {args.image_fpr}, region_fpr {args.image_fpr}, gate_fpr {args.gate_fpr}, min_region {args.min_region}", flush=True)
    for name in args.sets:
        started = time.perf_counter()
        root = set_root(name, args.cache, args.data)
        category = read_mvtec_category(root)
        every_id = {os.path.relpath(s.path, root): s for s in category.train}
        plan = list(draws(sorted(every_id), args.sizes, args.seeds))
        needed = sorted({i for _, _, ids in plan for i in ids})
        train = cached_features([every_id[i] for i in needed], root, os.path.join(args.cache, name, "train"), extractor, category.train)
        tests = test_samples(category, args.test_defects)
        split = test_split(tests, root, cached_features(tests, root, os.path.join(args.cache, name, "test"), extractor, category.test))
        print(f"<!-- {name}: {len(train.sizes)} of {len(category.train)} training, {len(split.ids)} test images ({split.labels.sum()} "
              f"defective); features {time.perf_counter() - started:.0f} s -->", flush=True)
        for size, seed, ids in plan:
            started = time.perf_counter()
            folder = os.path.join(args.cache, "models", f"{name}-{size}-{seed}")
            model, scores = fit_draw(train, ids, extractor, settings, folder)
            test_scores, fulls = test_maps(model, extractor, split)
            ceiling = optimum(test_scores, fulls, split)
            map_pixels = model.card.preprocessing.size ** 2
            for estimator in ESTIMATORS:
                for rule, changes in RULES.items():
                    thresholds, law = rule_thresholds(model, scores, settings, changes, estimator, args)
                    records.append({"set": name, "size": size, "seed": seed, "estimator": estimator, "rule": rule,
                                    **measure(thresholds, test_scores, fulls, split, map_pixels),
                                    "opt_image_f1": ceiling["image_f1"], "opt_seg_f1": ceiling["seg_f1"],
                                    "thresholds": dataclasses.asdict(thresholds), "law": law})
            print(f"<!-- {name} {size} images, draw {seed}: {time.perf_counter() - started:.0f} s -->", flush=True)
            with open(args.json, "w") as f:
                json.dump(records, f, indent=1)
    print(HEADER)
    print("\n".join(summarise(records, args.image_fpr)))


if __name__ == "__main__":
    main()
