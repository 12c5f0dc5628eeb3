"""What an evaluation shows: the figures (ROC, PRO, score histogram, best and worst examples) and report.html, from
metrics.json's document and the pass over the maps that made it."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from spade_batch.formats import storage
from spade_batch.formats.heatmap import colour_range
from spade_batch.formats.layout import EvaluationOutputs
from spade_batch.formats.text import BLANK, format_number, format_share
from spade_batch.reports.evaluation_measure import AU_PRO_KEY, BINS, ExampleData, PixelPass, ScoredImage, scores_and_labels
from spade_batch.reports.figures import Example, example_grid, html_page, pro_plot, roc_plot, score_histogram
from spade_batch.reports.metrics import PixelMetrics, roc_curve_points

FIGURES = {
    "ROC curves (image and pixel)": EvaluationOutputs.roc,
    "PRO curve": EvaluationOutputs.pro,
    "image scores, normal vs defective": EvaluationOutputs.histogram,
    "best examples: highest-scored defective, lowest-scored good": EvaluationOutputs.best,
    "worst examples: lowest-scored defective, highest-scored good": EvaluationOutputs.worst,
}



def write_report(
    out: EvaluationOutputs, metrics: dict[str, Any], images: Sequence[ScoredImage], passed: PixelPass,
    best: Sequence[ScoredImage], worst: Sequence[ScoredImage], options: storage.StorageOptions,
) -> None:
    """The figures of FIGURES and the report page, written under out: metrics is metrics.json's document, passed the
    pass over the maps that made it (its curves and the examples' views), best and worst the example rows' images."""
    scores, labels = scores_and_labels(images)
    pixels = passed.primary["overall"]
    applied = metrics["decisions"]["thresholds"]
    mask_threshold = ((applied["source"], applied["pixel"]) if applied["pixel"] is not None
                      else ("F1-optimal", metrics["thresholds"]["f1_optimal"]["pixel"]))
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
        out.best: example_grid([_example(passed.examples[i.id], mask_threshold[1]) for i in best], *colours),
        out.worst: example_grid([_example(passed.examples[i.id], mask_threshold[1]) for i in worst], *colours),
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
        rows.append({key: BLANK if value is None else value for key, value in row.items()})
    return rows


def _decision_rows(decisions: dict) -> list[dict[str, object]]:
    """The decision measures, one a row: at the run's thresholds (as written) and at the F1-optimal ones."""
    columns = {f"at the {decisions['thresholds']['source']} thresholds (as written)": decisions,
               "F1-optimal (label-chosen on this test set)": decisions["f1_optimal"]}

    def value(values: dict | None, key: str) -> object:
        return BLANK if values is None or values[key] is None else values[key]

    measures: dict[str, Any] = {
        "image threshold": lambda d: format_number(d["thresholds"]["image"]),
        "pixel threshold": lambda d: format_number(d["thresholds"]["pixel"]),
        "image FPR (normal images flagged)": lambda d: format_share(d["image"], "fpr", "flagged_normal", "normal", ".4f"),
        "image TPR (defective images flagged)": lambda d: format_share(d["image"], "tpr", "flagged_defective", "defective", ".4f"),
        "image precision": lambda d: value(d["image"], "precision"),
        "image F1": lambda d: value(d["image"], "f1"),
        "pixel SegF1 (pooled)": lambda d: value(d["pixel"], "seg_f1"),
        "pixel TPR": lambda d: value(d["pixel"], "tpr"),
        "pixel FPR": lambda d: value(d["pixel"], "fpr"),
        "normal images with any flagged pixel": lambda d: format_share(d["pixel"], "share_normal_images_flagged",
                                                                "normal_images_flagged", "normal_images", ".4f"),
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
        f"set's labels (image {format_number(thresholds['f1_optimal']['image'])}, pixel {format_number(thresholds['f1_optimal']['pixel'])}): "
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


