"""Image decoding and preprocessing geometry: bytes -> RGB array -> the working size (numpy only).

Decoding turns any bad input (empty, undecodable, truncated, too large, odd
mode) into an :class:`ImageError` that names the source, so the pipeline can
record it and go on. The pixel count is checked from the header, before any
pixel is decoded; :func:`decode_for_model` also decodes JPEGs directly at a
reduced scale, so a huge JPEG costs memory for the working size only. Preprocessing is the one place that fixes the geometry
shared by images, ground-truth masks and anomaly maps.
"""

from __future__ import annotations

import io
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from spade_batch.formats.resize import resize_bilinear, resize_nearest_exact, resize_uint8_antialias

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
IMAGE_SUFFIXES: tuple[str, ...] = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp")

PREPROCESSING_MODES = ("full", "paper")
_SIXTEEN_BIT_MODES = ("I;16", "I;16B", "I;16L", "I;16N", "I")
_EIGHT_BIT_MODES = ("1", "L", "LA", "P", "PA", "RGB", "RGBA", "RGBa", "RGBX", "CMYK", "YCbCr", "LAB", "HSV")
_REEXPORT_ADVICE = "Remove it from the image set or re-export it as PNG/JPEG."
_EXIF_ORIENTATION = 0x0112
_TRANSPOSING_ORIENTATIONS = (5, 6, 7, 8)  # orientations that swap width and height


DEFAULT_MAX_PIXELS = 50_000_000
"""The default of the ``max_pixels`` setting."""


class ImageError(ValueError):
    """An input that cannot be used as an image; the message names the source."""


@dataclass(frozen=True)
class DecodedImage:
    """An image decoded for the model, and the size of the original.

    ``rgb`` is H' x W' x 3 uint8, possibly reduced (JPEG: by 1/2, 1/4 or 1/8)
    but at least ``min_side`` on both sides when the original was; ``height``
    and ``width`` are the original's, EXIF orientation applied: masks are
    written at that size.
    """

    rgb: np.ndarray
    height: int
    width: int


def decode_for_model(data: bytes, source: str, min_side: int, max_pixels: int = DEFAULT_MAX_PIXELS) -> DecodedImage:
    """Decode for :func:`resize_for_model` at a working size of ``min_side``, with memory for about that size.

    ``min_side`` is the shortest side preprocessing needs: ``Preprocessing.resize_to``
    covers both modes. JPEGs are decoded at the largest DCT reduction that
    keeps both sides >= ``min_side`` (Pillow ``Image.draft``); other formats
    are decoded whole. Reduced decoding differs slightly from a full decode
    followed by resizing, so fit and score must decode the same way.
    Raises ImageError as :func:`decode_image`.
    """
    return _decode(data, source, max_pixels, min_side)


