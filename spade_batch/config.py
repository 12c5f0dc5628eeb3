"""Typed settings: defaults, then a YAML file, then command-line overrides; validated on load.

Every key is documented in its field's `help`; `describe()` renders that table for the README and
`spade-batch config --show`.
"""

from __future__ import annotations

import dataclasses
import json
import math
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import yaml


class ConfigError(ValueError):
    """A configuration problem; the message names the key and the source."""


def _key(default: Any, help: str) -> Any:
    if isinstance(default, dict):
        return field(default_factory=lambda: dict(default), metadata={"help": help})
    return field(default=default, metadata={"help": help})


MODEL_KEYS = (
    "backbone", "weights", "seed", "image_size", "preprocess", "k", "kappa", "sigma", "index", "ivf_lists",
    "image_score", "map_top", "layer_normalise",
)
"""Keys fixed at fit time and recorded in the model's spade.json; score refuses a model that disagrees."""


@dataclass(frozen=True)
class Settings:
    """Everything a fit, score or evaluate run needs besides its input and output URIs."""

    backbone: str = _key("wide_resnet50_2", "CNN feature pyramid: wide_resnet50_2, resnet18, resnet50 or efficientnet_lite0.")
    weights: str = _key("imagenet", "Backbone weights: imagenet (torchvision / packaged), random (seeded), or a state-dict path or URI.")
    seed: int = _key(0, "Seed for random weights and for the calibration hold-out.")
    image_size: int = _key(224, "Working size in pixels: images are resized to image_size x image_size.")
    preprocess: str = _key("full", "full: the whole image is resized (every pixel scored); paper: resize 256 + centre crop 224 (the paper's protocol).")
    k: int = _key(50, "K: nearest normal images retrieved per test image (the paper uses 50).")
    kappa: int = _key(1, "kappa: nearest pixel features averaged per test pixel (the paper uses 1).")
    sigma: float = _key(4.0, "Gaussian smoothing of the anomaly map, in pixels at the working size (0 disables it).")
    index: str = _key("flat", "Image kNN index: flat (exact) or ivf (approximate, for very large training sets).")
    ivf_lists: int = _key(0, "IVF lists when index is ivf; 0 picks about 4 * sqrt(N).")
    image_score: str = _key("map", "Image score: map (mean of the anomaly map's highest map_top pixels; beat knn by 0.06 image ROCAUC on Magnetic Tile), knn (the paper: mean squared distance to the K nearest normal images) or combined (knn and map each standardised by the calibration images' scores, then averaged).")
    map_top: float = _key(0.01, "Fraction of an anomaly map's highest pixels averaged into its map score (image_score map or combined); 0: the single highest pixel.")
    layer_normalise: bool = _key(False, "Divide each layer's pixel distances by their standard deviation on the calibration images before averaging the layers (the paper: a plain average).")
    calibration_fraction: float = _key(0.1, "Fraction of the normal images held out of the gallery to calibrate thresholds (0 disables).")
    image_fpr: float = _key(0.01, "Target false-positive rate of the image threshold on normal images.")
    pixel_quantile: float = _key(0.999, "Quantile of normal pixel scores used as the pixel threshold.")
    image_threshold: float | None = _key(None, "Override the model's calibrated image threshold.")
    pixel_threshold: float | None = _key(None, "Override the model's calibrated pixel threshold.")
    shard_size: int = _key(64, "Images per decode task and per output part file (scores or features): the unit of CPU work, output and resume.")
    batch_size: int = _key(16, "Images per model call: one backbone forward pass, and on a GPU one batched pixel search.")
    device: str = _key("auto", "Torch device inside tasks: auto (cuda when the task has a GPU), cpu or cuda.")
    gpus_per_task: float | None = _key(None, "GPUs each task requests; unset: 1 when the cluster has GPUs now, else 0. Set it on autoscaling clusters that start without GPU nodes.")
    cpus_per_task: float = _key(1.0, "CPUs each task requests.")
    chunk_mib: int = _key(16, "Bound on one pixel-distance block, in MiB.")
    precision: str = _key("float32", "Pixel search GEMM precision: float32, tf32 or bfloat16. Low precision only ranks candidates; returned distances are recomputed in float32.")
    model_workers: int = _key(0, "Model actors (each loads the backbone and gallery once): 0 = one per GPU, or on CPU-only clusters one per cpus_per_task CPUs, keeping one CPU for decoding.")
    max_pixels: int = _key(50_000_000, "Largest image accepted, in pixels (width x height); larger ones get an error row. A worker needs about 10 bytes per pixel of the largest image.")
    save_maps: bool = _key(False, "Also write raw anomaly maps (float16 .npy at the working size) under OUT/maps/.")
    save_overlays: bool = _key(False, "Also write heat-map overlays (PNG) under OUT/overlays/.")
    overwrite: bool = _key(False, "Replace the outputs of an earlier run instead of resuming it.")
    endpoint_url: str | None = _key(None, "S3-compatible endpoint (MinIO, Ceph); credentials come from the standard AWS chain.")
    storage_options: dict[str, Any] = _key({}, "Extra fsspec storage options passed through to the filesystem (e.g. anon, profile).")
    ray_address: str | None = _key(None, "Ray cluster address; unset starts a local Ray on this machine (or joins RAY_ADDRESS).")
    log_level: str = _key("INFO", "Logging level: DEBUG, INFO, WARNING or ERROR.")

    def __post_init__(self) -> None:
        _validate(self)

    def fsspec_options(self) -> dict[str, Any]:
        """fsspec storage options: storage_options plus the endpoint for s3://."""
        options = dict(self.storage_options)
        if self.endpoint_url:
            client_kwargs = dict(options.get("client_kwargs", {}))
            client_kwargs["endpoint_url"] = self.endpoint_url
            options["client_kwargs"] = client_kwargs
        return options

    def model_dict(self) -> dict[str, Any]:
        """The MODEL_KEYS subset, as recorded in spade.json."""
        return {key: getattr(self, key) for key in MODEL_KEYS}

    def replace(self, **changes: Any) -> Settings:
        return load_settings(None, {**self.to_dict(), **changes})

    def to_dict(self, redact: bool = False) -> dict[str, Any]:
        values = dataclasses.asdict(self)
        if redact:
            values["storage_options"] = {key: "***" for key in self.storage_options}
        return values


