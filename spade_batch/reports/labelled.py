"""Thresholds from labelled images: `spade-batch thresholds --model MODEL_URI --labelled DATA`.

DATA is an MVTec-layout folder (test/good, test/<defect>, ground_truth/<defect>/<stem>_mask.png; no train/ needed)
or a filled-in review sheet (formats.review: verdicts, no masks). The labelled images are scored with the engine as
evaluate scores a test split (evaluate.score_samples, maps kept), then:

- the image threshold is set at the target: best F1 (`best_f1`), or the highest threshold that flags a share R of
  the defective images (`recall=R`), over an exact sweep of the labelled scores (metrics.threshold_sweep);
- the pixel threshold at the best SegF1 of the masks the model would write: pooled over the labelled images'
  pixels at the size masks are written (each image's original size with full preprocessing), with the model's mask
  rules (masks.mask_scores: regions under min_region dropped, and with gate_masks only the images the new image
  threshold flags get a mask). A sheet has no masks: the pixel threshold stays the parent's, and the record says so.

The thresholds become a new version of the model (versions.publish_same_arrays: the parent's arrays, its card with
the new thresholds and a LabelRecord of how they were set), published under the model's lock; a dry run publishes
nothing. Decisions before and after are measured on the labelled images themselves (optimistic: the thresholds were
chosen on them), recomputed from the saved float16 maps, as evaluate's F1-optimal reference is.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import shutil
import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from spade_batch.config import Settings
from spade_batch.formats import storage
from spade_batch.formats.card import LabelRecord, ModelCard, Thresholds, load_card
from spade_batch.formats.datasets import Sample, read_mask, read_mvtec_category
from spade_batch.formats.images import preprocess_mask
from spade_batch.formats.layout import EvaluationOutputs
from spade_batch.formats.review import read_sheet
from spade_batch.formats.versions import ModelVersion, holding_model_lock, publish_same_arrays, resolve
from spade_batch.method.masks import mask_from_map, mask_scores
from spade_batch.reports.evaluate import check_ground_truth, score_samples
from spade_batch.reports.evaluation_measure import ScoredImage, ScoredSamples
from spade_batch.reports.metrics import PixelDecisions, ThresholdSweep, image_decisions, threshold_sweep

log = logging.getLogger(__name__)

SHEET_SUFFIX = ".csv"


@dataclass(frozen=True)
class Target:
    """Where the image threshold goes: best F1 (recall None), or the highest threshold with TPR >= recall."""

    recall: float | None = None

    @classmethod
    def parse(cls, text: str) -> Target:
        """"best_f1" or "recall=R" (0 < R <= 1); anything else is a ValueError saying what is taken."""
        name, _, value = text.strip().partition("=")
        if name == "best_f1" and not value:
            return cls()
        if name == "recall":
            with contextlib.suppress(ValueError):
                recall = float(value)
                if 0 < recall <= 1:
                    return cls(recall)
        raise ValueError(f"target {text!r} is not best_f1 or recall=R with 0 < R <= 1 (e.g. recall=0.95)")

    def __str__(self) -> str:
        return "best_f1" if self.recall is None else f"recall={self.recall:g}"

    def pick(self, sweep: ThresholdSweep) -> int:
        """The decision of the sweep this target takes."""
        return sweep.best_f1() if self.recall is None else sweep.at_recall(self.recall)


@dataclass
class LabelledImages:
    """The labelled images as the model scored them.

    scores: (N,) float64 image scores; labels: (N,) bool, True = defective.
    maps: N S x S float32 anomaly maps (working size); truths: N ground-truth masks (bool) at the size masks are
    written, or None for a sheet (no masks). sizes: N (height, width) masks are written at.
    """

    ids: list[str]
    scores: np.ndarray
    labels: np.ndarray
    maps: list[np.ndarray]
    sizes: list[tuple[int, int]]
    truths: list[np.ndarray] | None

    def subset(self, indices: Sequence[int]) -> LabelledImages:
        """The images at these indices."""
        return LabelledImages(
            [self.ids[i] for i in indices], self.scores[list(indices)], self.labels[list(indices)], [self.maps[i] for i in indices],
            [self.sizes[i] for i in indices], None if self.truths is None else [self.truths[i] for i in indices],
        )


def choose_thresholds(images: LabelledImages, rule: Thresholds, target: Target) -> Thresholds:
    """The rule with its image threshold at `target` and, when the images have masks, its pixel threshold at the best
    pooled SegF1 of the masks the rule writes under that image threshold (mask rules: rule.min_region, rule.gate_masks).
    Without masks the pixel threshold is rule's."""
    image_sweep = threshold_sweep(images.scores, images.labels)
    image = float(image_sweep.thresholds[target.pick(image_sweep)])
    rule = dataclasses.replace(rule, image=image)
    if images.truths is None:
        return rule
    pixel_sweep = threshold_sweep(*pooled_pixels(images, rule))
    return dataclasses.replace(rule, pixel=float(pixel_sweep.thresholds[pixel_sweep.best_f1()]))


