"""The stages Ray Data runs: decode (CPU tasks), model (actors), outputs (CPU tasks).

Each stage maps a batch, a dict of equal-length numpy columns, to another. The model stages are
callable classes that load their big read-only state once in __init__ (backbone, faiss index,
memory-mapped gallery) and then serve many batches; everything they compute is detector.py's.

Columns between stages: id, uri (str); height, width (int32, original size); image (B x S x S x 3
uint8 at the working size); error (str, "" when none: else the image is bad); transient (bool: it could not
be read for a reason that may pass, e.g. throttling; it is retried by a re-run, never recorded as
bad).
"""

from __future__ import annotations

import uuid
from typing import Any

import numpy as np
import ray
import torch

from spade_batch import calibrate, storage
from spade_batch.config import Settings
from spade_batch.detector import Extractor, Features, ImageScore, Scorer, Thresholds, backbone_loads, result_row
from spade_batch.features import FeatureTable, LayerShape, read_features, write_features
from spade_batch.images import Preprocessing, decode_for_model, decode_image, resize_for_model, resize_map
from spade_batch.masks import mask_from_map, png_bytes
from spade_batch.model import ModelCard, SpadeModel, load_count
from spade_batch.pipeline.layout import Outputs, part_name
from spade_batch.report import overlay
from spade_batch.scores import ScoreRow, write_scores

Batch = dict[str, np.ndarray]

SCORED, FAILED, RETRYABLE = "scored", "failed", "retryable"


def object_column(values: list[Any]) -> np.ndarray:
    """A 1-D object column (strings, None, lists) that numpy would otherwise try to broadcast."""
    column = np.empty(len(values), dtype=object)
    column[:] = values
    return column


def read_images(batch: Batch, preprocessing: dict[str, Any], options: dict[str, Any], max_pixels: int) -> Batch:
    """CPU stage: id, uri -> + image (S x S x 3 uint8), height, width, error, transient. Never raises for one image.

    A read that still failed for a transient reason (storage retries exhausted) is marked transient,
    never recorded as a bad image.
    """
    spec = Preprocessing.from_dict(preprocessing)
    count = len(batch["id"])
    images = np.zeros((count, spec.size, spec.size, 3), np.uint8)
    heights, widths = np.zeros(count, np.int32), np.zeros(count, np.int32)
    errors = [""] * count
    transient = np.zeros(count, bool)
    for i, uri in enumerate(batch["uri"]):
        try:
            decoded = decode_for_model(storage.read_bytes(uri, options), uri, spec.resize_to, max_pixels)
        except Exception as error:  # noqa: BLE001 - every failure becomes this image's row, never the batch's
            errors[i] = f"{type(error).__name__}: {error}"
            transient[i] = storage.is_transient(error)
            continue
        heights[i], widths[i] = decoded.height, decoded.width
        images[i] = resize_for_model(decoded.rgb, spec)
    return {"id": batch["id"], "uri": batch["uri"], "image": images, "height": heights, "width": widths,
            "error": object_column(errors), "transient": transient}


def _usable(batch: Batch) -> np.ndarray:
    return np.array([not error for error in batch["error"]], dtype=bool)


def worker_columns(count: int, worker: str, node: str) -> Batch:
    """Who computed a batch: actor id, node id, and the loads this process has done so far."""
    return {
        "worker": object_column([worker] * count),
        "node": object_column([node] * count),
        "backbone_loads": np.full(count, backbone_loads(), np.int32),
        "gallery_loads": np.full(count, load_count(), np.int32),
    }


class ExtractStage:
    """Model stage of fit: prepared images -> global (B x D float32) and layerN (B x P x C float16) columns."""

    def __init__(self, settings: Settings):
        self.extractor = Extractor(settings, settings.fsspec_options())

    def __call__(self, batch: Batch) -> Batch:
        usable = _usable(batch)
        count = len(usable)
        global_features = np.zeros((count, self.extractor.global_dim), np.float32)
        layers = [np.zeros((count, s.height * s.width, s.channels), np.float16) for s in self.extractor.layer_shapes]
        if usable.any():
            features = self.extractor.forward(batch["image"][usable])
            global_features[usable] = features.global_features.cpu().numpy()
            for bank, rows in zip(layers, features.pixel_rows()):
                bank[usable] = rows
        kept = {key: batch[key] for key in ("id", "uri", "height", "width", "error", "transient")}
        return {**kept, "global": global_features, **{f"layer{i}": bank for i, bank in enumerate(layers)}}


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
        )
        write_features(storage.join(features_uri, part_name(ids)), table, options)
    return _status(batch)


def _status(batch: Batch) -> Batch:
    status = [RETRYABLE if t else FAILED if e else SCORED for e, t in zip(batch["error"], batch["transient"])]
    return {"id": batch["id"], "status": object_column(status), "error": batch["error"]}


