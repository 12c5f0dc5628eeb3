"""Evaluate a model on an MVTec-layout test split: score it on Ray, then metrics.json and a report.

Everything is written under OUT (local or any fsspec URI; names in layout.EvaluationOutputs):

    test_images.txt         the evaluated test images (one absolute path a line)
    scores/                 the scoring run (scores table, masks, float16 maps at the working size)
    metrics.json            image ROCAUC, pixel ROCAUC, PRO (FPR <= 0.3), AU-PRO (FPR <= 0.05), overall and per
                            defect type; thresholds; the decisions' quality at the run's thresholds and F1-optimal ones
    roc.png, pro.png, score_histogram.png, examples_best.png, examples_worst.png, report.html

Ranking metrics (pixel ROCAUC, PRO) compare each anomaly map with its ground-truth mask at each
image's original size (the map resized back, as score does for masks) with `full` preprocessing,
and on the working grid (S x S) always: there the mask goes through the image's geometry
(`preprocess_mask`); `paper` maps cover a centre crop, so paper models are measured at the working
size only. Decisions are measured on what the run wrote: the scores table's `is_anomalous` and
the mask PNGs against the ground truth, pooled over all pixels (MVTec AD 2's SegF1). Maps and
masks are streamed one at a time into binned `PixelMetrics` and integer counts, so memory does
not grow with the test set.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from itertools import groupby
from typing import Any

import numpy as np
import pyarrow as pa

from spade_batch.config import Settings
from spade_batch.engine.score import ScoreSummary, run_score
from spade_batch.formats import listing, storage
from spade_batch.formats.card import load_card
from spade_batch.formats.datasets import Sample, read_mask, read_mvtec_category
from spade_batch.formats.heatmap import colour_range
from spade_batch.formats.images import (
    Preprocessing,
    decode_image,
    preprocess_mask,
    resize_for_model,
    resize_map,
)
from spade_batch.formats.layout import EvaluationOutputs, Outputs
from spade_batch.formats.score_table import read_scores
from spade_batch.formats.text import format_number
from spade_batch.formats.versions import resolve
from spade_batch.method.masks import flagged_pixels
from spade_batch.reports.figures import (
    Example,
    example_grid,
    html_page,
    pro_plot,
    roc_plot,
    score_histogram,
)
from spade_batch.reports.metrics import (
    PixelDecisions,
    PixelMetrics,
    f1_optimal_image_threshold,
    f1_optimal_pixel_threshold,
    image_decisions,
    image_rocauc,
    roc_curve_points,
)

log = logging.getLogger(__name__)

BINS = 4096
AU_PRO_MAX_FPR = 0.05
"""MVTec AD 2's headline AU-PRO limit, reported beside the MVTec AD PRO to FPR 0.3 (PixelMetrics' max_fpr)."""
AU_PRO_KEY = "au_pro_0.05"
EXAMPLE_ROWS = 4
FIGURES = {
    "ROC curves (image and pixel)": EvaluationOutputs.roc,
    "PRO curve": EvaluationOutputs.pro,
    "image scores, normal vs defective": EvaluationOutputs.histogram,
    "best examples: highest-scored defective, lowest-scored good": EvaluationOutputs.best,
    "worst examples: lowest-scored defective, highest-scored good": EvaluationOutputs.worst,
}


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
class ExampleData:
    """What an example row needs, kept for a few images only: S x S x 3 uint8 view, S x S truth and map."""

    image: ScoredImage
    view: np.ndarray
    ground_truth: np.ndarray
    anomaly_map: np.ndarray


def run_evaluate(
    model_uri: str,
    data: str,
    out: str,
    settings: Settings,
    explicit: frozenset[str] = frozenset(),
    original_resolution: bool | None = None,
    every: int = 1,
    model_version: int | None = None,
) -> dict:
    """Score the test split of the MVTec-layout category `data` (local folder) and write metrics + report under `out`.

    every: keep every N-th test image of each label (sorted order), for quick looks at long runs.
    model_version: the model version scored (default: the current one).
    original_resolution: pixel ranking metrics at each image's own size. None (default): yes with "full"
    preprocessing, the only one where it is possible; True: insist (refused for "paper"); False: the
    working size only (faster). Working-size numbers are always reported too, under "working_size".
    Returns the metrics dict written to metrics.json.
    """
    if not isinstance(every, int) or every < 1:
        raise ValueError(f"every must be a positive integer (1 = all test images), got {every!r}")
    options = settings.fsspec_options()
    card = load_card(resolve(model_uri, model_version, options).uri, options)  # the version run_score scores
    spec = card.preprocessing
    if original_resolution and spec.mode != "full":
        raise ValueError(
            f"model {model_uri} uses '{spec.mode}' preprocessing: its maps cover a centre crop, not the whole image, "
            "so they cannot be compared at the original resolution; drop --original-resolution"
        )
    at_original = spec.mode == "full" if original_resolution is None else original_resolution
    samples = subsample(read_mvtec_category(data).test, every)
    check_ground_truth(samples, data)

    written = EvaluationOutputs(out)
    scored = score_samples(model_uri, samples, written, settings, explicit, model_version)
    summary, table, images, failures = scored.summary, scored.table, scored.images, scored.failures

    scores = np.array([i.score for i in images])
    labels = np.array([i.label != "good" for i in images])
    defect_types = sorted({i.label for i in images if i.label != "good"})
    best, worst = _pick_examples(images, EXAMPLE_ROWS)
    wanted = {i.id for i in best + worst}
    high = float(table.column("max_pixel_score").drop_null().to_numpy().max(initial=0.0))
    masks_at_original = summary.settings["preprocess"] == "full"  # where score wrote the masks (cpu_stages)
    binary_masks = summary.thresholds["pixel"] is not None and summary.mask_kind.startswith("binary")
    passed = _pixel_pass(
        images, written.run, spec, high, defect_types, wanted, at_original, binary_masks, masks_at_original, options
    )
    working, original, primary = passed.working, passed.original, passed.primary

    resolution = _resolutions(spec, at_original, masks_at_original)
    image_f1, image_f1_score = f1_optimal_image_threshold(scores, labels)
    pixel_f1, pixel_f1_score = f1_optimal_pixel_threshold(primary["overall"])
    calibrated = {"image": card.thresholds.image, "pixel": card.thresholds.pixel}
    metrics = {
        "model": model_uri,
        "model_version": summary.model_version,
        "data": data,
        "preprocessing": f"{spec.mode} {spec.size}px",
        "preprocessing_spec": spec.to_dict(),
        "settings": dataclasses.asdict(card.settings),
        "every": every,
        "evaluation_resolution": resolution["ranking"],
        "counts": {
            "images": len(samples),
            "good": int((~labels).sum()),
            "defective": int(labels.sum()),
            "failed": len(failures),
            "per_type": {label: _count(images, label) for label in ["good", *defect_types]},
        },
        "failed_images": failures[:100],
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
        "decisions": _decisions(
            images, scores, labels, _applied_thresholds(summary.thresholds, settings), passed, (image_f1, pixel_f1), resolution
        ),
        "binning_error_bounds": _bounds(primary["overall"]),
        "pixel_bins": {"bins": BINS, "range": [0.0, high], "max_fpr": primary["overall"].max_fpr, "au_pro_max_fpr": AU_PRO_MAX_FPR},
        "working_size": _resolution_section(working, defect_types),
        "original_resolution": None if original is None else _resolution_section(original, defect_types),
        "paper_crop": summary.paper_crop,
        "images_per_second": summary.images / max(summary.seconds, 1e-9),
        "scoring_seconds": summary.seconds,
    }
    storage.write_text(written.metrics_json, json.dumps(metrics, indent=2), options)
    applied = metrics["decisions"]["thresholds"]
    mask_threshold = (applied["source"], applied["pixel"]) if applied["pixel"] is not None else ("F1-optimal", pixel_f1)
    _write_report(
        written, metrics, scores, labels, primary["overall"],
        [passed.examples[i.id] for i in best], [passed.examples[i.id] for i in worst], mask_threshold, options,
    )
    log.info("evaluate: %d images, image ROCAUC %.4f -> %s", len(images), metrics["overall"]["image_rocauc"], out)
    return metrics


@dataclass
class ScoredSamples:
    """A scoring run of a list of samples: its summary, scores table, the images it scored and those that failed."""

    summary: ScoreSummary
    table: pa.Table
    images: list[ScoredImage]
    failures: list[dict[str, str]]


def score_samples(
    model_uri: str, samples: Sequence[Sample], out: EvaluationOutputs, settings: Settings, explicit: frozenset[str],
    model_version: int | None,
) -> ScoredSamples:
    """Score the samples with the engine (run_score) into out.run, maps kept (float16 at the working size), replacing
    any earlier run there: their URIs go to out.test_images, and each row is joined with its sample by URI."""
    options = settings.fsspec_options()
    storage.write_text(out.test_images, "".join(sample_uri(s) + "\n" for s in samples), options)
    summary = run_score(model_uri, out.test_images, out.run.root, settings.replace(save_maps=True, overwrite=True), explicit,
                        model_version=model_version)
    table = read_scores(listing.list_files(out.run.scores, (".parquet",), options), options)
    return ScoredSamples(summary, table, *_test_images(table, samples))


def sample_uri(sample: Sample) -> str:
    """The URI a scoring run records for a sample: a local path made absolute, a URL as it is."""
    return sample.path if storage.split_uri(sample.path)[0] else os.path.abspath(sample.path)


def subsample(samples: Sequence[Sample], every: int) -> list[Sample]:
    """Every `every`-th sample of each label, in (label, path) order; the first of each label is always kept."""
    ordered = sorted(samples, key=lambda s: (s.label, s.path))
    return [s for _, group in groupby(ordered, key=lambda s: s.label) for s in list(group)[::every]]


def check_ground_truth(samples: Sequence[Sample], data: str) -> None:
    """Refuse defective samples without a ground-truth mask, naming the first and what to do."""
    missing = [s.path for s in samples if s.is_anomalous and s.mask_path is None]
    if missing:
        raise ValueError(
            f"{len(missing)} defective test image(s) under {data} have no ground_truth/<defect>/<stem>_mask.png, "
            f"e.g. {missing[0]}; add the masks or remove those images"
        )


def _test_images(table: pa.Table, samples: Sequence[Sample]) -> tuple[list[ScoredImage], list[dict[str, str]]]:
    """Join the scores table with the samples by URI; images that failed to decode are left out and listed."""
    by_uri = {sample_uri(s): s for s in samples}
    images, failures = [], []
    for row in table.select(["id", "uri", "image_score", "height", "width", "error", "is_anomalous", "mask_uri"]).to_pylist():
        sample = by_uri[row["uri"]]
        if row["error"] is not None:
            failures.append({"id": row["id"], "error": row["error"]})
            continue
        images.append(ScoredImage(
            row["id"], row["uri"], sample.label, float(row["image_score"]), row["height"], row["width"], sample.mask_path,
            row["is_anomalous"], row["mask_uri"],
        ))
    if not images:
        raise ValueError(f"no test image could be scored ({len(failures)} failed, e.g. {failures[:1]}); check the images")
    return images, failures


def _pick_examples(images: Sequence[ScoredImage], rows: int) -> tuple[list[ScoredImage], list[ScoredImage]]:
    """(best, worst): best = highest-scored defective then lowest-scored good; worst = the reverse. rows // 2 of each."""
    half = rows // 2
    defective = sorted((i for i in images if i.label != "good"), key=lambda i: i.score)
    good = sorted((i for i in images if i.label == "good"), key=lambda i: i.score)
    best = defective[::-1][:half] + good[:half]
    worst = defective[:half] + good[::-1][:half]
    return best, worst


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


