"""What a model or a scoring run's outputs hold, as one JSON-ready dict: what `spade-batch show` prints.

A model is a MODEL_URI with spade.json (the card); a run is an OUT_URI with run.json. A run's failures
by reason and its top images are read from every scores part file, not from run.json's capped lists.
"""

from __future__ import annotations

import heapq
import json
import math
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from scipy import stats

from spade_batch.config import group_values
from spade_batch.formats import storage
from spade_batch.formats.card import ModelCard, load_card
from spade_batch.formats.layout import ModelLayout, Outputs, read_columns
from spade_batch.formats.review import Verdict
from spade_batch.formats.versions import resolve, version_numbers
from spade_batch.method.alignment import suggestion

TOP_COLUMNS = ["id", "uri", "image_score", "is_anomalous", "max_pixel_score", "anomalous_fraction", "mask_uri"]


def summarise(uri: str, options: storage.StorageOptions = None, top: int = 10) -> dict[str, Any]:
    """The summary of the model or the run at uri; top: how many of a run's highest-scoring images to list.

    Raises FileNotFoundError when uri holds neither spade.json nor run.json.
    """
    if top < 0:
        raise ValueError(f"top must be >= 0 (how many images to list), got {top}")
    if storage.exists(ModelLayout(uri).card, options):
        return model_summary(uri, options)
    if storage.exists(Outputs(uri).run_json, options):
        return run_summary(uri, options, top)
    raise FileNotFoundError(
        f"{uri} holds neither a model ({ModelLayout.card}) nor a finished run ({Outputs.run_json}): give a MODEL_URI written by fit "
        f"or an OUT_URI written by score (evaluate's run is OUT/{Outputs.scores})"
    )


def model_summary(uri: str, options: storage.StorageOptions = None) -> dict[str, Any]:
    """The current version's backbone, weights identity, method settings, thresholds, training counts and failures by
    reason; and every version, oldest first (versions_summary)."""
    current = resolve(uri, None, options)
    card = load_card(current.uri, options)
    stored = card.to_dict()
    return {
        "kind": "model",
        "uri": uri,
        "version": current.number,
        "versions": versions_summary(uri, current.number, options),
        "backbone": card.settings.backbone,
        "weights": card.settings.weights,
        "weights_sha256": card.weights_sha256,
        **{key: stored[key] for key in ("settings", "preprocessing", "thresholds", "calibration")},
        "training": {
            "gallery_images": card.train_count,
            "calibration_images": card.calibration.count,
            "failed_images": len(card.failed_train_images),
            "manifest_sha256": card.train_manifest_sha256,
        },
        "failures": failures_by_reason((f["id"], f["error"]) for f in card.failed_train_images),
        "decisions": decision_rules(card),
        "alignment": suggestion(card.alignment, card.layer_shapes, card.preprocessing.size),
        "created": card.created,
        "package_version": card.package_version,
    }


def versions_summary(uri: str, current: int, options: storage.StorageOptions = None) -> list[dict[str, Any]]:
    """Each published version of the model at uri: number, parent, images added (count and manifest hash), gallery
    and calibration images, thresholds, when it was made, and whether it is the current one."""
    rows = []
    for number in version_numbers(uri, options):
        card = load_card(ModelLayout(uri).version(number).root, options)
        rows.append({
            "number": number, "current": number == current, "parent": card.version.parent, "created": card.created,
            "images_added": card.version.images_added, "added_sha256": card.version.added_sha256,
            "gallery_images": card.train_count, "calibration_images": card.calibration.count,
            "thresholds": {"image": card.thresholds.image, "pixel": card.thresholds.pixel},
        })
    return rows


def run_summary(uri: str, options: storage.StorageOptions = None, top: int = 10) -> dict[str, Any]:
    """Counts, anomaly rate, failures by reason, thresholds, timings and the `top` highest-scoring images."""
    outputs = Outputs(uri)
    run = json.loads(storage.read_text(outputs.run_json, options))
    failed: list[tuple[str, str]] = []
    best: list[dict[str, Any]] = []
    for _, columns in read_columns(outputs.parts(options).own, [*TOP_COLUMNS, "error"], options):
        rows = [dict(zip(columns, values)) for values in zip(*columns.values())]
        failed += [(row["id"], row["error"]) for row in rows if row["error"] is not None]
        scored = (row for row in rows if row["error"] is None)
        best = heapq.nlargest(top, [*best, *({key: row[key] for key in TOP_COLUMNS} for row in scored)], key=lambda r: r["image_score"])
    scored_count = run["scored"]
    return {
        "kind": "run",
        "uri": uri,
        "model_uri": run["model_uri"],
        "model_version": run.get("model_version", 1),  # runs from before versions scored the only one
        "counts": {**{key: run[key] for key in ("images", "scored", "failed", "retryable", "resumed", "anomalous")},
                   **{key: run.get(key, 0) for key in ("changed", "restored")}},  # runs from before they were counted have none
        "anomaly_rate": None if run["anomalous"] is None or not scored_count else run["anomalous"] / scored_count,
        "thresholds": run["thresholds"],
        "mask_kind": run["mask_kind"],
        "paper_crop": run.get("paper_crop"),  # runs from before it was recorded have none
        "timings": {"seconds": run["seconds"], "images_per_second": run["images_per_second"]},
        "failures": failures_by_reason(failed),
        "top": best,
        "settings": group_values(run["settings"]),
        "versions": run["versions"],
    }


def review_rows(summary: dict[str, Any]) -> list[dict[str, Any]]:
    """The flagged images among a run summary's top ones (all of them when no threshold is known): a review sheet's rows.

    Flagged means scoring above the image threshold, so the top N by score hold the N highest flagged ones first.
    """
    return [row for row in summary["top"] if row["is_anomalous"] is not False]