_CHOICES = {
    "preprocess": ("full", "paper"),
    "index": ("flat", "ivf"),
    "image_score": ("knn", "map", "combined"),
    "device": ("auto", "cpu", "cuda"),
    "precision": ("float32", "tf32", "bfloat16"),
    "log_level": ("DEBUG", "INFO", "WARNING", "ERROR"),
}
_POSITIVE = ("k", "kappa", "shard_size", "batch_size", "chunk_mib", "max_pixels")
PILLOW_PIXEL_LIMIT = 178_956_970
"""2 x PIL.Image.MAX_IMAGE_PIXELS: Pillow refuses larger images as decompression bombs, whatever max_pixels says."""
_SECRET_KEYS = ("storage_options",)
"""Keys whose values are never echoed in messages: they may hold credentials."""


def _validate(settings: Settings) -> None:
    for spec in dataclasses.fields(settings):
        value = getattr(settings, spec.name)
        if isinstance(value, float) and not math.isfinite(value):
            raise ConfigError(f"{spec.name}: must be a finite number, got {value}")
    for key, choices in _CHOICES.items():
        if getattr(settings, key) not in choices:
            raise ConfigError(f"{key}: {getattr(settings, key)!r} is not one of {', '.join(choices)}")
    for key in _POSITIVE:
        if getattr(settings, key) < 1:
            raise ConfigError(f"{key}: must be at least 1, got {getattr(settings, key)}")
    if settings.max_pixels > PILLOW_PIXEL_LIMIT:
        raise ConfigError(f"max_pixels: must be at most {PILLOW_PIXEL_LIMIT} (Pillow's decompression-bomb limit), got {settings.max_pixels}")
    if settings.image_size < 32:
        raise ConfigError(f"image_size: must be at least 32 pixels, got {settings.image_size}")
    if not 0 <= settings.sigma < math.inf:
        raise ConfigError(f"sigma: must be a finite number >= 0, got {settings.sigma}")
    for key in ("ivf_lists", "cpus_per_task", "gpus_per_task", "model_workers"):
        if getattr(settings, key) is not None and getattr(settings, key) < 0:
            raise ConfigError(f"{key}: must be >= 0, got {getattr(settings, key)}")
    if not 0 <= settings.calibration_fraction < 1:
        raise ConfigError(f"calibration_fraction: must be in [0, 1), got {settings.calibration_fraction}")
    if not 0 <= settings.map_top <= 1:
        raise ConfigError(f"map_top: must be a fraction in [0, 1] (0: the highest pixel), got {settings.map_top}")
    for needs_calibration in ("layer_normalise", "image_score"):
        if getattr(settings, needs_calibration) in (True, "combined") and settings.calibration_fraction == 0:
            raise ConfigError(
                f"{needs_calibration}: {getattr(settings, needs_calibration)!r} learns its scales from the calibration images; "
                "set calibration_fraction > 0"
            )
    if not 0 < settings.image_fpr < 1:
        raise ConfigError(f"image_fpr: must be in (0, 1), got {settings.image_fpr}")
    if not 0 < settings.pixel_quantile < 1:
        raise ConfigError(f"pixel_quantile: must be in (0, 1), got {settings.pixel_quantile}")