def _pixel_pass(
    images: Sequence[ScoredImage],
    outputs: Outputs,
    spec: Preprocessing,
    high: float,
    defect_types: list[str],
    wanted: set[str],
    at_original: bool,
    binary_masks: bool,
    masks_at_original: bool,
    options: storage.StorageOptions,
) -> PixelPass:
    """Stream each map, its ground truth and its written mask once, one image at a time.

    A defect type's metrics see its own images plus all good images. binary_masks: the run wrote 0/255
    masks (a pixel threshold was known), compared with the ground truth at the size they were written:
    the original (masks_at_original) or the working size.
    """
    def new() -> dict[str, PixelMetrics]:
        return {name: PixelMetrics(0.0, high, BINS) for name in ["overall", *defect_types]}

    passed = PixelPass(new(), new() if at_original else None, PixelDecisions() if binary_masks else None, [], {})
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
            truth = full_mask if masks_at_original else mask
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
    images: Sequence[ScoredImage],
    scores: np.ndarray,
    labels: np.ndarray,
    thresholds: dict[str, Any],
    passed: PixelPass,
    f1_optimal: tuple[float, float],
    resolution: dict[str, str],
) -> dict[str, Any]:
    """How good the run's verdicts are, from what it wrote, beside the same measures at the F1-optimal thresholds.

    The run's: image verdicts from the scores table's is_anomalous, pixel ones from the written mask PNGs against
    the ground truth (pooled counts). The reference: "score >= threshold" at the thresholds that maximise F1 on
    this test set's labels (so optimistic), recomputed from the scores and the saved float16 maps.
    """
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


