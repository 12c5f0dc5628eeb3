"""Evaluate a model on an MVTec-layout test split: score it on Ray (here), measure (evaluation_measure), then
metrics.json and a report (evaluation_page).

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

import json
import logging
import os
from collections.abc import Sequence
from itertools import groupby

import pyarrow as pa

from spade_batch.config import Settings
from spade_batch.engine.score import run_score
from spade_batch.formats import listing, storage
from spade_batch.formats.card import load_card
from spade_batch.formats.datasets import Sample, read_mvtec_category
from spade_batch.formats.layout import EvaluationOutputs
from spade_batch.formats.score_table import read_scores
from spade_batch.formats.versions import resolve
from spade_batch.reports.evaluation_measure import (
    Evaluation,
    MapComparison,
    ScoredImage,
    ScoredSamples,
    metrics_document,
    pixel_pass,
)
from spade_batch.reports.evaluation_page import write_report

log = logging.getLogger(__name__)

EXAMPLE_ROWS = 4
"""Rows of each example grid (half defective, half good)."""


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
    best, worst = _pick_examples(scored.images, EXAMPLE_ROWS)
    comparison = MapComparison.of_run(scored, spec, at_original)
    passed = pixel_pass(scored.images, written.run, comparison, {i.id for i in best + worst}, options)
    metrics = metrics_document(Evaluation(model_uri, data, every, len(samples), card, settings), scored, passed, comparison)
    storage.write_text(written.metrics_json, json.dumps(metrics, indent=2), options)
    write_report(written, metrics, scored.images, passed, best, worst, options)
    log.info("evaluate: %d images, image ROCAUC %.4f -> %s", len(scored.images), metrics["overall"]["image_rocauc"], out)
    return metrics


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


