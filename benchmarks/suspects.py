"""Suspect training images: defect images mixed into train/good, are they caught, and what does leaving them out do?

Fits on N normal images of an MVTec-layout category's train/good (every k-th by name) plus one defective test image
of each of the first D defect types (the first by name), in process (method.detector.fit, leave-one-out calibration),
then prints: which calibration images the suspect rule (method.image_threshold.suspects) flags, how many defects it
catches and how many normal images it suspects wrongly, and the image threshold of each estimator (with its expected
false-positive rate and 90% range) with the suspects kept, left out (calibration setting suspects leave_out: the
recipe's second pass, from the same feature parts), and with no defect mixed in at all.

Measured (Magnetic Tile, efficientnet_lite0 imagenet, K=5, image_fpr 0.01, 2 shared cores):
- 100 normal + the first defect image of each of 5 types: 0 of 5 caught, 0 of 100 normal suspected; the defects'
  leave-one-out scores rank 7, 43, 47, 82 and 104 of 104 (robust z 1.42 down to -2.39; the top normal images 2.12):
  they look like normal images to the scores, so no rule on them can find these. Threshold 2433 (keep = leave_out),
  2490 without the defects.
- 50 normal + the defect image of each type with the largest defect (--pick largest): 0 of 5 caught, 0 of 50 normal
  suspected; two defects rank 1 and 2 of 53 (robust z 2.66 and 2.62, the top normal 1.68) and raise the threshold from
  2191 (no defects) to 2771 (+26%), below the suspect limit of 3383 (z 3.5).

    nice -n 10 python benchmarks/suspects.py [--data ../shared/data/magnetic_tile] [--normal 100] [--defects 5] [--k 5] [--pick first|largest]
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import tempfile
import time

import numpy as np

from spade_batch.config import Settings
from spade_batch.formats import storage
from spade_batch.formats.calibration_matches import read_matches
from spade_batch.formats.feature_index import StoredFeatures
from spade_batch.formats.images import decode_image
from spade_batch.formats.layout import ModelLayout, part_files
from spade_batch.formats.model import SpadeModel
from spade_batch.method.calibration_search import calibration_scores
from spade_batch.method.detector import Extractor, fit
from spade_batch.method.image_threshold import ESTIMATORS, estimate_image_threshold, suspect_limit
from spade_batch.method.recipe import fit_from_features
from spade_batch.method.score_rules import image_scores

REPOSITORY = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_DATA = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "..", "shared", "data", "magnetic_tile")


def defect_share(root: str, kind: str, name: str) -> float:
    """The share of a defective test image's pixels its ground-truth mask marks."""
    path = os.path.join(root, "ground_truth", kind, name.replace(".png", "_mask.png"))
    with open(path, "rb") as handle:
        return float((decode_image(handle.read(), path)[..., 0] > 0).mean())