def pooled_pixels(images: LabelledImages, rule: Thresholds) -> tuple[np.ndarray, np.ndarray]:
    """(P,) float32 mask scores (masks.mask_scores under rule: a mask pixel is flagged where its score > the pixel
    threshold) and (P,) bool truth, pooled over every pixel of every labelled image; needs truths."""
    if images.truths is None:
        raise ValueError("pixel decisions need ground-truth masks; these labelled images have none")
    scores = [
        mask_scores(anomaly_map, height, width, rule, score).ravel()
        for anomaly_map, (height, width), score in zip(images.maps, images.sizes, images.scores)
    ]
    return np.concatenate(scores), np.concatenate([truth.ravel() for truth in images.truths])


def decisions(images: LabelledImages, rule: Thresholds) -> dict[str, Any]:
    """The decisions rule makes on the labelled images: image FPR / TPR / F1 (metrics.image_decisions) and the masks'
    pooled SegF1 (metrics.PixelDecisions; None without masks or a pixel threshold), the masks as score writes them."""
    if rule.image is None:
        image = None
        verdicts: list[bool | None] = [None] * len(images.ids)
    else:
        verdicts = [bool(rule.is_anomalous(score)) for score in images.scores]
        image = image_decisions(np.array(verdicts, dtype=bool), images.labels)
    if images.truths is None or rule.pixel is None:
        return {"image": image, "pixel": None}
    pixels = PixelDecisions()
    for anomaly_map, (height, width), score, truth, defective in zip(images.maps, images.sizes, images.scores, images.truths, images.labels):
        pixels.update(mask_from_map(anomaly_map, height, width, rule, score) > 0, truth, normal_image=not defective)
    return {"image": image, "pixel": pixels.to_dict()}


@dataclass
class ThresholdsResult:
    """What `thresholds --labelled` did: the record of how the thresholds were set, and the version it published."""

    model_uri: str
    parent: int
    version: int | None
    """The version published; None for a dry run."""
    record: LabelRecord
    failures: list[dict[str, str]]
    """{"id", "error"} of labelled images that could not be scored (left out)."""


def run_thresholds(
    model_uri: str, data: str, settings: Settings, explicit: frozenset[str] = frozenset(), target: Target = Target(),
    out: str | None = None, dry_run: bool = False,
) -> ThresholdsResult:
    """Set the current version's thresholds from the labelled images at `data` and publish them as the next version.

    out: where the labelled images' scoring run is kept (default: a temporary local folder, removed afterwards; on a
    cluster of several nodes give a location every node reaches). dry_run: publish nothing. Publishing holds the
    model's lock from before the scoring to the new card, so no add can publish in between.
    """
    options = settings.fsspec_options()
    lock = contextlib.nullcontext() if dry_run else holding_model_lock(model_uri, f"spade-batch thresholds {model_uri}", options)
    with lock:
        parent = resolve(model_uri, None, options)
        card = load_card(parent.uri, options)
        kind, samples = labelled_samples(data, options)
        with _scoring_folder(out) as folder:
            images, failures = _score(model_uri, parent, card, samples, folder, settings, explicit)
        after = choose_thresholds(images, card.thresholds, target)
        record = LabelRecord(
            source=data, kind=kind, normal_images=int((~images.labels).sum()), defective_images=int(images.labels.sum()),
            target=str(target), image=True, pixel=images.truths is not None,
            before={"image": card.thresholds.image, "pixel": card.thresholds.pixel},
            after={"image": after.image, "pixel": after.pixel},
            decisions={"before": decisions(images, card.thresholds), "after": decisions(images, after)},
        )
        version = None
        if not dry_run:
            published = publish_same_arrays(model_uri, parent, dataclasses.replace(card, thresholds=after, labelled=record), options)
            version = published.number
            log.info("thresholds: published version %d of %s (thresholds set from %s)", version, model_uri, data)
    return ThresholdsResult(model_uri, parent.number, version, record, failures)


