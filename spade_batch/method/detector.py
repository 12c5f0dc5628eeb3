"""The in-process API: fit on images, score images. No Ray, no storage.

    from spade_batch.method.detector import fit, score
    model = fit(normal_images, Settings(backbone="resnet18", weights="random", k=5))
    results = score(model, test_images)          # list[ImageScore]

This module is the one definition of fit and score: feature extraction, the calibration hold-out,
gallery building, calibration and per-batch scoring (scores.py turns a result into its row). The
Ray pipeline only distributes these classes and functions, so both give the same numbers.
"""

from __future__ import annotations

import functools
import json
import math
import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from spade_batch.config import Settings
from spade_batch.formats.features import LayerShape
from spade_batch.formats.images import Preprocessing, resize_for_model
from spade_batch.formats.model import Centre, GalleryWriter, ModelCard, SpadeModel, build_model
from spade_batch.method import calibrate, spade
from spade_batch.method.backbone import FeaturePyramid, load_backbone
from spade_batch.method.scoring import ImageScore, Normalisation, image_scores


def resolve_device(requested: str) -> torch.device:
    """auto: CUDA when this process can see a GPU, else CPU."""
    if requested == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if requested == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("device 'cuda' requested but torch sees no GPU here; use device: auto or cpu")
    return torch.device(requested)


@dataclass(frozen=True)
class Features:
    """Features of a batch of B images.

    Attributes:
        global_features: B x D float32 (raw, uncentred).
        layers: per pyramid layer, B x C_l x h_l x w_l float32 (raw), on the extractor's device.
    """

    global_features: torch.Tensor
    layers: list[torch.Tensor]

    def pixel_rows(self) -> list[np.ndarray]:
        """Per layer, B x (h * w) x C float16 on the CPU: the gallery and Parquet layout (channels last)."""
        return [layer.permute(0, 2, 3, 1).flatten(1, 2).to(torch.float16).cpu().numpy() for layer in self.layers]


def normalise(batch: torch.Tensor, spec: Preprocessing) -> torch.Tensor:
    """B x size x size x 3 uint8 (any device) -> B x 3 x size x size float32: ``(x/255 - mean) / std``."""
    mean = torch.tensor(spec.mean, dtype=torch.float32, device=batch.device).view(1, 3, 1, 1)
    std = torch.tensor(spec.std, dtype=torch.float32, device=batch.device).view(1, 3, 1, 1)
    return ((batch.permute(0, 3, 1, 2).float().div_(255) - mean) / std).contiguous()


class Extractor:
    """Preprocess + backbone, in batches.

    ``preprocessing`` defaults to the backbone's own input convention at settings.image_size and
    settings.preprocess; scoring passes the model card's, so a model keeps the convention it was fitted with.
    """

    def __init__(
        self,
        settings: Settings,
        storage_options: dict | None = None,
        device: torch.device | None = None,
        preprocessing: Preprocessing | None = None,
    ):
        self.device = device or resolve_device(settings.device)
        self.batch_size = settings.batch_size
        self.pyramid, self.weights_sha256 = _cached_backbone(
            settings.backbone, settings.weights, settings.seed, _freeze(storage_options), str(self.device)
        )
        spec = self.pyramid.spec
        self.preprocessing = preprocessing or Preprocessing(settings.image_size, settings.preprocess, spec.mean, spec.std)

    @property
    def layer_shapes(self) -> list[LayerShape]:
        spec = self.pyramid.spec
        side = self.preprocessing.size
        return [
            LayerShape(name, math.ceil(side / stride), math.ceil(side / stride), channels)
            for name, stride, channels in zip(spec.layers, spec.strides, spec.channels)
        ]

    @property
    def global_dim(self) -> int:
        return self.pyramid.spec.global_dim

    def prepare(self, image: np.ndarray) -> np.ndarray:
        """H x W x 3 uint8 image -> S x S x 3 uint8 at the working size (what a CPU decode worker does)."""
        return resize_for_model(image, self.preprocessing)

    def forward(self, prepared: np.ndarray) -> Features:
        """B x S x S x 3 uint8 prepared images -> their features, in backbone batches of batch_size."""
        globals_, layers = [], []
        for start in range(0, len(prepared), self.batch_size):
            batch = torch.from_numpy(np.ascontiguousarray(prepared[start : start + self.batch_size])).to(self.device)
            with torch.inference_mode():
                pooled, pyramid = self.pyramid(normalise(batch, self.preprocessing))
            globals_.append(pooled.float())
            layers.append([layer.float() for layer in pyramid])
        return Features(torch.cat(globals_), [torch.cat(per_layer) for per_layer in zip(*layers)])


