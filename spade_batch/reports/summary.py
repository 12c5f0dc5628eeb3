"""What a model or a scoring run's outputs hold, as one JSON-ready dict: what `spade-batch show` prints.

A model is a MODEL_URI with spade.json (the card); a run is an OUT_URI with run.json. A run's failures
by reason and its top images are read from every scores part file, not from run.json's capped lists.
"""

from __future__ import annotations

import dataclasses
import heapq
import json
import math
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from spade_batch.config import group_values
from spade_batch.formats import storage
from spade_batch.formats.card import CalibrationRecord, ModelCard, Thresholds, load_card
from spade_batch.formats.layout import ModelLayout, Outputs, read_columns
from spade_batch.formats.review import Verdict
from spade_batch.formats.text import format_number
from spade_batch.formats.versions import resolve, version_numbers
from spade_batch.method.alignment import suggestion
from spade_batch.method.image_threshold import PotTail, order_statistic_rank, recorded_law

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
    versions = versions_summary(uri, current.number, options)
    return {
        "kind": "model",
        "uri": uri,
        "version": current.number,
        "versions": versions,
        "backbone": card.settings.backbone,
        "weights": card.settings.weights,
        "weights_sha256": card.weights_sha256,
        **{key: stored[key] for key in ("settings", "preprocessing", "thresholds", "calibration")},
        "thresholds_set_by": thresholds_set_by(card),
        "labelled": stored.get("labelled"),
        "training": {
            "gallery_images": card.train_count,
            "calibration_images": card.calibration.count,
            "failed_images": len(card.failed_train_images),
            "manifest_sha256": card.train_manifest_sha256,
        },
        "failures": failures_by_reason((f["id"], f["error"]) for f in card.failed_train_images),
        "unused": unused_summary(card, versions),
        "decisions": decision_rules(card),
        "alignment": suggestion(card.alignment, card.layer_shapes, card.preprocessing.size),
        "created": card.created,
        "package_version": card.package_version,
    }


def unused_summary(card: ModelCard, versions: list[dict[str, Any]]) -> dict[str, Any]:
    """The training images the model's version does not use, each with why (images: {"id", "reason"}, by id); its
    near-duplicate count; and what each version left out of the images new to it or used by its parent (by_version).
    recorded: False for a card from before they were recorded."""
    training = card.training
    return {
        "recorded": training is not None,
        "images": [{"id": i, "reason": why} for i, why in sorted(training.unused().items())] if training else [],
        "near_duplicates": dataclasses.asdict(training.near_duplicates) if training else {},
        "by_version": [{"number": row["number"], "left_out": row["left_out"]} for row in versions if row["left_out"]],
    }


def versions_summary(uri: str, current: int, options: storage.StorageOptions = None) -> list[dict[str, Any]]:
    """Each published version of the model at uri: number, parent, images added (count and manifest hash), gallery
    and calibration images, thresholds, when it was made, and whether it is the current one."""
    rows = []
    for number in version_numbers(uri, options):
        card = load_card(ModelLayout(uri).version(number).root, options)
        rows.append({
            "number": number, "current": number == current, "parent": card.version.parent, "created": card.created,
            "images_added": card.version.images_added, "added_sha256": card.version.added_sha256, "left_out": card.version.left_out,
            "gallery_images": card.train_count, "calibration_images": card.calibration.count,
            "thresholds": {"image": card.thresholds.image, "pixel": card.thresholds.pixel},
            "thresholds_set_by": thresholds_set_by(card),
        })
    return rows


def thresholds_set_by(card: ModelCard) -> str:
    """Which of a version's thresholds labels set: "labels (image, pixel)", "labels (image)", or "normal images"."""
    if card.labelled is None:
        return "normal images"
    return "labels (image, pixel)" if card.labelled.pixel else "labels (image)"


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
    """What a model's thresholds decide and promise on normal images, in words: how they were set, the expected false
    alarms per 1,000 normal images of the threshold actually chosen (image_promise), the suspect training images, and
    what masks show. Empty values for a model without thresholds."""
    calibration, thresholds = card.calibration, card.thresholds
    if card.labelled is not None:
        return labelled_rules(card)
    if thresholds.image is None or not calibration.count or calibration.image_fpr is None:
        return {"calibration": "none: the model has no calibrated thresholds (masks are maps scaled per image)"}
    count, target = calibration.count, calibration.image_fpr
    pixel = {"quantile": f"the {calibration.pixel_quantile} quantile of their pooled pixel scores",
             "mean_3sigma": "their pixel scores' mean + 3 standard deviations",
             "region": f"the level at which about {target:.1%} of them show a flagged region of {max(1, thresholds.min_region)} pixels"}
    masks = mask_rule(thresholds)
    regions = f", regions under {thresholds.min_region} pixels (at the working size) dropped" if thresholds.min_region > 1 else ""
    suspects = {"suspect training images": suspects_line(calibration)} if calibration.suspects else {}
    return {
        "calibration": f"{count} normal images ({calibration.images.replace('_', '-')})",
        "image rule": f"anomalous when the image score > {thresholds.image:.4g}, {image_rule(calibration)}",
        "expected false alarms": image_promise(calibration),
        **suspects,
        "pixel rule": f"pixel score > {thresholds.pixel:.4g}: {pixel[calibration.pixel_rule]}",
        "masks": masks + regions,
    }


