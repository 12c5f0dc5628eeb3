"""Evaluate a model on an MVTec-layout test split: score it on Ray, then metrics.json and a report.

Everything is written under OUT (local or any fsspec URI; names in layout.EvaluationOutputs):

    test_images.txt         the evaluated test images (one absolute path a line)
    scores/                 the scoring run (scores table, masks, float16 maps at the working size)
    metrics.json            image ROCAUC, pixel ROCAUC, PRO, overall and per defect type; thresholds
    roc.png, pro.png, score_histogram.png, examples_best.png, examples_worst.png, report.html

Pixel metrics compare each anomaly map with its ground-truth mask on the working grid (S x S):
the mask goes through the same geometry as the image (`preprocess_mask`). Maps are streamed one
at a time into binned `PixelMetrics`, so memory does not grow with the test set.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from itertools import groupby
from typing import Any

import numpy as np
import pyarrow as pa

from spade_batch.config import Settings
from spade_batch.engine.score import run_score
from spade_batch.formats import storage
from spade_batch.formats.card import Thresholds, load_card
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
from spade_batch.formats.scores import read_scores
from spade_batch.reports.figures import (
    Example,
    example_grid,
    html_page,
    pro_plot,
    roc_plot,
    score_histogram,
)
from spade_batch.reports.metrics import (
    PixelMetrics,
    f1_optimal_image_threshold,
    f1_optimal_pixel_threshold,
    image_rocauc,
    roc_curve_points,
)

log = logging.getLogger(__name__)

BINS = 4096
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
    original_resolution: bool = False,
    every: int = 1,
) -> dict:
    """Score the test split of the MVTec-layout category `data` (local folder) and write metrics + report under `out`.

    every: keep every N-th test image of each label (sorted order), for quick looks at long runs.
    original_resolution: also compute pixel metrics at each image's own size ("full" preprocessing only).
    Returns the metrics dict written to metrics.json.
    """
    if not isinstance(every, int) or every < 1:
        raise ValueError(f"every must be a positive integer (1 = all test images), got {every!r}")
    options = settings.fsspec_options()
    card = load_card(model_uri, options)
    thresholds = Thresholds.of(card, settings)
    spec = card.preprocessing
    if original_resolution and spec.mode != "full":
        raise ValueError(
            f"model {model_uri} uses '{spec.mode}' preprocessing: its maps cover a centre crop, not the whole image, "
            "so they cannot be compared at the original resolution; drop --original-resolution"
        )
    samples = subsample(read_mvtec_category(data).test, every)
    _check_ground_truth(samples, data)

    written = EvaluationOutputs(out)
    storage.write_text(written.test_images, "".join(os.path.abspath(s.path) + "\n" for s in samples), options)
    summary = run_score(model_uri, written.test_images, written.run.root, settings.replace(save_maps=True, overwrite=True), explicit)
    table = read_scores(storage.list_files(written.run.scores, (".parquet",), options), options)
    images, failures = _test_images(table, samples)

    scores = np.array([i.score for i in images])
    labels = np.array([i.label != "good" for i in images])
    defect_types = sorted({i.label for i in images if i.label != "good"})
    best, worst = _pick_examples(images, EXAMPLE_ROWS)
    wanted = {i.id for i in best + worst}
    high = float(table.column("max_pixel_score").drop_null().to_numpy().max(initial=0.0))
    working, original, examples = _pixel_pass(
        images, written.run, spec, high, defect_types, wanted, original_resolution, options
    )

    image_f1, image_f1_score = f1_optimal_image_threshold(scores, labels)
    pixel_f1, pixel_f1_score = f1_optimal_pixel_threshold(working["overall"])
    metrics = {
        "model": model_uri,
        "data": data,
        "preprocessing": f"{spec.mode} {spec.size}px",
        "preprocessing_spec": spec.to_dict(),
        "settings": asdict(card.settings),
        "every": every,
        "evaluation_resolution": f"working size {spec.size} x {spec.size}"
        + (", and each image's original size" if original_resolution else ""),
        "counts": {
            "images": len(samples),
            "good": int((~labels).sum()),
            "defective": int(labels.sum()),
            "failed": len(failures),
            "per_type": {label: _count(images, label) for label in ["good", *defect_types]},
        },
        "failed_images": failures[:100],
        "overall": {"image_rocauc": image_rocauc(scores, labels), **_pixel_summary(working["overall"])},
        "per_defect_type": {
            t: {"defective": _count(images, t), "image_rocauc": _type_rocauc(images, t), **_pixel_summary(working[t])}
            for t in defect_types
        },
        "thresholds": {
            "calibrated": asdict(thresholds),
            "f1_optimal": {
                "image": image_f1, "image_f1": image_f1_score, "pixel": pixel_f1, "pixel_f1": pixel_f1_score,
                "rule": "anomalous when score >= threshold",
            },
            **_calibrated_rates(scores, labels, thresholds.image),
        },
        "binning_error_bounds": working["overall"].error_bounds(),
        "pixel_bins": {"bins": BINS, "range": [0.0, high], "max_fpr": working["overall"].max_fpr},
        "original_resolution": None if original is None else {
            "overall": _pixel_summary(original["overall"]),
            "per_defect_type": {t: _pixel_summary(original[t]) for t in defect_types},
            "binning_error_bounds": original["overall"].error_bounds(),
        },
        "images_per_second": summary.images / max(summary.seconds, 1e-9),
        "scoring_seconds": summary.seconds,
    }
    storage.write_text(written.metrics_json, json.dumps(metrics, indent=2), options)
    mask_threshold = ("calibrated", thresholds.pixel) if thresholds.pixel is not None else ("F1-optimal", pixel_f1)
    _write_report(
        written, metrics, scores, labels, working["overall"],
        [examples[i.id] for i in best], [examples[i.id] for i in worst], mask_threshold, options,
    )
    log.info("evaluate: %d images, image ROCAUC %.4f -> %s", len(images), metrics["overall"]["image_rocauc"], out)
    return metrics


def subsample(samples: Sequence[Sample], every: int) -> list[Sample]:
    """Every `every`-th sample of each label, in (label, path) order; the first of each label is always kept."""
    ordered = sorted(samples, key=lambda s: (s.label, s.path))
    return [s for _, group in groupby(ordered, key=lambda s: s.label) for s in list(group)[::every]]


def _check_ground_truth(samples: Sequence[Sample], data: str) -> None:
    missing = [s.path for s in samples if s.is_anomalous and s.mask_path is None]
    if missing:
        raise ValueError(
            f"{len(missing)} defective test image(s) under {data} have no ground_truth/<defect>/<stem>_mask.png, "
            f"e.g. {missing[0]}; add the masks or remove those images"
        )


def _test_images(table: pa.Table, samples: Sequence[Sample]) -> tuple[list[ScoredImage], list[dict[str, str]]]:
    """Join the scores table with the samples by URI; images that failed to decode are left out and listed."""
    by_uri = {os.path.abspath(s.path): s for s in samples}
    images, failures = [], []
    for row in table.select(["id", "uri", "image_score", "height", "width", "error"]).to_pylist():
        sample = by_uri[row["uri"]]
        if row["error"] is not None:
            failures.append({"id": row["id"], "error": row["error"]})
            continue
        images.append(ScoredImage(
            row["id"], row["uri"], sample.label, float(row["image_score"]), row["height"], row["width"], sample.mask_path
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


def _pixel_pass(
    images: Sequence[ScoredImage],
    outputs: Outputs,
    spec: Preprocessing,
    high: float,
    defect_types: list[str],
    wanted: set[str],
    original_resolution: bool,
    options: storage.StorageOptions,
) -> tuple[dict[str, PixelMetrics], dict[str, PixelMetrics] | None, dict[str, ExampleData]]:
    """Stream each map (and its mask) once into PixelMetrics "overall" and per defect type.

    A defect type's metrics see its own images plus all good images. Returns the working-size
    metrics, the original-size ones (or None) and the example data of the `wanted` ids.
    """
    def new() -> dict[str, PixelMetrics]:
        return {name: PixelMetrics(0.0, high, BINS) for name in ["overall", *defect_types]}

    working, original = new(), new() if original_resolution else None
    examples: dict[str, ExampleData] = {}
    for image in images:
        anomaly_map = storage.read_npy(outputs.map(image.id), options).astype(np.float32)
        full_mask = read_mask(image.mask_path, image.height, image.width)
        mask = preprocess_mask(full_mask, spec)
        names = ["overall", *(defect_types if image.label == "good" else [image.label])]
        for name in names:
            working[name].update(anomaly_map[None], mask[None])
        if original is not None:
            full_map = resize_map(anomaly_map, image.height, image.width)
            for name in names:
                original[name].update(full_map[None], full_mask[None])
        if image.id in wanted:
            view = resize_for_model(decode_image(storage.read_bytes(image.uri, options), image.uri), spec)  # as the backbone saw it
            examples[image.id] = ExampleData(image, view, mask, anomaly_map)
    return working, original, examples


def _pixel_summary(metrics: PixelMetrics) -> dict[str, Any]:
    """Pixel ROCAUC and PRO, or None for both (with a warning) when the masks hold no defect pixel at this grid."""
    if metrics.defect_hist.sum() == 0:
        log.warning("evaluate: no defect pixels in these ground-truth masks at this resolution; pixel metrics are null")
        return {"pixel_rocauc": None, "pro": None}
    return {"pixel_rocauc": metrics.pixel_rocauc(), "pro": metrics.pro()}


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
    calibrated, f1_optimal = metrics["thresholds"]["calibrated"], metrics["thresholds"]["f1_optimal"]
    marks = {"calibrated": calibrated["image"], "F1-optimal": f1_optimal["image"]}
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
    page = html_page(f"SPADE evaluation: {metrics['data']}", _table_rows(metrics), FIGURES, notes)
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


_COLUMNS = {"image_rocauc": "image ROCAUC", "pixel_rocauc": "pixel ROCAUC", "pro": "PRO"}


def _table_rows(metrics: dict) -> list[dict[str, object]]:
    """One row for all test images, then one per defect type (that type plus the good images)."""
    good, original = metrics["counts"]["good"], metrics["original_resolution"]
    subsets = [("all", good + metrics["counts"]["defective"], metrics["overall"], original and original["overall"])]
    subsets += [
        (f"{name} + good", good + values["defective"], values, original and original["per_defect_type"][name])
        for name, values in metrics["per_defect_type"].items()
    ]
    rows = []
    for name, count, values, at_original in subsets:
        row: dict[str, object] = {"subset": name, "images": count}
        row.update({label: values[key] for key, label in _COLUMNS.items()})
        if at_original:
            row.update({f"{label} (original size)": at_original[key] for key, label in _COLUMNS.items() if key in at_original})
        rows.append({key: "n/a" if value is None else value for key, value in row.items()})
    return rows


def _notes(metrics: dict, mask_threshold: tuple[str, float], colours: tuple[float, float]) -> list[str]:
    settings, counts, thresholds = metrics["settings"], metrics["counts"], metrics["thresholds"]
    bounds = metrics["binning_error_bounds"]
    return [
        f"Preprocessing: {metrics['preprocessing']} ('full' resizes the whole image, 'paper' resizes to 256/224 of the "
        "size and centre-crops); pixel metrics at " + metrics["evaluation_resolution"] + ".",
        f"Model: backbone {settings['backbone']} ({settings['weights']} weights), K = {settings['k']}, "
        f"kappa = {settings['kappa']}, sigma = {settings['sigma']}.",
        f"Test images: {counts['images']} ({counts['good']} good, {counts['defective']} defective, "
        f"{counts['failed']} failed to decode and left out)"
        + (f"; every {metrics['every']}th image of each label." if metrics["every"] > 1 else "."),
        f"Predicted masks in the example grids use the {mask_threshold[0]} pixel threshold {mask_threshold[1]:.4g}; "
        f"their heat maps colour pixel scores from {colours[0]:.4g} (median normal pixel) to {colours[1]:.4g} "
        "(the threshold at mid-scale).",
        f"Calibrated image threshold {_number(thresholds['calibrated']['image'])}: FPR "
        f"{_number(thresholds['calibrated_image_fpr'])}, TPR {_number(thresholds['calibrated_image_tpr'])} on this test set. "
        f"F1-optimal image threshold {_number(thresholds['f1_optimal']['image'])} (reported, not used).",
        f"Pixel metrics are binned ({BINS} bins); |binned - exact| <= {bounds['pixel_rocauc']:.2g} (pixel ROCAUC), "
        f"{bounds['pro']:.2g} (PRO).",
    ]


def _number(value: float | None) -> str:
    return "none" if value is None else f"{value:.4g}"