def _freeze(options: dict | None) -> str:
    """Storage options as a hashable cache key."""
    return json.dumps(options or {}, sort_keys=True, default=str)


@functools.lru_cache(maxsize=2)
def _cached_backbone(name: str, weights: str, seed: int, options_json: str, device: str) -> tuple[FeaturePyramid, str]:
    """One backbone per process and settings: Ray reuses worker processes across tasks."""
    return load_backbone(name, weights, seed=seed, storage_options=json.loads(options_json), device=device)


def backbone_loads() -> int:
    """How many backbones this process has loaded (each model actor should load one)."""
    return _cached_backbone.cache_info().misses


# ---------------------------------------------------------------- fit


def split_fit_ids(ids: Sequence[str], settings: Settings) -> tuple[list[str], list[str]]:
    """(gallery ids, calibration ids), both sorted: the deterministic hold-out by id hash (calibrate.is_held_out).

    Raises ValueError when the settings learn scales from calibration images but none was held out.
    """
    held = {i for i in ids if calibrate.is_held_out(i, settings.calibration_fraction, settings.seed)}
    learnt = [name for name, on in (("layer_normalise", settings.layer_normalise), ("image_score combined", settings.image_score == "combined")) if on]
    if learnt and not held:
        raise ValueError(
            f"{' and '.join(learnt)}: scales are learnt from calibration images, but calibration_fraction "
            f"{settings.calibration_fraction} held out none of the {len(ids)} training images; raise calibration_fraction or add images"
        )
    return sorted(set(ids) - held), sorted(held)


def new_card(
    extractor: Extractor, settings: Settings, train_count: int, manifest_sha256: str, failed: Sequence[dict[str, str]]
) -> ModelCard:
    """The card of a model fitted with this extractor and settings (no thresholds yet)."""
    if train_count < settings.k:
        raise ValueError(
            f"k={settings.k} nearest normal images requested but only {train_count} usable training images "
            f"({len(failed)} failed); lower k or add normal images"
        )
    return ModelCard(
        settings=settings.model_dict(),
        preprocessing=extractor.preprocessing.to_dict(),
        weights_sha256=extractor.weights_sha256,
        layers=[vars(shape) for shape in extractor.layer_shapes],
        global_dim=extractor.global_dim,
        train_count=train_count,
        train_manifest_sha256=manifest_sha256,
        failed_train_images=list(failed),
    )


def fit(images: Sequence[np.ndarray], settings: Settings, ids: Sequence[str] | None = None, folder: str | None = None) -> SpadeModel:
    """Fit on normal H x W x 3 uint8 images.

    settings.calibration_fraction of the images (by id hash, as the pipeline does) are held out of
    the gallery to calibrate the thresholds. The gallery files go to `folder` (a new temp folder by
    default); `model.save(uri)` publishes the model.
    """
    ids = list(ids) if ids is not None else [f"{i:06d}" for i in range(len(images))]
    extractor = Extractor(settings)
    features = extractor.forward(np.stack([extractor.prepare(image) for image in images]))
    gallery_ids, calibration_ids = split_fit_ids(ids, settings)
    rows = features.pixel_rows()
    first = ids.index(gallery_ids[0]) if gallery_ids else 0
    centre = Centre.of_image(features.global_features[first].cpu().numpy(), [layer[first] for layer in rows])
    card = new_card(extractor, settings, len(gallery_ids), "in-process", [])
    writer = GalleryWriter(folder or tempfile.mkdtemp(prefix="spade-model-"), gallery_ids, extractor.layer_shapes, extractor.global_dim, centre)
    writer.add(ids, features.global_features.cpu().numpy(), rows)
    model = build_model(writer, card, settings)
    if not calibration_ids:
        return model
    held = [ids.index(i) for i in calibration_ids]
    held_features = Features(features.global_features[held], [layer[held] for layer in features.layers])
    if settings.layer_normalise:
        moments = Scorer(model, extractor, settings.chunk_mib * 2**20, settings.precision).layer_moments(held_features)
        model = model.with_normalisation(Normalisation(layer_scales=calibrate.layer_scales(moments)).to_dict())
    results = Scorer(model, extractor, settings.chunk_mib * 2**20, settings.precision).score_features(held_features)
    return calibrate.calibrate(model, results, settings)


# ---------------------------------------------------------------- score