def image_rule(calibration: CalibrationRecord) -> str:
    """How the calibrated image threshold was set, in words (the order statistic: which largest score it is)."""
    count, target = calibration.count, calibration.image_fpr or 0.0
    if calibration.image_estimator == "pot":
        return (f"a generalised Pareto tail fitted to the highest {PotTail.tail_count(count)} of their {count} scores "
                f"(peaks over threshold), at a target of {target:g}")
    if calibration.image_estimator == "lognormal":
        return f"a log-normal fitted to their {count} scores by median and MAD, at a target of {target:g}"
    rank = order_statistic_rank(count, target)
    return "the largest calibration score" if rank == 1 else f"the {_ordinal(rank)} largest of the {count} calibration scores"


def image_promise(calibration: CalibrationRecord) -> str:
    """The expected false alarms per 1,000 normal images of the calibrated image threshold and their 90% range (the
    law the card records, image_threshold.recorded_law: what the run report's drift band predicts too), and the
    target the calibration images support when they cannot support image_fpr."""
    law = recorded_law(calibration)
    if law is None:
        return "unknown: the model has no calibration"
    low, high = law.range()
    count, target = calibration.count, calibration.image_fpr or 0.0
    how = ("the order statistic's exact law" if calibration.image_estimator == "order_statistic"
           else f"the {calibration.image_estimator} fit, bootstrapped")
    text = (f"about {1000 * law.mean:.3g} per 1,000 normal images (90% range {1000 * low:.3g} - {1000 * high:.3g}; "
            f"{how}, from {count} calibration images)")
    supported = 1 / (count + 1)
    if target < supported:
        text += (f"; the target {1000 * target:.3g} per 1,000 (image_fpr) needs at least {math.ceil(1 / target)} images: "
                 f"{count} support about {1000 * supported:.3g} per 1,000")
    return text


def suspects_line(calibration: CalibrationRecord) -> str:
    """The suspect training images (ids and image scores, the first 5) and what became of them."""
    shown = ", ".join(f"{entry['id']} ({entry['score']:.4g})" for entry in calibration.suspects[:5])
    more = f" and {len(calibration.suspects) - 5} more" if len(calibration.suspects) > 5 else ""
    fate = "left out of the gallery and calibration" if calibration.suspects_left_out else "kept (listed only; suspects leave_out leaves them out)"
    return f"{len(calibration.suspects)}, scoring far above the other calibration images: {shown}{more}; {fate}"


def _ordinal(number: int) -> str:
    suffix = "th" if 10 <= number % 100 <= 20 else {1: "st", 2: "nd", 3: "rd"}.get(number % 10, "th")
    return f"{number}{suffix}"


def labelled_rules(card: ModelCard) -> dict[str, str]:
    """decision_rules of a version whose thresholds `thresholds --labelled` set: which ones the labels set, from what,
    and what they decided on those images (no promise from normal images alone: the labels chose the trade-off)."""
    record, thresholds = card.labelled, card.thresholds
    assert record is not None
    after = record.decisions.get("after", {})
    image, pixel = after.get("image") or {}, after.get("pixel") or {}
    masks = mask_rule(thresholds)
    regions = f", regions under {thresholds.min_region} pixels (at the working size) dropped" if thresholds.min_region > 1 else ""
    was = record.before
    return {
        "thresholds set by": f"labels: {record.source} ({record.normal_images} normal, {record.defective_images} defective images)",
        "image rule": f"anomalous when the image score > {thresholds.image:.4g}: label-set at {record.target} "
                      f"(was {format_number(was['image'])}); on the labelled images FPR {format_number(image.get('fpr'))}, TPR {format_number(image.get('tpr'))}",
        "pixel rule": (f"pixel score > {format_number(thresholds.pixel)}: label-set at the best SegF1 of the labelled masks "
                       f"(was {format_number(was['pixel'])}; SegF1 {format_number(pixel.get('seg_f1'))})" if record.pixel else
                       f"pixel score > {format_number(thresholds.pixel)}: as calibrated on normal images (the labels had no masks)"),
        "masks": masks + regions,
    }




def mask_rule(thresholds: Thresholds) -> str:
    """Which regions a model's masks show, in words (Thresholds.shows_every_region)."""
    evident = None if thresholds.region is None else (
        f"the regions with their own evidence ({max(1, thresholds.min_region)} pixels above {thresholds.region:.4g})")
    if not thresholds.gate_masks:
        return "flagged pixels of every image" if evident is None else f"on every image, {evident}"
    gate = "images flagged anomalous" if thresholds.gate is None else f"images scoring above {thresholds.gate:.4g}"
    if evident is None:
        return "empty for images not flagged anomalous" if thresholds.gate is None else f"every region on {gate}, empty on others"
    return f"every region on {gate}; on others, {evident}"
