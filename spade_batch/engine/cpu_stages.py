"""The CPU stages Ray Data runs as tasks: decode before the model stage, outputs after it.

They import no torch (a test checks): a worker process that runs them starts in about a second
instead of the five CPU-seconds torch and torchvision take to import, and holds 300 MB less.

Each stage maps a batch, a dict of equal-length numpy columns, to another. Columns between stages:
id, uri (str), and in score the fingerprint the image's listing gave (str, "" unknown); height, width
(int32, original size); image (B x S x S x 3 uint8 at the working size); error (str, "" when none:
else the image is bad); sha256 (str: the file's content_sha256, "" when it was not read, or in score, which
needs none); transient
(bool: it could not be read for a reason that may pass, e.g. throttling; it is retried by a re-run,
never recorded as bad). The model stages (stages.py) pass on every column but the image, and add their
results: features in fit; image_score, neighbour_ids, map and who computed them in score.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

from spade_batch.config import Settings
from spade_batch.formats import retry, storage
from spade_batch.formats.card import Thresholds
from spade_batch.formats.features import FeatureTable, LayerShape, content_sha256, write_features
from spade_batch.formats.images import Preprocessing, decode_for_model, decode_image, resize_for_model, resize_map
from spade_batch.formats.layout import Outputs, part_name
from spade_batch.formats.score_table import ScoreRow, result_row, write_scores
from spade_batch.method.masks import mask_from_map, png_bytes

Batch = dict[str, np.ndarray]

SCORED, FAILED, RETRYABLE = "scored", "failed", "retryable"


def object_column(values: list[Any]) -> np.ndarray:
    """A 1-D object column (strings, None, lists) that numpy would otherwise try to broadcast."""
    column = np.empty(len(values), dtype=object)
    column[:] = values
    return column


def passed_on(batch: Batch) -> Batch:
    """The decode stage's columns a model stage passes on to the output stage: all but the image."""
    return {key: column for key, column in batch.items() if key != "image"}


def usable_mask(batch: Batch) -> np.ndarray:
    """B bool: the images decoded without error."""
    return np.array([not error for error in batch["error"]], dtype=bool)


def worker_columns(count: int, worker: str, node: str, backbone_loads: int, gallery_loads: int) -> Batch:
    """Who computed a batch: model worker id, node id, and the backbone and gallery loads it had done for this run by then
    (0 backbone loads: its process kept the backbone from an earlier run)."""
    return {
        "worker": object_column([worker] * count),
        "node": object_column([node] * count),
        "backbone_loads": np.full(count, backbone_loads, np.int32),
        "gallery_loads": np.full(count, gallery_loads, np.int32),
    }


def read_images(batch: Batch, preprocessing: Preprocessing, options: dict[str, Any], max_pixels: int, hash_content: bool) -> Batch:
    """CPU stage: id, uri (and any other column, passed on) -> + image (S x S x 3 uint8), height, width, error,
    sha256 (with hash_content: fit and add record it, score does not pay for it), transient. Never raises for one image.

    A read that still failed for a transient reason (storage retries exhausted) is marked transient,
    never recorded as a bad image.
    """
    count = len(batch["id"])
    images = np.zeros((count, preprocessing.size, preprocessing.size, 3), np.uint8)
    heights, widths = np.zeros(count, np.int32), np.zeros(count, np.int32)

    def decode(i: int, uri: str, data: bytes) -> None:
        decoded = decode_for_model(data, uri, preprocessing.resize_to, max_pixels)
        heights[i], widths[i] = decoded.height, decoded.width
        images[i] = resize_for_model(decoded.rgb, preprocessing)

    read = _read_each(batch["uri"], options, decode, hash_content)
    return {**batch, "image": images, "height": heights, "width": widths, **read}


def read_hashes(batch: Batch, options: dict[str, Any]) -> Batch:
    """CPU stage of add, for images whose ids the model holds: id, uri -> id, error, sha256, transient (read, never decoded)."""
    return {"id": batch["id"], **_read_each(batch["uri"], options, lambda i, uri, data: None, hash_content=True)}


def _read_each(uris: np.ndarray, options: dict[str, Any], use: Callable[[int, str, bytes], None], hash_content: bool) -> Batch:
    """Read each file, take its content_sha256 (with hash_content), then use(i, uri, bytes): columns error, sha256 ("" when none), transient.

    Any failure becomes that image's error, never the batch's; transient when it may pass (storage retries exhausted).
    """
    errors, hashes = [""] * len(uris), [""] * len(uris)
    transient = np.zeros(len(uris), bool)
    for i, uri in enumerate(uris):
        try:
            data = storage.read_bytes(uri, options)
            hashes[i] = content_sha256(data) if hash_content else ""
            use(i, uri, data)
        except Exception as error:  # noqa: BLE001 - every failure becomes this image's row, never the batch's
            errors[i] = f"{type(error).__name__}: {error}"
            transient[i] = retry.is_transient(error)
    return {"error": object_column(errors), "sha256": object_column(hashes), "transient": transient}


