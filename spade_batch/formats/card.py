"""The model card (spade.json): everything needed to reproduce and to check a model, typed.

No faiss, no torch: CPU workers read thresholds from it, and `show` reads a card without the arrays.
JSON form: ModelCard.to_dict / from_dict; cards written by earlier versions still load (their method
keys added since get the values those models were fitted with, KEYS_ADDED_LATER).
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import math
import numbers
from dataclasses import dataclass, field
from typing import Any

from spade_batch import __version__
from spade_batch.config import CALIBRATION_KEYS, MODEL_KEYS, CalibrationSettings, ConfigError, MethodSettings, Settings
from spade_batch.formats import storage
from spade_batch.formats.features import LayerShape
from spade_batch.formats.images import Preprocessing
from spade_batch.formats.layout import ModelLayout

MODEL_SCHEMA_VERSION = 2
READABLE_SCHEMA_VERSIONS = (1, 2)
CARD_NAME = ModelLayout.card
KEYS_ADDED_LATER = {"image_score": "knn", "map_top": 0.0, "layer_normalise": False, "match_radius": None, "feature_pool": 1, "layers": "1,2,3"}
"""MODEL_KEYS that older cards lack, with the value those models were fitted with (the paper's); load_card fills them in."""
CALIBRATION_KEYS_ADDED_LATER = {"image_estimator": "order_statistic", "suspects": "keep", "region_fpr": 0.0, "gate_fpr": 0.0}
"""Calibration keys that older cards' calibration_settings lack, with what those models did."""

NOT_RECORDED: Any = object()
"""A calibration setting of a card written before they were recorded: equal to no request's (check_compatible)."""


class ModelError(ValueError):
    """A model that is damaged, cut short, or mixed from two fits (a usage/input error: exit 2)."""


@dataclass(frozen=True)
class Thresholds:
    """The decisions a scoring run writes (None: unknown; the defaults are how models before these fields decided).

    Attributes:
        image: an image is anomalous when its score > image.
        pixel: a mask pixel is flagged when its score > pixel.
        min_region: flagged regions smaller than this many pixels at the working size (scaled to the
            image's size) are dropped from masks; 0 keeps every flagged pixel.
        gate_masks: an image whose score is not above the gate level shows no region but those with their own
            evidence (region).
        region: a region's own evidence level: a flagged region is shown whatever the verdict when it holds
            max(1, min_region) (scaled) pixels above region. With gate_masks, images above the gate level show
            every region; without it, every image shows only such regions. None: no such level, so gate_masks
            shows nothing on the other images, and without gate_masks every region is shown.
        gate: the gate level of gate_masks, an image score; None: the image threshold (so is a gate above it).
    """

    image: float | None = None
    pixel: float | None = None
    min_region: int = 0
    gate_masks: bool = False
    region: float | None = None
    gate: float | None = None

    @classmethod
    def of(cls, card: ModelCard, settings: Settings) -> Thresholds:
        """The settings' overrides, else the model's calibrated thresholds; the mask rules are the model's."""
        image = settings.image_threshold if settings.image_threshold is not None else card.thresholds.image
        pixel = settings.pixel_threshold if settings.pixel_threshold is not None else card.thresholds.pixel
        return dataclasses.replace(card.thresholds, image=image, pixel=pixel)

    def is_anomalous(self, image_score: float) -> bool | None:
        """The image verdict (None without an image threshold)."""
        return None if self.image is None else bool(image_score > self.image)

    def shows_every_region(self, image_score: float | None) -> bool:
        """Whether an image of this score shows every flagged region, or (False) only those with their own evidence.

        image_score None (unknown), or a gate without a level, shows every region.
        """
        if not self.gate_masks:
            return self.region is None
        levels = [level for level in (self.gate, self.image) if level is not None]
        return image_score is None or not levels or image_score > min(levels)  # flagged images always show their regions


@dataclass(frozen=True)
class Normalisation:
    """Scales learnt from the calibration images (None: not learnt).

    Attributes:
        layer_scales: per pyramid layer, the standard deviation of its pixel distances (squared feature units).
        knn: (mean, standard deviation) of the calibration images' kNN image scores.
        map: (mean, standard deviation) of their map scores (spade.map_scores).
    """

    layer_scales: list[float] | None = None
    knn: tuple[float, float] | None = None
    map: tuple[float, float] | None = None

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> Normalisation:
        return cls(
            values.get("layer_scales"),
            tuple(values["knn"]) if values.get("knn") else None,  # type: ignore[arg-type]
            tuple(values["map"]) if values.get("map") else None,  # type: ignore[arg-type]
        )

    def to_dict(self) -> dict[str, Any]:
        return {key: value for key, value in dataclasses.asdict(self).items() if value is not None}


@dataclass(frozen=True)
class CalibrationRecord:
    """How the thresholds were set (all defaults: not calibrated, or fields a card from before lacks).

    Attributes:
        count: calibration images scored.
        images: held_out or leave_one_out (config calibration_images).
        image_fpr, pixel_rule, pixel_quantile: how the thresholds were set (config calibration group).
        image_score_quantiles: {"0.5", "0.9", "0.99"} quantiles of their image scores.
        image_scores: their image scores, sorted (the run report's histogram and drift check).
        warnings: what makes the calibration weak (trainset.calibration_warnings), and an estimator's fallback.
        image_estimator: what set the image threshold (method.image_threshold; cards from before: order_statistic).
        fpr_law: (a, b) of the Beta law of the image threshold's false-positive rate on new normal images
            (image_threshold.FprLaw); empty: the order statistic's, from count and image_fpr (cards from before).
        suspects: {"id", "score"} of the calibration images scoring far above the rest (image_threshold.suspects),
            highest first; left out of the gallery and calibration when suspects_left_out.
    """

    count: int = 0
    images: str = "held_out"
    image_fpr: float | None = None
    pixel_rule: str = "quantile"
    pixel_quantile: float | None = None
    image_score_quantiles: dict[str, float] = field(default_factory=dict)
    image_scores: list[float] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    image_estimator: str = "order_statistic"
    fpr_law: list[float] = field(default_factory=list)
    suspects: list[dict[str, Any]] = field(default_factory=list)
    suspects_left_out: bool = False


@dataclass(frozen=True)
class NearDuplicates:
    """Calibration images with a gallery image much closer than the rest (method.trainset.near_duplicates).

    Attributes:
        count: calibration images whose squared global distance to their nearest other gallery image is below
            fraction x scale (the median distance to their NEAR_SCALE_RANK-th nearest; squared feature units).
        checked: calibration images measured.
        examples: up to NEAR_EXAMPLES {"id", "neighbour", "distance"}, closest first.
        neighbours: id -> the gallery images within fraction x scale of each of them: left out of its calibration
            search, as its own row is ({}: a card from before, whose calibration left out only the image's own row).
    """

    count: int = 0
    checked: int = 0
    fraction: float = 0.0
    scale: float = 0.0
    examples: list[dict[str, Any]] = field(default_factory=list)
    neighbours: dict[str, list[str]] = field(default_factory=dict)


@dataclass(frozen=True)
class TrainingRecord:
    """Which readable training images the model does not use, and why (None on a card: written before it was recorded).

    Attributes:
        left_out: {"id", "reason"} of the images kept out of the gallery and calibration for their size.
        duplicates: {"id", "kept"} of the images whose content (content_sha256) another image has: only the kept one is used.
        near_duplicates: how many calibration images have a near-copy in the gallery.
    """

    left_out: list[dict[str, str]] = field(default_factory=list)
    duplicates: list[dict[str, str]] = field(default_factory=list)
    near_duplicates: NearDuplicates = field(default_factory=NearDuplicates)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> TrainingRecord:
        return cls(**{**values, "near_duplicates": NearDuplicates(**values.get("near_duplicates", {}))})

    def unused(self) -> dict[str, str]:
        """id -> why, of every readable training image the model does not use."""
        return {**{entry["id"]: entry["reason"] for entry in self.left_out},
                **{entry["id"]: f"same content as {entry['kept']} (kept)" for entry in self.duplicates}}


@dataclass(frozen=True)
class AlignmentRecord:
    """How aligned the normal images are (method.alignment), from the calibration images' full-search matches.

    Attributes:
        layer: the layer measured (the shallowest stored), None: not measured (a model from before, or fitted with
            match_radius, whose matches are restricted).
        matches: pixel matches counted.
        within: {"4", "8", "16", "32"}: the share of them whose cell lies within that many pixels (at the working
            size, as match_radius counts them) of the matching cell's own position.
        images: calibration images the kept shares were measured on (a sample; 0: not measured, a card from before).
        kept: {"4", ...}: the share of their cells (each layer's share, averaged) whose nearest match within that
            radius is at most 10% farther than the full search's (method.alignment.kept_shares).
    """

    layer: str | None = None
    matches: int = 0
    within: dict[str, float] = field(default_factory=dict)
    images: int = 0
    kept: dict[str, float] = field(default_factory=dict)


@dataclass(frozen=True)
class VersionRecord:
    """Which version of its model a card is, and what it added (formats.versions).

    Attributes:
        number: 1 for what fit wrote (and for every model from before versions), then 2, 3, ... for each add.
        parent: the version the images were added to (None for fit's).
        images_added: how many images this version's own features/ hold: fit's every listed image, an add's new ones
            (None: written before versions were recorded).
        added_sha256: the SHA-256 of those images' (id, uri) list (manifest.pairs_sha256).
        left_out: {"id", "reason"} of the images this version does not use that were new to it or used by its parent
            (an older image leaves when the images added move the median size; a new one that duplicates another).
    """

    number: int = 1
    parent: int | None = None
    images_added: int | None = None
    added_sha256: str | None = None
    left_out: list[dict[str, str]] = field(default_factory=list)


@dataclass(frozen=True)
class LabelRecord:
    """How `spade-batch thresholds --labelled` set a version's thresholds from labelled images (a card without one:
    its thresholds come from normal images only, as calibrated).

    Attributes:
        source: the labelled data: an MVTec-layout folder or a review sheet.
        kind: "mvtec" (test/good, test/<defect> and ground-truth masks) or "sheet" (verdicts, no masks).
        normal_images, defective_images: the labelled images scored (images that failed to decode left out).
        target: the image threshold's target: "best_f1" or "recall=R".
        image, pixel: which thresholds were set from the labels (a sheet has no masks: the pixel one is the parent's).
        before, after: the parent's thresholds and this version's, {"image", "pixel"}.
        decisions: the decisions on the labelled images at each, {"before", "after"}: image FPR / TPR / F1 and SegF1.
    """

    source: str
    kind: str
    normal_images: int
    defective_images: int
    target: str
    image: bool
    pixel: bool
    before: dict[str, float | None]
    after: dict[str, float | None]
    decisions: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class ModelCard:
    """Everything needed to reproduce and to check a model; saved as spade.json (to_dict / from_dict)."""

    settings: MethodSettings  # the method group used at fit
    preprocessing: Preprocessing
    weights_sha256: str
    layers: list[LayerShape]
    global_dim: int
    train_count: int
    train_manifest_sha256: str
    thresholds: Thresholds = field(default_factory=Thresholds)
    calibration: CalibrationRecord = field(default_factory=CalibrationRecord)
    normalisation: Normalisation = field(default_factory=Normalisation)
    failed_train_images: list[dict[str, str]] = field(default_factory=list)
    version: VersionRecord = field(default_factory=VersionRecord)
    alignment: AlignmentRecord = field(default_factory=AlignmentRecord)
    calibration_settings: CalibrationSettings | None = None
    """The calibration group the model was fitted with, which add keeps (None: written before it was recorded)."""
    labelled: LabelRecord | None = None
    """How `thresholds --labelled` set this version's thresholds (None: from normal images only, as every card before)."""
    training: TrainingRecord | None = None
    """The training images left out, duplicated or near-duplicated (None: written before it was recorded)."""
    files: dict[str, dict[str, Any]] = field(default_factory=dict)
    """Every file besides the card, by name relative to the model root: {"bytes": size, "sha256": hex}; {} before checksums."""
    package_version: str = __version__
    schema_version: int = MODEL_SCHEMA_VERSION
    created: str = field(default_factory=lambda: datetime.datetime.now(datetime.timezone.utc).isoformat())

    def to_dict(self) -> dict[str, Any]:
        """The JSON form (spade.json); "labelled" only for thresholds set from labels, so other cards read as before."""
        values = {spec.name: getattr(self, spec.name) for spec in dataclasses.fields(self) if spec.name != "labelled"}
        return {
            **values,
            "settings": dataclasses.asdict(self.settings),
            "preprocessing": self.preprocessing.to_dict(),
            "layers": [dataclasses.asdict(shape) for shape in self.layers],
            "thresholds": dataclasses.asdict(self.thresholds),
            "calibration": dataclasses.asdict(self.calibration),
            "normalisation": self.normalisation.to_dict(),
            "version": dataclasses.asdict(self.version),
            "alignment": dataclasses.asdict(self.alignment),
            "calibration_settings": dataclasses.asdict(self.calibration_settings) if self.calibration_settings else {},
            "training": dataclasses.asdict(self.training) if self.training else {},
        } | ({"labelled": dataclasses.asdict(self.labelled)} if self.labelled else {})

    def to_json(self) -> str:
        """The text of spade.json. allow_nan=False: a NaN or infinite threshold is a bug to stop here, not a card no
        reader can trust."""
        return json.dumps(self.to_dict(), indent=2, allow_nan=False)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> ModelCard:
        """A card from its JSON form; method keys added since an old card was written get the values it was fitted with.

        Raises TypeError or ValueError for a field that is missing, unknown or of the wrong shape.
        """
        return cls(**{
            **values,
            "settings": MethodSettings(**{**KEYS_ADDED_LATER, **values["settings"]}),
            "preprocessing": Preprocessing.from_dict(values["preprocessing"]),
            "layers": [LayerShape(**layer) for layer in values["layers"]],
            "thresholds": Thresholds(**values.get("thresholds", {})),
            "calibration": CalibrationRecord(**values.get("calibration", {})),
            "normalisation": Normalisation.from_dict(values.get("normalisation", {})),
            "version": VersionRecord(**values.get("version", {})),
            "calibration_settings": CalibrationSettings(**{**CALIBRATION_KEYS_ADDED_LATER, **values["calibration_settings"]})
            if values.get("calibration_settings") else None,
            "labelled": LabelRecord(**values["labelled"]) if values.get("labelled") else None,
            "training": TrainingRecord.from_dict(values["training"]) if values.get("training") else None,
            "alignment": AlignmentRecord(**values.get("alignment", {})),
        })

    @property
    def layer_shapes(self) -> list[LayerShape]:
        return list(self.layers)

    def settings_for(self, settings: Settings, explicit_keys: frozenset[str] = frozenset()) -> Settings:
        """The request's settings with the model's method settings over them: the one place a model's card sets them.

        explicit_keys: the keys the request set itself; one that differs from the model's is refused (check_compatible).
        """
        self.check_compatible(settings, explicit_keys)
        return settings.replace(**dataclasses.asdict(self.settings))

    def training_settings(self, settings: Settings, explicit_keys: frozenset[str] = frozenset()) -> Settings:
        """settings_for, then the calibration group the model was fitted with (when its card records it) over the
        request's: what add trains with, so that a grown model is the model one fit of all its images gives, and what
        a scoring run records as applied."""
        settings = self.settings_for(settings, explicit_keys)
        if self.calibration_settings is None:
            return settings
        return settings.replace(**dataclasses.asdict(self.calibration_settings))

    def check_compatible(self, settings: Settings, explicit_keys: frozenset[str]) -> None:
        """Refuse a request whose method or calibration settings differ from those the model was fitted with: they
        would be recorded but never applied (nightly takes both groups, used only when it fits). A calibration key of
        a card from before calibration_settings were recorded is refused too: it cannot be told applied."""
        calibration = dataclasses.asdict(self.calibration_settings) if self.calibration_settings else dict.fromkeys(CALIBRATION_KEYS, NOT_RECORDED)
        fitted = {**dataclasses.asdict(self.settings), **calibration}
        mismatched = [
            f"{key}={getattr(settings, key)!r} (model: {'not recorded' if fitted[key] is NOT_RECORDED else repr(fitted[key])})"
            for key in sorted(explicit_keys & {*MODEL_KEYS, *CALIBRATION_KEYS})
            if getattr(settings, key) != fitted[key]
        ]
        if mismatched:
            raise ConfigError(
                "the request does not match the model: " + ", ".join(mismatched)
                + "; drop these options to use the model's values, or fit a new model with them (nightly applies method and "
                "calibration settings only when it fits a missing model)"
            )


def load_card(uri: str, options: storage.StorageOptions = None) -> ModelCard:
    """The model's spade.json only (cheap: no gallery); a card of the wrong shape is a ModelError naming what is wrong."""
    card_uri = ModelLayout(uri).card
    if not storage.exists(card_uri, options):
        raise FileNotFoundError(f"no model at {uri}: {CARD_NAME} is missing; run `spade-batch fit` first")
    try:
        values = json.loads(storage.read_text(card_uri, options))
    except ValueError as error:
        raise ModelError(f"{card_uri} is not a spade-batch model card ({error}); fit the model again") from error
    problem = card_problem(values) if isinstance(values, dict) else f"it holds a JSON {type(values).__name__}, not an object"
    if problem:
        raise ModelError(f"{card_uri} is not a valid model card: {problem}; fit the model again")
    try:
        card = ModelCard.from_dict(values)
    except (ValueError, TypeError, KeyError, AttributeError) as error:
        raise ModelError(f"{card_uri} is not a spade-batch model card ({error}); fit the model again") from error
    if card.schema_version not in READABLE_SCHEMA_VERSIONS:
        raise ValueError(
            f"model {uri} has schema version {card.schema_version}; this package reads {READABLE_SCHEMA_VERSIONS}"
        )
    return card


def _is_int(value: Any) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _threshold_problem(name: str, value: Any) -> str | None:
    if value is None:
        return None
    if not isinstance(value, numbers.Real) or isinstance(value, bool):
        return f"thresholds.{name} is {value!r} ({type(value).__name__}); a threshold is a number or null"
    if not math.isfinite(value):
        return f"thresholds.{name} is {value!r}; a threshold is a finite number or null"
    return None


def card_problem(values: dict[str, Any]) -> str | None:
    """What in a card's JSON has the wrong type or an impossible value (one thing, the first), or None.

    A card is JSON anyone can edit or damage: every field a reader uses is checked before the card is built.
    Fields a card from an earlier version lacks are not required.
    """
    required = {"settings": dict, "preprocessing": dict, "weights_sha256": str, "layers": list, "train_manifest_sha256": str}
    optional = {"thresholds": dict, "calibration": dict, "normalisation": dict, "failed_train_images": list, "files": dict,
                "package_version": str, "created": str, "version": dict, "calibration_settings": dict, "labelled": dict,
                "training": dict, "alignment": dict}
    for name, kind in {**required, **optional}.items():
        if name not in values and name in optional:
            continue
        value = values.get(name)
        if not isinstance(value, kind):
            return f"{name} is {value!r} ({type(value).__name__}), not a JSON {_JSON_NAMES[kind]}"
    for name in ("global_dim", "train_count", "schema_version"):
        value = values.get(name, MODEL_SCHEMA_VERSION if name == "schema_version" else None)
        if not _is_int(value) or value < 1:
            return f"{name} is {value!r}; it is a positive whole number"
    version = values.get("version", {}).get("number", 1)
    if not _is_int(version) or version < 1:
        return f"version.number is {version!r}; it is a positive whole number"
    for number, layer in enumerate(values["layers"]):
        fields = {"name": str, "height": int, "width": int, "channels": int}
        if not isinstance(layer, dict) or set(layer) != set(fields) or not isinstance(layer["name"], str) \
                or not all(_is_int(layer[key]) and layer[key] > 0 for key in ("height", "width", "channels")):
            return f"layers[{number}] is {layer!r}; each layer is {{name, height, width, channels}} with positive sizes"
    k = values["settings"].get("k")
    if k is not None and (not _is_int(k) or not 0 < k <= values["train_count"]):
        return f"settings.k is {k!r}, but the gallery holds {values['train_count']} images; k is a whole number from 1 to that"
    thresholds = values.get("thresholds", {})
    if not {"image", "pixel"} <= set(thresholds) <= {field.name for field in dataclasses.fields(Thresholds)}:
        return f"thresholds is {thresholds!r}; it holds 'image' and 'pixel' (and the mask rules min_region, gate_masks, region, gate)"
    for name in ("image", "pixel", "region", "gate"):
        problem = _threshold_problem(name, thresholds.get(name))
        if problem:
            return problem
    for name, entry in values.get("files", {}).items():
        if not isinstance(entry, dict) or not _is_int(entry.get("bytes")) or entry["bytes"] < 0 \
                or not isinstance(entry.get("sha256"), str) or len(entry["sha256"]) != 64:
            return f"files[{name!r}] is {entry!r}; each file is {{bytes, sha256}}"
    return None


_JSON_NAMES = {dict: "object", list: "array", str: "string"}