def _write_report(
    out: EvaluationOutputs,
    metrics: dict,
    scores: np.ndarray,
    labels: np.ndarray,
    pixels: PixelMetrics,
    best: list[ExampleData],
    worst: list[ExampleData],
    mask_threshold: tuple[str, float],
    options: storage.StorageOptions,
) -> None:
    """The figures of FIGURES and the report page, written under out."""
    overall = metrics["overall"]
    fpr, tpr, _ = roc_curve_points(scores, labels)
    curves = {"image": (fpr, tpr, overall["image_rocauc"]), "pixel": (*pixels.roc_curve(), overall["pixel_rocauc"])}
    applied, f1_optimal = metrics["decisions"]["thresholds"], metrics["thresholds"]["f1_optimal"]
    marks = {applied["source"]: applied["image"], "F1-optimal": f1_optimal["image"]}
    # Heat-map scale: from the typical normal pixel to as far again past the mask threshold (mid-scale).
    colours = colour_range(mask_threshold[1], float(pixels.edges[-1]), _normal_median(pixels))
    figures = {
        out.roc: roc_plot(curves),
        out.pro: pro_plot(*pixels.pro_curve(), overall["pro"], pixels.max_fpr),
        out.histogram: score_histogram(
            {"normal": scores[~labels], "defect": scores[labels]}, {name: value for name, value in marks.items() if value is not None}
        ),
        out.best: example_grid([_example(e, mask_threshold[1]) for e in best], *colours),
        out.worst: example_grid([_example(e, mask_threshold[1]) for e in worst], *colours),
    }
    for uri, png in figures.items():
        storage.write_bytes(uri, png, options)
    notes = _notes(metrics, mask_threshold, colours)
    source = metrics["decisions"]["thresholds"]["source"]
    tables = {f"Decisions at the {source} thresholds vs F1-optimal (label-chosen)": _decision_rows(metrics["decisions"])}
    page = html_page(f"SPADE evaluation: {metrics['data']}", _table_rows(metrics), FIGURES, notes, tables)
    storage.write_text(out.report, page, options)