def write_feature_part(batch: Batch, features_uri: str, layer_shapes: list[dict[str, Any]], options: dict[str, Any]) -> Batch:
    """Output stage of fit: one features part file per batch (transient failures left out, to be retried)."""
    keep = ~batch["transient"].astype(bool)
    if keep.any():
        shapes = [LayerShape(**shape) for shape in layer_shapes]
        ids = [str(i) for i in batch["id"][keep]]
        table = FeatureTable(
            ids=ids,
            uris=[str(u) for u in batch["uri"][keep]],
            heights=batch["height"][keep],
            widths=batch["width"][keep],
            global_features=batch["global"][keep],
            layers=[batch[f"layer{i}"][keep] for i in range(len(shapes))],
            layer_shapes=shapes,
            errors=[str(e) or None for e in batch["error"][keep]],
            sha256=[str(h) or None for h in batch["sha256"][keep]],
        )
        write_features(storage.join(features_uri, part_name(ids)), table, options)
    return _status(batch)


def _status(batch: Batch) -> Batch:
    status = [RETRYABLE if t else FAILED if e else SCORED for e, t in zip(batch["error"], batch["transient"])]
    return {"id": batch["id"], "status": object_column(status), "error": batch["error"]}


def write_score_outputs(
    batch: Batch, out_root: str, thresholds: Thresholds, settings: Settings, run: str | None = None,
) -> Batch:
    """Output stage of score: masks (and maps, overlays) of each image, then the batch's scores part, last
    (named after the run: layout.part_name).

    Returns the small columns the driver summarises: id, status, error, is_anomalous, and who scored it.
    """
    options = settings.fsspec_options()
    outputs, limits = Outputs(out_root), thresholds
    rows: list[ScoreRow] = []
    anomalous: list[bool | None] = []
    for i, image_id in enumerate(batch["id"]):
        image_id, uri, error, fingerprint = str(image_id), str(batch["uri"][i]), batch["error"][i], str(batch["fingerprint"][i]) or None
        if batch["transient"][i]:
            anomalous.append(None)
            continue
        if error:
            rows.append(ScoreRow(id=image_id, uri=uri, error=str(error), fingerprint=fingerprint))
            anomalous.append(None)
            continue
        size = int(batch["height"][i]), int(batch["width"][i])
        anomaly_map = batch["map"][i]
        mask_size = size if settings.preprocess == "full" else anomaly_map.shape
        image_score = float(batch["image_score"][i])
        mask = mask_from_map(anomaly_map, *mask_size, limits, image_score)
        storage.write_bytes(outputs.mask(image_id), png_bytes(mask), options)
        row = result_row(image_id, uri, size, image_score, anomaly_map,
                         list(batch["neighbour_ids"][i]), mask, outputs.mask(image_id), limits, fingerprint)
        if settings.save_maps or row.is_anomalous:  # anomalous images' maps are drawn by the run report
            storage.write_npy(outputs.map(image_id), anomaly_map.astype(np.float16), options)
        if settings.save_overlays and settings.preprocess == "full":
            _write_overlay(uri, outputs.overlay(image_id), anomaly_map, limits.pixel, settings)
        rows.append(row)
        anomalous.append(row.is_anomalous)
    if rows:
        write_scores(storage.join(outputs.scores, part_name([row.id for row in rows], run)), rows, options)
    worker = {key: batch[key] for key in ("worker", "node", "backbone_loads", "gallery_loads")}
    return {**_status(batch), "is_anomalous": object_column(anomalous), **worker}


def _write_overlay(uri: str, target: str, anomaly_map: np.ndarray, pixel_threshold: float | None, settings: Settings) -> None:
    """Heat map over the original image (read again: only this optional output needs it)."""
    from spade_batch.formats.heatmap import colour_range, overlay  # matplotlib: imported only by the workers that draw

    options = settings.fsspec_options()
    image = decode_image(storage.read_bytes(uri, options), uri, settings.max_pixels)
    full = resize_map(anomaly_map, *image.shape[:2])
    storage.write_bytes(target, png_bytes(overlay(image, full, *colour_range(pixel_threshold, float(full.max())))), options)