def _coerce(key: str, value: Any, annotation: Any, source: str) -> Any:
    """Check value against the field type; ints are accepted for floats."""
    allowed = typing.get_args(annotation) if isinstance(annotation, types.UnionType) else (annotation,)
    for kind in allowed:
        origin = typing.get_origin(kind) or kind
        if kind is type(None) and value is None:
            return None
        if origin is float and isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if origin is int and isinstance(value, int) and not isinstance(value, bool):
            return value
        if origin in (str, bool, dict) and isinstance(value, origin):
            return value
    names = " or ".join(getattr(kind, "__name__", str(kind)) for kind in allowed)
    shown = "(value not shown: it may hold credentials)" if key in _SECRET_KEYS else repr(value)
    raise ConfigError(f"{key} in {source}: expected {names}, got {type(value).__name__} {shown}")


def _field_types() -> dict[str, Any]:
    return typing.get_type_hints(Settings)


def load_settings(path: str | None = None, overrides: Mapping[str, Any] | None = None) -> Settings:
    """Defaults, then the YAML file at `path` (local or URI), then `overrides` (e.g. CLI flags).

    Raises ConfigError naming the key for an unknown key, a wrong type or an invalid value.
    """
    return load_request(path, overrides)[0]


def load_request(path: str | None, overrides: Mapping[str, Any] | None) -> tuple[Settings, frozenset[str]]:
    """load_settings, plus the keys the file and the overrides set explicitly."""
    values: dict[str, Any] = {}
    if path:
        values.update(_check(_read_yaml(path), path))
    values.update(_check(dict(overrides or {}), "command-line options"))
    try:
        return Settings(**values), frozenset(values)
    except ConfigError as error:
        raise ConfigError(f"{error} (from {path or 'defaults'} and command-line options)") from None


def _read_yaml(path: str) -> dict[str, Any]:
    from spade_batch import storage

    try:
        loaded = yaml.safe_load(storage.read_text(path))
    except FileNotFoundError:
        raise ConfigError(f"config file {path} does not exist") from None
    except yaml.YAMLError as error:
        # One line: PyYAML's message spans several, with a caret drawing.
        mark = getattr(error, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(error, "problem", None) or str(error).splitlines()[0]
        raise ConfigError(f"config file {path} is not valid YAML{where}: {problem}") from None
    if loaded is None:
        return {}
    if not isinstance(loaded, dict):
        raise ConfigError(f"config file {path} must be a mapping of key: value, got {type(loaded).__name__}")
    return loaded


def _check(values: dict[str, Any], source: str) -> dict[str, Any]:
    types_by_key = _field_types()
    checked = {}
    for key, value in values.items():
        if key not in types_by_key:
            raise ConfigError(f"unknown key {key!r} in {source}; known keys: {', '.join(types_by_key)}")
        checked[key] = _coerce(key, value, types_by_key[key], source)
    return checked


def describe() -> list[tuple[str, str, str, str]]:
    """(key, type, default, help) for every setting, in declaration order."""
    rows = []
    for spec in dataclasses.fields(Settings):
        kind = str(_field_types()[spec.name]).replace("typing.", "")
        default = spec.default if spec.default is not dataclasses.MISSING else spec.default_factory()  # type: ignore[misc]
        rows.append((spec.name, kind.replace("<class '", "").replace("'>", ""), json.dumps(default), spec.metadata["help"]))
    return rows