def training_set(root: str, normal: int, defects: int, pick: str) -> tuple[list[str], list[np.ndarray]]:
    """(ids, H x W x 3 uint8 images): `normal` of train/good, evenly by name, as good/<name>; one defective test image of
    each of the first `defects` defect types (pick first: the first by name; largest: the one whose defect covers the
    largest share of the image), as defect/<type>/<name>."""
    good = sorted(os.listdir(os.path.join(root, "train", "good")))
    chosen = [f"train/good/{name}" for name in good[:: max(1, len(good) // normal)][:normal]]
    types = sorted(t for t in os.listdir(os.path.join(root, "test")) if t != "good")[:defects]
    for kind in types:
        names = sorted(os.listdir(os.path.join(root, "test", kind)))
        name = names[0] if pick == "first" else max(names, key=lambda n: defect_share(root, kind, n))
        chosen.append(f"test/{kind}/{name}")
    ids = [path.replace("train/good/", "good/").replace("test/", "defect/") for path in chosen]
    images = []
    for path in chosen:
        with open(os.path.join(root, path), "rb") as handle:
            images.append(decode_image(handle.read(), path))
    return ids, images


def scores_by_id(model: SpadeModel) -> dict[str, float]:
    """id -> leave-one-out image score of each calibration image, made again from the matches the model keeps
    (calibration_search.calibration_scores; the card keeps the scores without ids)."""
    matches = read_matches(storage.read_bytes(ModelLayout(model.folder).file(ModelLayout.calibration_matches)), model.card.layer_shapes)
    ids = sorted(matches)
    made = calibration_scores(model, ids, {i: (0.0, matches[i]) for i in ids}, None)
    return dict(zip(ids, image_scores(made.knn_scores, made.map_scores, model.card.settings.image_score, model.card.normalisation).tolist()))


def thresholds(scores: np.ndarray, image_fpr: float) -> dict[str, str]:
    """Each estimator's threshold on these calibration scores, with its expected FPR and 90% range."""
    rows = {}
    for estimator in ESTIMATORS:
        found = estimate_image_threshold(scores, image_fpr, estimator)
        low, high = found.fpr_range
        used = "" if found.estimator == estimator else f" ({found.estimator})"
        rows[estimator] = f"{found.threshold:10.4g}{used}  expected FPR {found.expected_fpr:.4f} (90% {low:.4f}-{high:.4f})"
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=DEFAULT_DATA)
    parser.add_argument("--normal", type=int, default=100)
    parser.add_argument("--defects", type=int, default=5)
    parser.add_argument("--k", type=int, default=5)
    parser.add_argument("--image-fpr", type=float, default=0.01)
    parser.add_argument("--pick", choices=("first", "largest"), default="first", help="which defective image of each type")
    args = parser.parse_args()
    settings = Settings(backbone="efficientnet_lite0", weights="imagenet", k=args.k, image_fpr=args.image_fpr, calibration_sample=0)
    started = time.perf_counter()
    ids, images = training_set(args.data, args.normal, args.defects, args.pick)
    folder = tempfile.mkdtemp(prefix="suspects-")
    kept = fit(images, settings, ids, folder=os.path.join(folder, "keep"))
    features = StoredFeatures.index(part_files(ModelLayout(os.path.join(folder, "keep")).features, None))
    extractor = Extractor(settings)
    left = fit_from_features(features, extractor, settings.replace(suspects="leave_out"), os.path.join(folder, "leave_out")).model
    normal_only = {i for i in features.sizes if i.startswith("good/")}
    clean_features = dataclasses.replace(features, sizes={i: s for i, s in features.sizes.items() if i in normal_only},
                                         parts={i: p for i, p in features.parts.items() if i in normal_only})
    clean = fit_from_features(clean_features, extractor, settings, os.path.join(folder, "clean")).model

    suspects = kept.card.calibration.suspects
    caught = [s for s in suspects if s["id"].startswith("defect/")]
    wrong = [s for s in suspects if s["id"].startswith("good/")]
    defect_ids = [i for i in ids if i.startswith("defect/")]
    calibration_scores = np.asarray(kept.card.calibration.image_scores)
    print(f"{args.data}: {args.normal} normal + {len(defect_ids)} defect training images, efficientnet_lite0 imagenet, K={args.k}, "
          f"leave-one-out, image_fpr {args.image_fpr}, defects picked {args.pick} ({time.perf_counter() - started:.0f} s)")
    print(f"calibration images: {kept.card.calibration.count} (keep), {left.card.calibration.count} (leave_out), "
          f"{clean.card.calibration.count} (no defects)")
    print(f"suspects: {len(suspects)}; defects caught {len(caught)} of {len(defect_ids)}; normal images wrongly suspected {len(wrong)} "
          f"of {args.normal}")
    print(f"median calibration score {np.median(calibration_scores):.4g}, suspect limit {suspect_limit(calibration_scores):.4g}")
    by_id = scores_by_id(kept)
    ranked = sorted(by_id, key=lambda i: -by_id[i])
    suspected = {entry["id"] for entry in suspects}
    for image_id in [*[i for i in ranked if i.startswith("defect/")], *[i for i in ranked if i in suspected and i.startswith("good/")]]:
        print(f"  {image_id}: leave-one-out score {by_id[image_id]:.4g}, rank {ranked.index(image_id) + 1} of {len(ranked)}"
              f"{' (suspect)' if image_id in suspected else ''}")
    print("image thresholds (order_statistic is the model's; the others on the same calibration scores):")
    print(f"  model keep      : {kept.card.thresholds.image:.4g}")
    print(f"  model leave_out : {left.card.thresholds.image:.4g}")
    print(f"  model no defects: {clean.card.thresholds.image:.4g}")
    for name, model in (("keep", kept), ("leave_out", left), ("no defects", clean)):
        for estimator, row in thresholds(np.asarray(model.card.calibration.image_scores), args.image_fpr).items():
            print(f"  {name:10s} {estimator:15s} {row}")


if __name__ == "__main__":
    main()