def verdicts_summary(uri: str, sheet: Sequence[Verdict], options: storage.StorageOptions = None) -> dict[str, Any]:
    """The run at uri as reviewers judged it: flagged images, how many were reviewed, confirmed defects (verdict defect),
    false alarms (verdict normal) and the precision among the reviewed (None when none was).

    A row whose id the run did not score is a ValueError naming its line (the sheet of another run); reviewed rows of
    images the run did not flag are counted apart.
    """
    outputs = Outputs(uri)
    run = json.loads(storage.read_text(outputs.run_json, options))
    flagged = {i: bool(flag) for _, columns in read_columns(outputs.parts(options).own, ["id", "is_anomalous"], options)
               for i, flag in zip(columns["id"], columns["is_anomalous"])}
    stranger = next((row for row in sheet if row.id not in flagged), None)
    if stranger:
        raise ValueError(f"review sheet line {stranger.line}: {stranger.id} is not an image of the run at {uri}; "
                         "give the sheet written for this run")
    judged = {row.id: row for row in sheet if row.verdict}  # one per image: read_sheet refuses rows of one image that disagree
    reviewed = [row for row in judged.values() if flagged[row.id]]
    defects = sum(row.verdict == "defect" for row in reviewed)
    return {
        "kind": "verdicts",
        "uri": uri,
        "flagged": run["anomalous"],
        "reviewed": len(reviewed),
        "confirmed_defects": defects,
        "false_alarms": len(reviewed) - defects,
        "precision": defects / len(reviewed) if reviewed else None,
        "reviewed_not_flagged": sum(not flagged[image_id] for image_id in judged),
    }


@dataclass
class FailureGroup:
    """The failures that share a reason: how many, and the ids of the first few (in reading order)."""

    reason: str
    count: int
    examples: list[str]


def group_failures(failures: Iterable[tuple[str, str]], examples: int = 1) -> list[FailureGroup]:
    """(id, error) pairs -> one group per failure_reason, most frequent first, ties by reason; keeps `examples` ids each.

    The one grouping of failures: `spade-batch show` and the run report both use it.
    """
    groups: dict[str, FailureGroup] = {}
    for image_id, error in failures:
        reason = failure_reason(image_id, error)
        group = groups.setdefault(reason, FailureGroup(reason, 0, []))
        group.count += 1
        if len(group.examples) < examples:
            group.examples.append(image_id)
    return sorted(groups.values(), key=lambda group: (-group.count, group.reason))


def failures_by_reason(failures: Iterable[tuple[str, str]]) -> list[dict[str, Any]]:
    """(id, error) pairs -> [{reason, count, example}] (group_failures), as `show` prints them."""
    return [{"reason": group.reason, "count": group.count, "example": group.examples[0]} for group in group_failures(failures)]


def failure_reason(image_id: str, error: str) -> str:
    """The error's first sentence of its first line, with the image's URI (any token ending in its id) and numbers taken out.

    So that "cannot decode s3://b/a.png: the file is empty (0 bytes)" groups with every other empty file,
    and a multi-line error (a traceback) by its first line.
    """
    text = (error.strip().splitlines() or ["unknown error"])[0]
    text = re.sub(r"\S*" + re.escape(image_id), "<image>", text)
    text = re.split(r"\.\s", text, maxsplit=1)[0].rstrip(".")
    return re.sub(r"\d+", "N", text)


def decision_rules(card: ModelCard) -> dict[str, str]:
    """What a model's thresholds decide and promise on normal images, in words: how they were set, the
    expected false alarms per 1,000 normal images (with the range the calibration's size leaves), and what
    masks show. Empty values for a model without thresholds."""
    calibration, thresholds = card.calibration, card.thresholds
    if thresholds.image is None or not calibration.count or calibration.image_fpr is None:
        return {"calibration": "none: the model has no calibrated thresholds (masks are maps scaled per image)"}
    count, target = calibration.count, calibration.image_fpr
    low, high = false_alarm_range(count, target)
    pixel = {"quantile": f"the {calibration.pixel_quantile} quantile of their pooled pixel scores",
             "mean_3sigma": "their pixel scores' mean + 3 standard deviations",
             "region": f"the level at which about {target:.1%} of them show a flagged region of {max(1, thresholds.min_region)} pixels"}
    masks = "empty for images not flagged anomalous" if thresholds.gate_masks else "flagged pixels of every image"
    regions = f", regions under {thresholds.min_region} pixels (at the working size) dropped" if thresholds.min_region > 1 else ""
    return {
        "calibration": f"{count} normal images ({calibration.images.replace('_', '-')})",
        "image rule": f"anomalous when the image score > {thresholds.image:.4g}, the {1 - target:.1%} quantile of their scores",
        "expected false alarms": f"about {1000 * target:.3g} per 1,000 normal images (90% range {1000 * low:.3g} - {1000 * high:.3g}, "
                                 f"from {count} calibration images)",
        "pixel rule": f"pixel score > {thresholds.pixel:.4g}: {pixel[calibration.pixel_rule]}",
        "masks": masks + regions,
    }


def false_alarm_range(count: int, target: float, level: float = 0.9) -> tuple[float, float]:
    """The `level` range of the false-positive rate a threshold set at the (1 - target) order statistic of `count`
    normal scores has on new normal images: that rate is Beta(count + 1 - rank, rank) distributed."""
    rank = min(count, math.ceil((1 - target) * (count - 1)) + 1)  # numpy's quantile method "higher", 1-based
    distribution = stats.beta(count + 1 - rank, rank)
    return float(distribution.ppf((1 - level) / 2)), float(distribution.ppf((1 + level) / 2))
