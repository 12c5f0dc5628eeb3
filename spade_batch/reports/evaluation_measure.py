"""What an evaluation measures: one pass over the test images' maps, ground truths and written masks (streamed, one
image at a time, into binned `PixelMetrics` and integer counts), and the metrics.json document built from it."""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from spade_batch.config import Settings
from spade_batch.formats import storage
from spade_batch.formats.card import ModelCard
from spade_batch.formats.datasets import read_mask
from spade_batch.formats.images import Preprocessing, decode_image, preprocess_mask, resize_for_model, resize_map
from spade_batch.formats.layout import Outputs
from spade_batch.method.masks import flagged_pixels
from spade_batch.reports.metrics import (
    PixelDecisions,
    PixelMetrics,
    f1_optimal_image_threshold,
    f1_optimal_pixel_threshold,
    image_decisions,
    image_rocauc,
)

if TYPE_CHECKING:
    import pyarrow as pa

    from spade_batch.engine.score import ScoreSummary

log = logging.getLogger(__name__)

BINS = 4096
AU_PRO_MAX_FPR = 0.05
"""MVTec AD 2's headline AU-PRO limit, reported beside the MVTec AD PRO to FPR 0.3 (PixelMetrics' max_fpr)."""
AU_PRO_KEY = "au_pro_0.05"


@dataclass(frozen=True)
class ScoredImage:
    """A scored test image: its id in the scoring run, label ("good" or the defect type), original size."""

    id: str
    uri: str
    label: str
    score: float
    height: int
    width: int
    mask_path: str | None
    is_anomalous: bool | None = None
    """The run's verdict (scores table); None without an image threshold."""
    mask_uri: str | None = None
    """The mask PNG the run wrote."""


@dataclass
class ScoredSamples:
    """A scoring run of a list of samples: its summary, scores table, the images it scored and those that failed."""

    summary: ScoreSummary
    table: pa.Table
    images: list[ScoredImage]
    failures: list[dict[str, str]]


@dataclass
class ExampleData:
    """What an example row needs, kept for a few images only: S x S x 3 uint8 view, S x S truth and map."""

    image: ScoredImage
    view: np.ndarray
    ground_truth: np.ndarray
    anomaly_map: np.ndarray


@dataclass
class PixelPass:
    """What one pass over the test images' maps and masks gathers; none of it grows with the images' pixels."""

    working: dict[str, PixelMetrics]
    """"overall" and per defect type, at the working size."""
    original: dict[str, PixelMetrics] | None
    """The same at each image's original size, or None."""
    decisions: PixelDecisions | None
    """The written masks against the ground truth; None when the masks are not binary (no pixel threshold)."""
    normal_maxima: list[float]
    """Each good image's highest map value at the ranking resolution (which of them a pixel threshold flags)."""
    examples: dict[str, ExampleData]

    @property
    def primary(self) -> dict[str, PixelMetrics]:
        """The ranking metrics reported as the headline: original size when computed, else the working size."""
        return self.original if self.original is not None else self.working


@dataclass(frozen=True)
class MapComparison:
    """How a run's maps and masks are compared with the ground truth."""

    spec: Preprocessing
    """The model's preprocessing: the working grid the maps are on."""
    high: float
    """The run's largest pixel score: the upper end of the metrics' bins."""
    at_original: bool
    """Ranking metrics at each image's original size too (only with "full" preprocessing)."""
    binary_masks: bool
    """The run wrote 0/255 masks (a pixel threshold was known): the decisions are measured on them."""
    masks_at_original: bool
    """Those masks are at each image's original size (else at the working size)."""

    @classmethod
    def of_run(cls, scored: ScoredSamples, spec: Preprocessing, at_original: bool) -> MapComparison:
        summary = scored.summary
        return cls(
            spec=spec,
            high=float(scored.table.column("max_pixel_score").drop_null().to_numpy().max(initial=0.0)),
            at_original=at_original,
            binary_masks=summary.thresholds["pixel"] is not None and summary.mask_kind.startswith("binary"),
            masks_at_original=summary.settings["preprocess"] == "full",  # where score wrote the masks (cpu_stages)
        )


