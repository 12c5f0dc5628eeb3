"""What a model or a scoring run's outputs hold, as one JSON-ready dict: what `spade-batch show` prints.

A model is a MODEL_URI with spade.json (the card); a run is an OUT_URI with run.json. A run's failures
by reason and its top images are read from every scores part file, not from run.json's capped lists.
"""

from __future__ import annotations

import heapq
import json
import re
from collections import Counter
from collections.abc import Iterable
from typing import Any

from spade_batch.config import group_values
from spade_batch.formats import storage
from spade_batch.formats.layout import ModelLayout, Outputs, part_files, read_columns
from spade_batch.formats.model import load_card

TOP_COLUMNS = ["id", "image_score", "is_anomalous", "max_pixel_score", "anomalous_fraction", "mask_uri"]


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
        f"{uri} holds neither a model ({ModelLayout.CARD}) nor a finished run ({Outputs.RUN_NAME}): give a MODEL_URI written by fit "
        f"or an OUT_URI written by score (evaluate's run is OUT/{Outputs.SCORES})"
    )


def model_summary(uri: str, options: storage.StorageOptions = None) -> dict[str, Any]:
    """Backbone, weights identity, method settings, thresholds, training counts and failures by reason."""
    card = load_card(uri, options)
    return {
        "kind": "model",
        "uri": uri,
        "backbone": card.settings["backbone"],
        "weights": card.settings["weights"],
        "weights_sha256": card.weights_sha256,
        "settings": card.settings,
        "preprocessing": card.preprocessing,
        "thresholds": card.thresholds,
        "calibration": card.calibration,
        "training": {
            "gallery_images": card.train_count,
            "calibration_images": card.calibration.get("count", 0),
            "failed_images": len(card.failed_train_images),
            "manifest_sha256": card.train_manifest_sha256,
        },
        "failures": failures_by_reason((f["id"], f["error"]) for f in card.failed_train_images),
        "created": card.created,
        "package_version": card.package_version,
    }


def run_summary(uri: str, options: storage.StorageOptions = None, top: int = 10) -> dict[str, Any]:
    """Counts, anomaly rate, failures by reason, thresholds, timings and the `top` highest-scoring images."""
    outputs = Outputs(uri)
    run = json.loads(storage.read_text(outputs.run_json, options))
    failed: list[tuple[str, str]] = []
    best: list[dict[str, Any]] = []
    for _, columns in read_columns(part_files(outputs.scores, options), [*TOP_COLUMNS, "error"], options):
        rows = [dict(zip(columns, values)) for values in zip(*columns.values())]
        failed += [(row["id"], row["error"]) for row in rows if row["error"] is not None]
        scored = (row for row in rows if row["error"] is None)
        best = heapq.nlargest(top, [*best, *({key: row[key] for key in TOP_COLUMNS} for row in scored)], key=lambda r: r["image_score"])
    scored_count = run["scored"]
    return {
        "kind": "run",
        "uri": uri,
        "model_uri": run["model_uri"],
        "counts": {key: run[key] for key in ("images", "scored", "failed", "retryable", "resumed", "anomalous")},
        "anomaly_rate": None if run["anomalous"] is None or not scored_count else run["anomalous"] / scored_count,
        "thresholds": run["thresholds"],
        "mask_kind": run["mask_kind"],
        "timings": {"seconds": run["seconds"], "images_per_second": run["images_per_second"]},
        "failures": failures_by_reason(failed),
        "top": best,
        "settings": group_values(run["settings"]),
        "versions": run["versions"],
    }


def failures_by_reason(failures: Iterable[tuple[str, str]]) -> list[dict[str, Any]]:
    """(id, error) pairs -> [{reason, count, example}], most frequent first.

    The reason is the error's first sentence with the image's URI and numbers taken out, so that
    "cannot decode s3://b/a.png: the file is empty (0 bytes)" groups with every other empty file.
    """
    counts: Counter[str] = Counter()
    examples: dict[str, str] = {}
    for image_id, error in failures:
        reason = failure_reason(image_id, error)
        counts[reason] += 1
        examples.setdefault(reason, image_id)
    return [{"reason": reason, "count": count, "example": examples[reason]} for reason, count in counts.most_common()]


def failure_reason(image_id: str, error: str) -> str:
    """The error's first sentence, without the image's URI (any token ending in its id) or numbers."""
    text = re.sub(r"\S*" + re.escape(image_id), "<image>", error)
    text = re.split(r"\.\s", text, maxsplit=1)[0].rstrip(".")
    return re.sub(r"\d+", "N", text)