def _normal_median(metrics: PixelMetrics) -> float:
    """Lower edge of the bin holding the median normal pixel score."""
    cumulative = np.cumsum(metrics.normal_hist)
    return float(metrics.edges[int(np.searchsorted(cumulative, cumulative[-1] / 2))])


def _example(data: ExampleData, threshold: float) -> Example:
    image = data.image
    return Example(
        image=data.view,
        anomaly_map=data.anomaly_map,
        predicted_mask=data.anomaly_map > threshold,
        ground_truth=data.ground_truth,
        title=f"{image.id}  score {image.score:.3g}",
    )


_COLUMNS = {"image_rocauc": "image ROCAUC", "pixel_rocauc": "pixel ROCAUC", "pro": "PRO (FPR <= 0.3)",
            AU_PRO_KEY: "AU-PRO (FPR <= 0.05)"}


def _table_rows(metrics: dict) -> list[dict[str, object]]:
    """One row for all test images, then one per defect type (that type plus the good images).

    With the headline at the original size, the working-size pixel metrics follow in columns of their own.
    """
    good, working = metrics["counts"]["good"], metrics["working_size"]
    extra = working if metrics["original_resolution"] is not None else None
    subsets = [("all", good + metrics["counts"]["defective"], metrics["overall"], extra and extra["overall"])]
    subsets += [
        (f"{name} + good", good + values["defective"], values, extra and extra["per_defect_type"][name])
        for name, values in metrics["per_defect_type"].items()
    ]
    rows = []
    for name, count, values, at_working in subsets:
        row: dict[str, object] = {"subset": name, "images": count}
        row.update({label: values[key] for key, label in _COLUMNS.items()})
        if at_working:
            row.update({f"{label} (working size)": at_working[key] for key, label in _COLUMNS.items() if key in at_working})
        rows.append({key: "n/a" if value is None else value for key, value in row.items()})
    return rows