class Scorer:
    """Scores images against a fitted model.

    On a GPU the gallery is kept on the device when it fits in half its free memory; otherwise
    (and on CPU) the K retrieved images' rows are gathered from the (memory-mapped) gallery.
    """

    def __init__(
        self,
        model: SpadeModel,
        extractor: Extractor,
        chunk_bytes: int = spade.DEFAULT_CHUNK_BYTES,
        precision: str = "float32",
        images_per_call: int | None = None,
    ):
        settings = model.card.settings
        self.model, self.extractor = model, extractor
        self.k, self.kappa, self.sigma = settings["k"], settings["kappa"], settings["sigma"]
        self.image_score, self.map_top = settings["image_score"], settings["map_top"]
        self.normalisation = Normalisation.from_dict(model.card.normalisation)
        self.layer_scales = self.normalisation.layer_scales if settings["layer_normalise"] else None
        self.chunk_bytes, self.precision = chunk_bytes, precision
        device = extractor.device
        # Several images per kernel call pay off on a GPU; on a CPU one image already fills the cores.
        self.images_per_call = images_per_call or (extractor.batch_size if device.type == "cuda" else 1)
        self.global_centre = torch.from_numpy(model.centre.global_mean).to(device)
        self.layer_centres = [torch.from_numpy(mean).to(device) for mean in model.centre.layer_means]
        self.gallery: list[np.ndarray | torch.Tensor] = list(model.gallery)
        if device.type == "cuda" and model.gallery_bytes < torch.cuda.mem_get_info(device)[0] // 2:
            self.gallery = [torch.from_numpy(np.ascontiguousarray(bank)).to(device) for bank in model.gallery]

    def score(self, images: Sequence[np.ndarray]) -> list[ImageScore]:
        """Scores of H x W x 3 uint8 images."""
        if not images:
            return []
        return self.score_prepared(np.stack([self.extractor.prepare(image) for image in images]))

    def score_prepared(self, prepared: np.ndarray) -> list[ImageScore]:
        """Scores of B x S x S x 3 uint8 images already at the working size."""
        if not len(prepared):
            return []
        return self.score_features(self.extractor.forward(prepared))

    def score_features(self, features: Features) -> list[ImageScore]:
        """Scores from raw (uncentred) features: image kNN, then the pixel maps, images_per_call at a time."""
        knn_scores, neighbours = self._image_knn(features)
        size = (self.extractor.preprocessing.size, self.extractor.preprocessing.size)
        results = []
        for chunk, layer_maps in self._layer_distances(features, neighbours):
            maps = spade.combine_layer_maps(layer_maps, size, self.sigma, self.layer_scales)
            map_scores = spade.map_scores(maps, self.map_top).cpu().numpy()
            scores = image_scores(knn_scores[chunk], map_scores, self.image_score, self.normalisation)
            for offset, anomaly_map in enumerate(maps.cpu().numpy()):
                row = chunk.start + offset
                results.append(ImageScore(float(scores[offset]), neighbours[row], anomaly_map,
                                          float(knn_scores[row]), float(map_scores[offset])))
        return results

    def layer_moments(self, features: Features) -> np.ndarray:
        """L x 3 (count, sum, sum of squares) of each layer's pixel distances over these images (calibrate.layer_moments)."""
        _, neighbours = self._image_knn(features)
        return sum(
            (calibrate.layer_moments([m.cpu().numpy() for m in layer_maps]) for _, layer_maps in self._layer_distances(features, neighbours)),
            np.zeros((len(features.layers), 3)),
        )

    def _image_knn(self, features: Features) -> tuple[np.ndarray, np.ndarray]:
        queries = spade.centre(features.global_features, self.global_centre).cpu().numpy()
        return spade.image_knn(self.model.index, queries, self.k)

    def _layer_distances(self, features: Features, neighbours: np.ndarray) -> Iterator[tuple[slice, list[torch.Tensor]]]:
        """Per images_per_call images: their slice, and per layer their B x h_l x w_l squared distance maps."""
        device = self.extractor.device
        for start in range(0, len(neighbours), self.images_per_call):
            chunk = slice(start, min(start + self.images_per_call, len(neighbours)))
            layers = [spade.centre(layer[chunk].to(device), mean, dim=1) for layer, mean in zip(features.layers, self.layer_centres)]
            galleries = [spade.gather_galleries(bank, neighbours[chunk], device=device) for bank in self.gallery]
            yield chunk, spade.layer_distance_maps(layers, galleries, self.kappa, self.chunk_bytes, self.precision)


def score(model: SpadeModel, images: Sequence[np.ndarray], settings: Settings | None = None) -> list[ImageScore]:
    """Score H x W x 3 uint8 images; settings give the device and batch size, the model keys are the model's own."""
    settings = model.card.settings_for(settings or Settings())
    extractor = Extractor(settings, preprocessing=Preprocessing.from_dict(model.card.preprocessing))
    return Scorer(model, extractor, settings.chunk_mib * 2**20, settings.precision).score(images)