def decode_image(data: bytes, source: str, max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """Decode encoded image bytes to an RGB array.

    Args:
        data: the encoded file (PNG, JPEG, BMP, TIFF, WebP, ...).
        source: where the bytes came from (path or URI); used in error messages.
        max_pixels: largest accepted width * height.

    Returns:
        H x W x 3 uint8 RGB array, EXIF orientation applied. Grayscale is
        replicated to 3 channels, alpha dropped, palettes expanded, 16-bit
        grayscale (Pillow modes ``I;16*``, and ``I`` when its values fit 16
        bits) scaled to 8 bits: ``round(v * 255 / 65535)``.

    Raises:
        ImageError: empty, undecodable, truncated, zero-size, larger than
            ``max_pixels`` or in an unsupported mode.
    """
    return _decode(data, source, max_pixels, None).rgb


def _decode(data: bytes, source: str, max_pixels: int, min_side: int | None) -> DecodedImage:
    """Decode ``data``; with ``min_side``, JPEGs at the largest reduction keeping both sides >= it."""
    if not data:
        raise ImageError(f"cannot decode {source}: the file is empty (0 bytes). {_REEXPORT_ADVICE}")
    try:
        with Image.open(io.BytesIO(data)) as im:
            _check_size(im.size, source, max_pixels)
            width, height = im.size
            if im.getexif().get(_EXIF_ORIENTATION, 1) in _TRANSPOSING_ORIENTATIONS:
                width, height = height, width
            if min_side is not None and im.format == "JPEG":
                im.draft(im.mode, (min_side, min_side))
            im.load()
            ImageOps.exif_transpose(im, in_place=True)
            decoded = DecodedImage(_to_rgb(im, source), height, width)
    except ImageError:
        raise
    except UnidentifiedImageError as e:
        raise ImageError(
            f"cannot decode {source}: not an image file (unknown or corrupt format). {_REEXPORT_ADVICE}"
        ) from e
    except Image.DecompressionBombError as e:
        raise ImageError(
            f"cannot decode {source}: image too large for Pillow ({e}). Downscale it or remove it from the image set."
        ) from e
    # Pillow's decoders signal bad data with many exception types (OSError,
    # SyntaxError, ValueError, struct.error, ...); all of them mean "bad input".
    except Exception as e:
        raise ImageError(
            f"cannot decode {source}: corrupt or truncated image data ({type(e).__name__}: {e}). {_REEXPORT_ADVICE}"
        ) from e
    return decoded


def _check_size(size: tuple[int, int], source: str, max_pixels: int) -> None:
    width, height = size
    if width <= 0 or height <= 0:
        raise ImageError(f"cannot decode {source}: the image has zero size ({width} x {height}). {_REEXPORT_ADVICE}")
    if width * height > max_pixels:
        raise ImageError(
            f"cannot decode {source}: image is {width} x {height} = {width * height} pixels, "
            f"over the max_pixels setting ({max_pixels}). Downscale it, remove it from the image set, "
            "or raise max_pixels (--max-pixels or the config file) if workers have the memory for it."
        )


def _to_rgb(im: Image.Image, source: str) -> np.ndarray:
    """Pillow image in any supported mode -> H x W x 3 uint8 RGB array."""
    if im.mode in _SIXTEEN_BIT_MODES:
        gray = _sixteen_to_eight_bit(np.asarray(im), source, im.mode)
        return np.repeat(gray[:, :, None], 3, axis=2)
    if im.mode not in _EIGHT_BIT_MODES:
        raise ImageError(
            f"cannot decode {source}: unsupported image mode {im.mode!r}. "
            "Re-export it as 8-bit RGB or grayscale PNG/JPEG."
        )
    if im.mode in ("P", "PA"):
        # Via RGBA so that palette transparency is dropped without a warning.
        im = im.convert("RGBA")
    if im.mode != "RGB":  # convert() copies even when the mode is already RGB
        im = im.convert("RGB")
    return np.array(im, dtype=np.uint8)


def _sixteen_to_eight_bit(values: np.ndarray, source: str, mode: str) -> np.ndarray:
    """H x W 16-bit values (any integer dtype) -> H x W uint8, 65535 -> 255, rounded."""
    values = values.astype(np.int64)
    if values.size and (values.min() < 0 or values.max() > 65535):
        raise ImageError(
            f"cannot decode {source}: mode {mode!r} values in [{values.min()}, {values.max()}] do not fit "
            "16 bits. Re-export it as 8- or 16-bit grayscale PNG."
        )
    return ((values * 255 + 32767) // 65535).astype(np.uint8)


@dataclass(frozen=True)
class Preprocessing:
    """How an image becomes the backbone's input.

    ``mode="full"`` resizes the whole image to ``size x size`` so every pixel is
    scored; ``mode="paper"`` resizes the shorter side to ``round(size*256/224)``
    and centre-crops ``size x size`` (the paper's protocol).
    """

    size: int = 224
    mode: str = "full"
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD

    def __post_init__(self) -> None:
        if not isinstance(self.size, int) or self.size < 32:
            raise ValueError(f"preprocessing size must be an integer >= 32 pixels, got {self.size!r}")
        if self.mode not in PREPROCESSING_MODES:
            raise ValueError(f"preprocessing mode must be one of {PREPROCESSING_MODES}, got {self.mode!r}")
        if len(self.mean) != 3 or len(self.std) != 3 or min(self.std) <= 0:
            raise ValueError(
                f"preprocessing mean and std need 3 values each and std > 0, got mean={self.mean!r} std={self.std!r}"
            )

    def to_dict(self) -> dict:
        d = asdict(self)
        d["mean"], d["std"] = list(self.mean), list(self.std)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "Preprocessing":
        unknown = set(d) - {"size", "mode", "mean", "std"}
        if unknown:
            raise ValueError(f"unknown preprocessing keys {sorted(unknown)}; expected size, mode, mean, std")
        kwargs = dict(d)
        for key in ("mean", "std"):
            if key in kwargs:
                kwargs[key] = tuple(float(v) for v in kwargs[key])
        return cls(**kwargs)

    @property
    def resize_to(self) -> int:
        """Shorter-side length before the centre crop in ``paper`` mode, pixels."""
        return round(self.size * 256 / 224)


def _resized_size(height: int, width: int, spec: Preprocessing) -> tuple[int, int]:
    """The size before the centre crop: size x size (full), or shorter side resize_to (paper, as torchvision)."""
    if spec.mode == "full":
        return spec.size, spec.size
    short, long = sorted((height, width))
    new_long = int(spec.resize_to * long / short)
    return (spec.resize_to, new_long) if height <= width else (new_long, spec.resize_to)


def _centre_crop(image: np.ndarray, size: int) -> np.ndarray:
    """H x W (x C) with both sides >= size -> size x size (x C), offsets rounded as torchvision's center_crop."""
    top, left = round((image.shape[0] - size) / 2.0), round((image.shape[1] - size) / 2.0)
    return image[top : top + size, left : left + size]


def resize_for_model(image: np.ndarray, spec: Preprocessing) -> np.ndarray:
    """H x W x 3 uint8 RGB -> size x size x 3 uint8: the geometry the backbone sees, before normalising.

    Bilinear resize with antialias on the uint8 image, bit-identical to torchvision's
    ``Resize(antialias=True)`` on a uint8 tensor, and the centre crop in paper mode. This is what a
    decode worker sends on.
    """
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise ValueError(f"preprocess expects an H x W x 3 uint8 array, got shape {image.shape} {image.dtype}")
    resized = resize_uint8_antialias(image, *_resized_size(image.shape[0], image.shape[1], spec))
    return np.ascontiguousarray(_centre_crop(resized, spec.size))


def cropped_share(height: int, width: int, spec: Preprocessing) -> float:
    """Share of a height x width image's area that preprocessing never shows the backbone, in [0, 1).

    ``full`` keeps every pixel (0). ``paper`` keeps the centre size x size of the image resized to
    (h', w') (shorter side ``resize_to``), i.e. size^2 / (h' w') of the area: a square image loses
    1 - (224/256)^2 = 23%, a non-square one more (its long sides' ends too).
    """
    if height <= 0 or width <= 0:
        raise ValueError(f"image size must be positive, got {height} x {width}")
    if spec.mode == "full":
        return 0.0
    resized_height, resized_width = _resized_size(height, width, spec)
    return 1.0 - spec.size * spec.size / (resized_height * resized_width)


def crop_summary(sizes: Iterable[tuple[int, int]], spec: Preprocessing) -> dict[str, Any] | None:
    """What ``paper`` preprocessing drops of these (height, width) images, with a warning line; None for ``full`` or no image.

    {"images", "mean_dropped_share", "min_dropped_share", "max_dropped_share", "square_dropped_share",
    "images_losing_more_than_square", "message"}: the shares are of each image's own area.
    """
    if spec.mode == "full":
        return None
    shares = np.array([cropped_share(h, w, spec) for h, w in sizes], dtype=np.float64)
    if shares.size == 0:
        return None
    square = cropped_share(spec.resize_to, spec.resize_to, spec)
    more = int(np.sum(shares > square + 1e-9))
    return {
        "images": int(shares.size),
        "mean_dropped_share": float(shares.mean()),
        "min_dropped_share": float(shares.min()),
        "max_dropped_share": float(shares.max()),
        "square_dropped_share": square,
        "images_losing_more_than_square": more,
        "message": (
            f"paper preprocessing crops {shares.mean():.0%} of each image's area on average over {shares.size} images "
            f"(from {shares.min():.0%} to {shares.max():.0%}; every image loses {square:.0%} to the {spec.size}/{spec.resize_to} "
            f"centre crop, and {more} non-square ones more); defects there are never scored; use preprocess: full"
        ),
    }


def preprocess_mask(mask: np.ndarray, spec: Preprocessing) -> np.ndarray:
    """H x W ground-truth mask (bool or integer, > 0 = defect) -> size x size bool.

    Same geometry as :func:`resize_for_model`, nearest neighbour sampled at pixel centres
    (torchvision ``NEAREST_EXACT``, as PIL's nearest).
    """
    if mask.ndim != 2:
        raise ValueError(f"preprocess_mask expects an H x W mask, got shape {mask.shape}")
    resized = resize_nearest_exact(mask > 0, *_resized_size(mask.shape[0], mask.shape[1], spec))
    return _centre_crop(resized, spec.size)


def resize_map(anomaly_map: np.ndarray, height: int, width: int) -> np.ndarray:
    """size x size float32 anomaly map -> height x width float32.

    Bilinear, ``align_corners=False`` (pixel centres aligned), no antialias.
    """
    if anomaly_map.ndim != 2:
        raise ValueError(f"resize_map expects a 2-D map, got shape {anomaly_map.shape}")
    if height <= 0 or width <= 0:
        raise ValueError(f"resize_map target size must be positive, got {height} x {width}")
    return resize_bilinear(anomaly_map, height, width)