def _decision_rows(decisions: dict) -> list[dict[str, object]]:
    """The decision measures, one a row: at the run's thresholds (as written) and at the F1-optimal ones."""
    columns = {f"at the {decisions['thresholds']['source']} thresholds (as written)": decisions,
               "F1-optimal (label-chosen on this test set)": decisions["f1_optimal"]}

    def share(values: dict | None, ratio: str, count: str, total: str) -> str:
        if values is None or values[ratio] is None:
            return "n/a"
        return f"{values[ratio]:.4f} ({values[count]} of {values[total]})"

    def value(values: dict | None, key: str) -> object:
        return "n/a" if values is None or values[key] is None else values[key]

    measures: dict[str, Any] = {
        "image threshold": lambda d: _number(d["thresholds"]["image"]),
        "pixel threshold": lambda d: _number(d["thresholds"]["pixel"]),
        "image FPR (normal images flagged)": lambda d: share(d["image"], "fpr", "flagged_normal", "normal"),
        "image TPR (defective images flagged)": lambda d: share(d["image"], "tpr", "flagged_defective", "defective"),
        "image precision": lambda d: value(d["image"], "precision"),
        "image F1": lambda d: value(d["image"], "f1"),
        "pixel SegF1 (pooled)": lambda d: value(d["pixel"], "seg_f1"),
        "pixel TPR": lambda d: value(d["pixel"], "tpr"),
        "pixel FPR": lambda d: value(d["pixel"], "fpr"),
        "normal images with any flagged pixel": lambda d: share(d["pixel"], "share_normal_images_flagged",
                                                                "normal_images_flagged", "normal_images"),
        "pixels compared at": lambda d: d["resolution"],
    }
    return [{"measure": name, **{column: measure(values) for column, values in columns.items()}}
            for name, measure in measures.items()]


def _notes(metrics: dict, mask_threshold: tuple[str, float], colours: tuple[float, float]) -> list[str]:
    settings, counts, thresholds = metrics["settings"], metrics["counts"], metrics["thresholds"]
    bounds, decisions = metrics["binning_error_bounds"], metrics["decisions"]
    notes = [
        f"Preprocessing: {metrics['preprocessing']} ('full' resizes the whole image, 'paper' resizes to 256/224 of the "
        "size and centre-crops); pixel ROCAUC and PRO at " + metrics["evaluation_resolution"] + ".",
        f"Model: backbone {settings['backbone']} ({settings['weights']} weights), K = {settings['k']}, "
        f"kappa = {settings['kappa']}, sigma = {settings['sigma']}.",
        f"Test images: {counts['images']} ({counts['good']} good, {counts['defective']} defective, "
        f"{counts['failed']} failed to decode and left out)"
        + (f"; every {metrics['every']}th image of each label." if metrics["every"] > 1 else "."),
        f"Predicted masks in the example grids use the {mask_threshold[0]} pixel threshold {mask_threshold[1]:.4g}; "
        f"their heat maps colour pixel scores from {colours[0]:.4g} (median normal pixel) to {colours[1]:.4g} "
        "(the threshold at mid-scale).",
        f"Decisions: the run's verdicts ({decisions['rule']}) at {decisions['resolution']}, pixel counts pooled over all "
        "test images (SegF1 = 2 TP / (2 TP + FP + FN), MVTec AD 2). The F1-optimal thresholds are chosen with this test "
        f"set's labels (image {_number(thresholds['f1_optimal']['image'])}, pixel {_number(thresholds['f1_optimal']['pixel'])}): "
        "the reference a calibration from normal images aims at, optimistic by construction and never applied.",
        *decisions["notes"],
        "PRO is the area under the per-region overlap curve to FPR 0.3 (MVTec AD), AU-PRO to FPR 0.05 (MVTec AD 2's "
        "headline), each divided by its limit.",
        f"Pixel metrics are binned ({BINS} bins); |binned - exact| <= {bounds['pixel_rocauc']:.2g} (pixel ROCAUC), "
        f"{bounds['pro']:.2g} (PRO), {bounds[AU_PRO_KEY]:.2g} (AU-PRO to 0.05).",
    ]
    if metrics["paper_crop"]:
        notes.append(metrics["paper_crop"]["message"] + ".")
    return notes


def _number(value: float | None) -> str:
    return format_number(value, ".4g", "none")