def pixel_pass(
    images: Sequence[ScoredImage], outputs: Outputs, comparison: MapComparison, wanted: set[str], options: storage.StorageOptions,
) -> PixelPass:
    """Stream each map, its ground truth and its written mask once, one image at a time.

    A defect type's metrics see its own images plus all good images; wanted: the ids whose view, truth and map are
    kept for the example grids.
    """
    spec, defect_types = comparison.spec, defect_types_of(images)

    def new() -> dict[str, PixelMetrics]:
        return {name: PixelMetrics(0.0, comparison.high, BINS) for name in ["overall", *defect_types]}

    passed = PixelPass(new(), new() if comparison.at_original else None, PixelDecisions() if comparison.binary_masks else None, [], {})
    for image in images:
        anomaly_map = storage.read_npy(outputs.map(image.id), options).astype(np.float32)
        full_mask = read_mask(image.mask_path, image.height, image.width)
        mask = preprocess_mask(full_mask, spec)
        normal = image.label == "good"
        names = ["overall", *(defect_types if normal else [image.label])]
        for name in names:
            passed.working[name].update(anomaly_map[None], mask[None])
        highest = float(anomaly_map.max())
        if passed.original is not None:
            full_map = resize_map(anomaly_map, image.height, image.width)
            for name in names:
                passed.original[name].update(full_map[None], full_mask[None])
            highest = float(full_map.max())
        if normal:
            passed.normal_maxima.append(highest)
        if passed.decisions is not None:
            truth = full_mask if comparison.masks_at_original else mask
            passed.decisions.update(_written_mask(image, truth, options), truth, normal)
        if image.id in wanted:
            view = resize_for_model(decode_image(storage.read_bytes(image.uri, options), image.uri), spec)  # as the backbone saw it
            passed.examples[image.id] = ExampleData(image, view, mask, anomaly_map)
    return passed


def _written_mask(image: ScoredImage, truth: np.ndarray, options: storage.StorageOptions) -> np.ndarray:
    """The mask PNG the run wrote for image, as H x W bool; it must have the ground truth's size."""
    if image.mask_uri is None:
        raise ValueError(f"the scores table gives no mask_uri for {image.id}; the scoring run is incomplete, re-run evaluate")
    flagged = flagged_pixels(storage.read_bytes(image.mask_uri, options), image.mask_uri)
    if flagged.shape != truth.shape:
        raise ValueError(
            f"the mask {image.mask_uri} is {flagged.shape[0]} x {flagged.shape[1]}, its ground truth {truth.shape[0]} x "
            f"{truth.shape[1]}: the run wrote masks at another size than its preprocessing says; re-run evaluate"
        )
    return flagged


def _pixel_summary(metrics: PixelMetrics) -> dict[str, Any]:
    """Pixel ROCAUC, PRO (FPR <= 0.3) and AU-PRO (FPR <= 0.05), or None for all (with a warning) without defect pixels."""
    if metrics.defect_hist.sum() == 0:
        log.warning("evaluate: no defect pixels in these ground-truth masks at this resolution; pixel metrics are null")
        return {"pixel_rocauc": None, "pro": None, AU_PRO_KEY: None}
    return {"pixel_rocauc": metrics.pixel_rocauc(), "pro": metrics.pro(), AU_PRO_KEY: metrics.pro(AU_PRO_MAX_FPR)}


def _bounds(metrics: PixelMetrics) -> dict[str, float]:
    """Binning error bounds of _pixel_summary's metrics."""
    return {**metrics.error_bounds(), AU_PRO_KEY: metrics.pro_error_bound(AU_PRO_MAX_FPR)}


def _resolution_section(metrics: dict[str, PixelMetrics], defect_types: list[str]) -> dict[str, Any]:
    return {
        "overall": _pixel_summary(metrics["overall"]),
        "per_defect_type": {t: _pixel_summary(metrics[t]) for t in defect_types},
        "binning_error_bounds": _bounds(metrics["overall"]),
    }