def labelled_samples(data: str, options: storage.StorageOptions = None) -> tuple[str, list[Sample]]:
    """("mvtec" or "sheet", the labelled images): an MVTec-layout folder's test images with their masks, or the rows of
    a review sheet (.csv) with a verdict (label "good" for normal, "defect"). Needs a normal and a defective image."""
    if data.lower().endswith(SHEET_SUFFIX):
        rows = {row.uri: row.verdict for row in read_sheet(data, options) if row.verdict}
        kind, samples = "sheet", [Sample(uri, "good" if verdict == "normal" else "defect", None) for uri, verdict in sorted(rows.items())]
    elif os.path.isdir(data):
        kind, samples = "mvtec", read_mvtec_category(data, train=False).test
        check_ground_truth(samples, data)
    else:
        raise ValueError(f"labelled data {data} is neither a folder (MVTec layout: test/good, test/<defect>, "
                         f"ground_truth/<defect>/<stem>_mask.png) nor a review sheet ({SHEET_SUFFIX}, `show OUT --format csv` filled in)")
    defective = sum(sample.is_anomalous for sample in samples)
    if not defective or defective == len(samples):
        raise ValueError(f"labelled data {data} holds {len(samples) - defective} normal and {defective} defective images; "
                         "setting thresholds from labels needs at least one of each")
    return kind, samples


@contextlib.contextmanager
def _scoring_folder(out: str | None) -> Iterator[str]:
    """out, or a temporary local folder removed afterwards."""
    if out is not None:
        yield out
        return
    folder = tempfile.mkdtemp(prefix="spade-labelled-")
    try:
        yield folder
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def _score(
    model_uri: str, parent: ModelVersion, card: ModelCard, samples: Sequence[Sample], out: str, settings: Settings,
    explicit: frozenset[str],
) -> tuple[LabelledImages, list[dict[str, str]]]:
    """Score the samples against version `parent` and read back their scores, maps and (when they have any) masks."""
    written = EvaluationOutputs(out)
    scored = score_samples(model_uri, samples, written, settings, explicit, parent.number)
    if scored.failures:
        log.warning("thresholds: %d labelled images could not be scored and are left out (e.g. %s: %s)", len(scored.failures),
                    scored.failures[0]["id"], scored.failures[0]["error"])
    images = labelled_images(scored, written, card, any(sample.mask_path for sample in samples), settings.fsspec_options())
    if images.labels.all() or not images.labels.any():
        raise ValueError(f"of the labelled images, {int((~images.labels).sum())} normal and {int(images.labels.sum())} defective "
                         "could be scored; setting thresholds needs at least one of each")
    return images, scored.failures


def labelled_images(
    scored: ScoredSamples, written: EvaluationOutputs, card: ModelCard, has_masks: bool, options: storage.StorageOptions = None,
) -> LabelledImages:
    """The scored images of a score_samples run into `written`: scores, saved maps and, with has_masks, ground truths at
    the size the run wrote masks (each image's own size with full preprocessing, else the working grid)."""
    full = scored.summary.settings["preprocess"] == "full"  # where score wrote masks (cpu_stages.write_score_outputs)
    maps = [storage.read_npy(written.run.map(image.id), options).astype(np.float32) for image in scored.images]
    sizes = [(image.height, image.width) if full else anomaly_map.shape for image, anomaly_map in zip(scored.images, maps)]
    return LabelledImages(
        ids=[image.id for image in scored.images],
        scores=np.array([image.score for image in scored.images], dtype=np.float64),
        labels=np.array([image.label != "good" for image in scored.images], dtype=bool),
        maps=maps,
        sizes=[(int(height), int(width)) for height, width in sizes],
        truths=[_truth(image, card, full) for image in scored.images] if has_masks else None,
    )


def _truth(image: ScoredImage, card: ModelCard, full: bool) -> np.ndarray:
    """The image's ground truth at the size its mask is written: its own size (full), else the working grid."""
    truth = read_mask(image.mask_path, image.height, image.width)
    return truth if full else preprocess_mask(truth, card.preprocessing)
