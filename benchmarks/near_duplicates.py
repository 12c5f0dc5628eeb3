"""Near-duplicates in a training set: how close distinct normal images are, how close re-exports are, and what a
re-exported set does to leave-one-out thresholds with and without leaving near-copies out of each other's calibration.

    python benchmarks/near_duplicates.py [--data ../shared/data/magnetic_tile] [--skip-thresholds]

1. Every train/good image's global feature (efficientnet_lite0, ImageNet weights, 224 px): each image's squared distance
   to its nearest other image, against the scale (trainset.near_duplicates: the median distance to the
   NEAR_SCALE_RANK-th nearest); and the same ratio for re-exports of 10 images (JPEG 95 and 75, 5 grey levels
   brighter, shifted 2 px, cropped 2%, resized 90%).
2. Every 20th image (32), 128 px, k 5, leave-one-out on all, image_fpr 0.05: the threshold alone, then with JPEG-95
   re-exports of 3 or of all 32 added under other ids, near-copies left out of each other's calibration or not.

Magnetic Tile (2 shared CPU cores, December 2026): 634 images, scale 34.88, nearest / scale min 0.0727 (1%: 0.108), none
below NEAR_FRACTION 0.03; re-exports / scale: JPEG 95 max 0.0017, 5 grey levels brighter max 0.0078, JPEG 75 0.055
(median), shifted 2 px 0.135, resized 90% 0.111, cropped 2% 0.723 (medians). Thresholds: 32 images 2396.9; + 3 re-exports,
kept: 2396.9 but the 6 images score about 5 (the others 875 and up); left out: 2396.9, the lowest 891; + 32 re-exports,
kept: 7.8 (every normal image would be flagged); left out: 2561.5 (64 of 64 flagged as near-duplicates).
"""

from __future__ import annotations

import argparse
import glob
import io
import os
import tempfile

import numpy as np
from PIL import Image

from spade_batch.config import Settings
from spade_batch.formats.images import decode_image
from spade_batch.method import calibration_search, detector
from spade_batch.method.extractor import Extractor
from spade_batch.method.trainset import NEAR_FRACTION, NEAR_SCALE_RANK, size_outliers

REPOSITORY = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_DATA = os.path.join(REPOSITORY, "..", "shared", "data", "magnetic_tile")
LITE0 = Settings(backbone="efficientnet_lite0", weights="imagenet", device="cpu")


def global_features(extractor: Extractor, images: list[np.ndarray]) -> np.ndarray:
    """N x D float64 global features, 16 images at a time."""
    rows = [extractor.forward(np.stack([extractor.prepare(i) for i in images[s : s + 16]])).global_features.numpy()
            for s in range(0, len(images), 16)]
    return np.concatenate(rows).astype(np.float64)


def reexports(image: np.ndarray) -> dict[str, np.ndarray]:
    """Copies of an H x W x 3 uint8 image as a person or a pipeline might make them."""
    pil, pixels = Image.fromarray(image), image.astype(np.int16)
    width, height = pil.size
    copies = {}
    for quality in (95, 75):
        data = io.BytesIO()
        pil.save(data, "JPEG", quality=quality)
        copies[f"jpeg {quality}"] = np.asarray(Image.open(data).convert("RGB"))
    copies["5 grey levels brighter"] = np.clip(pixels + 5, 0, 255).astype(np.uint8)
    copies["shifted 2 px"] = np.roll(image, 2, axis=1)
    copies["cropped 2%"] = np.asarray(pil.crop((width // 50, height // 50, width - width // 50, height - height // 50)))
    copies["resized 90%"] = np.asarray(pil.resize((int(width * 0.9), int(height * 0.9)), Image.BILINEAR))
    return copies


def distances(images: list[np.ndarray], names: list[str]) -> None:
    sizes = [image.shape[:2] for image in images]
    outliers = size_outliers(names, [h for h, _ in sizes], [w for _, w in sizes])
    kept = [i for i, name in enumerate(names) if name not in outliers]
    extractor = Extractor(LITE0)
    features = global_features(extractor, [images[i] for i in kept])
    squared = (features**2).sum(1)
    between = squared[:, None] + squared[None, :] - 2 * features @ features.T
    np.fill_diagonal(between, np.inf)
    ranked = np.sort(between, axis=1)
    scale = float(np.median(ranked[:, NEAR_SCALE_RANK - 1]))
    ratio = ranked[:, 0] / scale
    print(f"{len(kept)} images ({len(outliers)} size outliers out); scale {scale:.4g}; nearest / scale: min {ratio.min():.4f}, "
          f"1% {np.quantile(ratio, 0.01):.4f}, median {np.median(ratio):.4f}; below {NEAR_FRACTION}: {int((ratio < NEAR_FRACTION).sum())}")
    found: dict[str, list[float]] = {}
    for index in kept[::60][:10]:
        original = global_features(extractor, [images[index]])[0]
        for name, copy in reexports(images[index]).items():
            found.setdefault(name, []).append(float(((global_features(extractor, [copy])[0] - original) ** 2).sum()) / scale)
    for name, ratios in found.items():
        print(f"  {name}: distance to its original / scale: median {np.median(ratios):.4f}, max {max(ratios):.4f}")


def thresholds(images: list[np.ndarray], names: list[str]) -> None:
    settings = LITE0.replace(k=5, image_size=128, calibration_sample=0, image_fpr=0.05)
    images, names = images[::20], names[::20]
    leave_out = calibration_search.own_rows

    def own_row_only(model, ids):  # what calibration left out before near-copies were: the image's own row
        rows = np.array([model.row_of.get(i, -1) for i in ids], np.int64)
        return rows[:, None] if (rows >= 0).any() else None

    def fit(label: str, more: int, near_copies_out: bool) -> None:
        copies = [np.asarray(Image.open(io.BytesIO(_jpeg(image))).convert("RGB")) for image in images[:more]]
        calibration_search.own_rows = leave_out if near_copies_out else own_row_only
        try:
            model = detector.fit([*images, *copies], settings, [*names, *(f"reexport/{n}" for n in names[:more])], folder=tempfile.mkdtemp())
        finally:
            calibration_search.own_rows = leave_out
        near, scores = model.card.training.near_duplicates, np.array(model.card.calibration.image_scores)
        print(f"{label:48s} near-duplicates {near.count:3d} of {near.checked:3d}; threshold {model.card.thresholds.image:9.5g}; "
              f"lowest scores {np.round(scores[:3], 1).tolist()}")

    fit(f"{len(images)} images", 0, True)
    for more in (3, len(images)):
        for out in (False, True):
            fit(f"+ {more} JPEG-95 re-exports, near-copies {'left out' if out else 'kept'}", more, out)


def _jpeg(image: np.ndarray) -> bytes:
    data = io.BytesIO()
    Image.fromarray(image).save(data, "JPEG", quality=95)
    return data.getvalue()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=DEFAULT_DATA)
    parser.add_argument("--skip-thresholds", action="store_true")
    args = parser.parse_args()
    files = sorted(glob.glob(os.path.join(args.data, "train", "good", "*.png")))
    if not files:
        raise SystemExit(f"no PNG images in {os.path.join(args.data, 'train', 'good')}: give the data set's folder with --data")
    images = [decode_image(open(path, "rb").read(), path) for path in files]
    names = [os.path.basename(path) for path in files]
    distances(images, names)
    if not args.skip_thresholds:
        thresholds(images, names)


if __name__ == "__main__":
    main()