def _resolutions(spec: Preprocessing, at_original: bool, masks_at_original: bool) -> dict[str, str]:
    """Words for where each kind of metric is measured: ranking (long and short) and decisions."""
    working = f"working size {spec.size} x {spec.size}"
    masks = "each image's original size (the masks as written)" if masks_at_original else (
        f"{working} (the masks as written: '{spec.mode}' preprocessing writes them at the working size)"
    )
    if at_original:
        ranking = f"each image's original size; the {working} numbers are under working_size"
        short = "each image's original size"
    elif spec.mode == "full":
        ranking = f"{working} only (original resolution not requested)"
        short = working
    else:
        ranking = (
            f"{working}: '{spec.mode}' preprocessing's maps cover a centre crop of the image, so pixel metrics at the "
            "original resolution are impossible; what the crop drops is never scored (paper_crop)"
        )
        short = working
    return {"ranking": ranking, "ranking_short": short, "masks": masks}


def _count(images: Sequence[ScoredImage], label: str) -> int:
    return sum(i.label == label for i in images)


def _type_rocauc(images: Sequence[ScoredImage], defect_type: str) -> float:
    subset = [i for i in images if i.label in ("good", defect_type)]
    return image_rocauc(np.array([i.score for i in subset]), np.array([i.label != "good" for i in subset]))


def _calibrated_rates(scores: np.ndarray, labels: np.ndarray, threshold: float | None) -> dict[str, float | None]:
    """FPR and TPR on this test set of the calibrated rule "anomalous when score > threshold"."""
    if threshold is None:
        return {"calibrated_image_fpr": None, "calibrated_image_tpr": None}
    flagged = scores > threshold
    return {"calibrated_image_fpr": float(flagged[~labels].mean()), "calibrated_image_tpr": float(flagged[labels].mean())}


def _applied_thresholds(thresholds: dict[str, float | None], settings: Settings) -> dict[str, Any]:
    """The thresholds the run applied (run.json) and where each came from: the model's calibration or an override."""
    sources = {
        key: "override" if getattr(settings, f"{key}_threshold") is not None else "calibrated" if thresholds[key] is not None else None
        for key in ("image", "pixel")
    }
    source = "override" if "override" in sources.values() else "calibrated"
    return {"image": thresholds["image"], "pixel": thresholds["pixel"], "source": source, "sources": sources}


def _decisions(
    images: Sequence[ScoredImage], thresholds: dict[str, Any], passed: PixelPass, f1_optimal: tuple[float, float],
    resolution: dict[str, str],
) -> dict[str, Any]:
    """How good the run's verdicts are, from what it wrote, beside the same measures at the F1-optimal thresholds.

    The run's: image verdicts from the scores table's is_anomalous, pixel ones from the written mask PNGs against
    the ground truth (pooled counts). The reference: "score >= threshold" at the thresholds that maximise F1 on
    this test set's labels (so optimistic), recomputed from the scores and the saved float16 maps.
    """
    scores, labels = scores_and_labels(images)
    notes = []
    image = None
    if thresholds["image"] is None:
        notes.append("no image threshold (the model has no calibrated thresholds and none was given): is_anomalous is "
                     "null, so image decisions are null; refit with calibration or pass --image-threshold")
    else:
        image = image_decisions(np.array([bool(i.is_anomalous) for i in images]), labels)
    pixel = None
    if passed.decisions is None:
        notes.append("no pixel threshold: the masks hold each map scaled to 0-255 (mask_kind), not decisions, so pixel "
                     "decisions are null; refit with calibration or pass --pixel-threshold")
    else:
        pixel = passed.decisions.to_dict()
    image_f1, pixel_f1 = f1_optimal
    true_pos, false_pos, false_neg, true_neg = passed.primary["overall"].counts_at(pixel_f1)
    reference = PixelDecisions(
        true_pos, false_pos, false_neg, true_neg,
        normal_images=len(passed.normal_maxima), normal_images_flagged=sum(m >= pixel_f1 for m in passed.normal_maxima),
    )
    return {
        "thresholds": thresholds,
        "rule": "anomalous when score > threshold, as written: the scores table's is_anomalous and the mask PNGs",
        "resolution": resolution["masks"],
        "image": image,
        "pixel": pixel,
        "notes": notes,
        "f1_optimal": {
            "thresholds": {"image": image_f1, "pixel": pixel_f1, "source": "f1_optimal (label-chosen on this test set)"},
            "rule": "anomalous when score >= threshold, recomputed from the image scores and the saved float16 maps",
            "resolution": resolution["ranking_short"],
            "image": image_decisions(scores >= image_f1, labels),
            "pixel": reference.to_dict(),
        },
    }