class ScoreStage:
    """Model stage of score: prepared images -> image_score, neighbour_ids, map (B x S x S float32)."""

    def __init__(self, model_uri: str, settings: Settings, card: dict[str, Any] | None = None):
        options = settings.fsspec_options()
        self.model = SpadeModel.load(model_uri, options, ModelCard(**card) if card else None)
        preprocessing = Preprocessing.from_dict(self.model.card.preprocessing)
        extractor = Extractor(settings, options, preprocessing=preprocessing)
        self.scorer = Scorer(self.model, extractor, settings.chunk_mib * 2**20, settings.precision)
        self.worker, self.node = uuid.uuid4().hex[:12], ray.get_runtime_context().get_node_id()

    def __call__(self, batch: Batch) -> Batch:
        usable = _usable(batch)
        count, size = len(usable), self.scorer.extractor.preprocessing.size
        scores, maps = np.full(count, np.nan, np.float32), np.zeros((count, size, size), np.float32)
        neighbour_ids: list[list[str]] = [[] for _ in range(count)]
        rows = np.flatnonzero(usable)
        for row, result in zip(rows, self.scorer.score_prepared(batch["image"][usable])):
            scores[row], maps[row] = result.score, result.anomaly_map
            neighbour_ids[row] = [self.model.train_ids[n] for n in result.neighbours]
        kept = {key: batch[key] for key in ("id", "uri", "height", "width", "error", "transient")}
        return {**kept, "image_score": scores, "neighbour_ids": object_column(neighbour_ids), "map": maps,
                **worker_columns(count, self.worker, self.node)}


def write_score_outputs(
    batch: Batch, out_root: str, thresholds: tuple[float | None, float | None], settings: Settings
) -> Batch:
    """Output stage of score: masks (and maps, overlays) of each image, then the batch's scores part, last.

    Returns the small columns the driver summarises: id, status, error, is_anomalous, and who scored it.
    """
    options = settings.fsspec_options()
    outputs, limits = Outputs(out_root), Thresholds(*thresholds)
    rows: list[ScoreRow] = []
    anomalous: list[bool | None] = []
    for i, image_id in enumerate(batch["id"]):
        image_id, uri, error = str(image_id), str(batch["uri"][i]), batch["error"][i]
        if batch["transient"][i]:
            anomalous.append(None)
            continue
        if error:
            rows.append(ScoreRow(id=image_id, uri=uri, error=str(error)))
            anomalous.append(None)
            continue
        size = int(batch["height"][i]), int(batch["width"][i])
        result = ImageScore(float(batch["image_score"][i]), np.empty(0, np.int64), batch["map"][i])
        mask_size = size if settings.preprocess == "full" else result.anomaly_map.shape
        mask = mask_from_map(result.anomaly_map, *mask_size, limits.pixel)
        storage.write_bytes(outputs.mask(image_id), png_bytes(mask), options)
        row = result_row(image_id, uri, size, result, list(batch["neighbour_ids"][i]), mask, outputs.mask(image_id), limits)
        if settings.save_maps or row.is_anomalous:  # anomalous images' maps are drawn by the run report
            storage.write_npy(outputs.map(image_id), result.anomaly_map.astype(np.float16), options)
        if settings.save_overlays and settings.preprocess == "full":
            _write_overlay(uri, outputs.overlay(image_id), result.anomaly_map, limits.pixel, settings)
        rows.append(row)
        anomalous.append(row.is_anomalous)
    if rows:
        write_scores(storage.join(outputs.scores, part_name([row.id for row in rows])), rows, options)
    worker = {key: batch[key] for key in ("worker", "node", "backbone_loads", "gallery_loads")}
    return {**_status(batch), "is_anomalous": object_column(anomalous), **worker}


def _write_overlay(uri: str, target: str, anomaly_map: np.ndarray, pixel_threshold: float | None, settings: Settings) -> None:
    """Heat map over the original image (read again: only this optional output needs it)."""
    options = settings.fsspec_options()
    image = decode_image(storage.read_bytes(uri, options), uri, settings.max_pixels)
    full = resize_map(anomaly_map, *image.shape[:2])
    high = pixel_threshold * 2 if pixel_threshold is not None else float(full.max())
    storage.write_bytes(target, png_bytes(overlay(image, full, 0.0, max(high, 1e-12))), options)


class CalibrationStage:
    """Scores held-out normal images from their stored features (no second extraction).

    moments: return each part's summed per-layer distance moments (Scorer.layer_moments, for the layer
    scales) instead of per-image scores.
    """

    def __init__(self, model_uri: str, settings: Settings, card: dict[str, Any], moments: bool = False):
        self.stage = ScoreStage(model_uri, settings, card)
        self.options, self.moments = settings.fsspec_options(), moments

    def __call__(self, batch: Batch) -> Batch:
        ids, knn_scores, map_scores, samples, moments = [], [], [], [], []
        for part, wanted in zip(batch["part"], batch["ids"]):
            table = read_features([str(part)], self.options)
            keep = np.isin(np.array(table.ids, dtype=object), np.array(list(wanted), dtype=object))
            table = table.select(keep)
            layers = [
                torch.from_numpy(layer.astype(np.float32)).view(len(table), s.height, s.width, s.channels).permute(0, 3, 1, 2)
                for layer, s in zip(table.layers, table.layer_shapes)
            ]
            features = Features(torch.from_numpy(table.global_features), layers)
            if self.moments:
                moments.append(self.stage.scorer.layer_moments(features))
                continue
            results = self.stage.scorer.score_features(features)
            ids += table.ids
            knn_scores += [r.knn_score for r in results]
            map_scores += [r.map_score for r in results]
            samples += [calibrate.pixel_sample(r.anomaly_map) for r in results]
        if self.moments:
            return {"moments": np.stack(moments)}
        return {"id": object_column(ids), "knn_score": np.array(knn_scores, np.float64),
                "map_score": np.array(map_scores, np.float64), "pixel_sample": object_column(samples)}