def defect_types_of(images: Sequence[ScoredImage]) -> list[str]:
    """The defect types among the images, sorted."""
    return sorted({i.label for i in images if i.label != "good"})


@dataclass(frozen=True)
class Evaluation:
    """What was evaluated, as metrics.json names it."""

    model_uri: str
    data: str
    every: int
    samples: int
    """Test images listed (scored or failed)."""
    card: ModelCard
    settings: Settings


def metrics_document(evaluation: Evaluation, scored: ScoredSamples, passed: PixelPass, comparison: MapComparison) -> dict[str, Any]:
    """metrics.json: what was evaluated, the counts, the ranking metrics (image and pixel), the thresholds, the decisions'
    quality, the binning's error bounds and both resolutions' pixel metrics, the scoring speed."""
    images, summary, card, spec = scored.images, scored.summary, evaluation.card, comparison.spec
    scores, labels = scores_and_labels(images)
    defect_types, primary = defect_types_of(images), passed.primary
    resolution = _resolutions(spec, comparison.at_original, comparison.masks_at_original)
    image_f1, image_f1_score = f1_optimal_image_threshold(scores, labels)
    pixel_f1, pixel_f1_score = f1_optimal_pixel_threshold(primary["overall"])
    calibrated = {"image": card.thresholds.image, "pixel": card.thresholds.pixel}
    applied = _applied_thresholds(summary.thresholds, evaluation.settings)
    return {
        "model": evaluation.model_uri,
        "model_version": summary.model_version,
        "data": evaluation.data,
        "preprocessing": f"{spec.mode} {spec.size}px",
        "preprocessing_spec": spec.to_dict(),
        "settings": dataclasses.asdict(card.settings),
        "every": evaluation.every,
        "evaluation_resolution": resolution["ranking"],
        "counts": _counts(evaluation.samples, images, scored.failures, defect_types),
        "failed_images": scored.failures[:100],
        "overall": {"image_rocauc": image_rocauc(scores, labels), **_pixel_summary(primary["overall"])},
        "per_defect_type": {
            t: {"defective": _count(images, t), "image_rocauc": _type_rocauc(images, t), **_pixel_summary(primary[t])}
            for t in defect_types
        },
        "thresholds": {
            "calibrated": calibrated,
            "f1_optimal": {
                "image": image_f1, "image_f1": image_f1_score, "pixel": pixel_f1, "pixel_f1": pixel_f1_score,
                "rule": "anomalous when score >= threshold", "pixel_resolution": resolution["ranking_short"],
            },
            **_calibrated_rates(scores, labels, calibrated["image"]),
        },
        "decisions": _decisions(images, applied, passed, (image_f1, pixel_f1), resolution),
        "binning_error_bounds": _bounds(primary["overall"]),
        "pixel_bins": {"bins": BINS, "range": [0.0, comparison.high], "max_fpr": primary["overall"].max_fpr,
                       "au_pro_max_fpr": AU_PRO_MAX_FPR},
        "working_size": _resolution_section(passed.working, defect_types),
        "original_resolution": None if passed.original is None else _resolution_section(passed.original, defect_types),
        "paper_crop": summary.paper_crop,
        "images_per_second": summary.images / max(summary.seconds, 1e-9),
        "scoring_seconds": summary.seconds,
    }


def scores_and_labels(images: Sequence[ScoredImage]) -> tuple[np.ndarray, np.ndarray]:
    """(n image scores, n bools: defective)."""
    return np.array([i.score for i in images]), np.array([i.label != "good" for i in images])


def _counts(samples: int, images: Sequence[ScoredImage], failures: Sequence[dict[str, str]], defect_types: list[str]) -> dict[str, Any]:
    defective = sum(i.label != "good" for i in images)
    return {
        "images": samples,
        "good": len(images) - defective,
        "defective": defective,
        "failed": len(failures),
        "per_type": {label: _count(images, label) for label in ["good", *defect_types]},
    }
