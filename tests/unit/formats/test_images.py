import io
import struct
import zlib

import numpy as np
import pytest
from PIL import Image
from torchvision import transforms

from spade_batch.config import PILLOW_PIXEL_LIMIT
from spade_batch.formats.images import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    ImageError,
    Preprocessing,
    crop_summary,
    cropped_share,
    decode_for_model,
    decode_image,
    preprocess_mask,
    resize_for_model,
    resize_map,
)
from tests.unit.torchvision_reference import torchvision_geometry

RNG = np.random.default_rng(0)


def encode(im: Image.Image, fmt: str = "PNG", **kwargs) -> bytes:
    buf = io.BytesIO()
    im.save(buf, format=fmt, **kwargs)
    return buf.getvalue()


def png_header_only(width: int, height: int) -> bytes:
    """A PNG that declares width x height 8-bit grey but holds no pixel data."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b"")


# --- decode_image ------------------------------------------------------------


def test_rgb_png_round_trips_exactly():
    rgb = RNG.integers(0, 256, (20, 30, 3), dtype=np.uint8)
    out = decode_image(encode(Image.fromarray(rgb)), "rgb.png")
    assert out.dtype == np.uint8 and out.shape == (20, 30, 3)
    np.testing.assert_array_equal(out, rgb)


def test_grayscale_is_replicated_to_three_channels():
    gray = RNG.integers(0, 256, (17, 9), dtype=np.uint8)
    out = decode_image(encode(Image.fromarray(gray)), "gray.png")
    assert out.shape == (17, 9, 3)
    for c in range(3):
        np.testing.assert_array_equal(out[:, :, c], gray)


def test_rgba_drops_alpha_and_keeps_colour():
    rgba = RNG.integers(0, 256, (12, 14, 4), dtype=np.uint8)
    rgba[:, :, 3] = 0  # fully transparent pixels must keep their colour, not turn black
    out = decode_image(encode(Image.fromarray(rgba)), "rgba.png")
    np.testing.assert_array_equal(out, rgba[:, :, :3])


def test_palette_image_is_expanded_to_rgb():
    palette = [255, 0, 0, 0, 255, 0, 0, 0, 255] + [0] * (256 * 3 - 9)
    indices = np.array([[0, 1, 2], [2, 1, 0]], dtype=np.uint8)
    im = Image.fromarray(indices, mode="P")
    im.putpalette(palette)
    out = decode_image(encode(im, transparency=1), "palette.png")
    colours = np.array(palette[:9], dtype=np.uint8).reshape(3, 3)
    np.testing.assert_array_equal(out, colours[indices])


def test_16_bit_grayscale_png_is_scaled_to_8_bit():
    values = np.array([[0, 65535, 32896, 257, 128, 129]], dtype=np.uint16)
    data = encode(Image.fromarray(values))
    assert Image.open(io.BytesIO(data)).mode == "I;16"
    out = decode_image(data, "deep.png")
    np.testing.assert_array_equal(out[0, :, 0], [0, 255, 128, 1, 0, 1])
    np.testing.assert_array_equal(out[:, :, 0], out[:, :, 2])


def test_32_bit_integer_tiff_with_16_bit_values_is_scaled_and_wider_values_rejected():
    values = np.array([[0, 65535, 32896]], dtype=np.int32)
    out = decode_image(encode(Image.fromarray(values), "TIFF"), "int.tif")
    np.testing.assert_array_equal(out[0, :, 1], [0, 255, 128])
    with pytest.raises(ImageError, match=r"wide\.tif.*16 bits"):
        decode_image(encode(Image.fromarray(values * 4), "TIFF"), "wide.tif")


def test_float_image_is_an_unsupported_mode():
    data = encode(Image.fromarray(np.zeros((4, 4), np.float32)), "TIFF")
    with pytest.raises(ImageError, match=r"float\.tif.*unsupported image mode 'F'"):
        decode_image(data, "float.tif")


@pytest.mark.parametrize(
    "orientation, corner",
    [(6, (0, -1)), (8, (-1, 0))],  # 6: displayed rotated 90 deg clockwise, 8: counter-clockwise
)
def test_exif_orientation_is_applied(orientation, corner):
    stored = np.full((24, 40, 3), 128, dtype=np.uint8)  # H=24, W=40 as stored
    stored[:8, :8] = (255, 0, 0)  # mark the stored top-left corner
    exif = Image.Exif()
    exif[0x0112] = orientation
    out = decode_image(encode(Image.fromarray(stored), "JPEG", exif=exif, quality=95), "phone.jpg")
    assert out.shape == (40, 24, 3)
    row, col = corner
    rows = slice(0, 6) if row == 0 else slice(-6, None)
    cols = slice(0, 6) if col == 0 else slice(-6, None)
    assert out[rows, cols, 0].min() > 200 and out[rows, cols, 1].max() < 60
    # The opposite corner is the grey background.
    opposite = out[slice(-6, None) if row == 0 else slice(0, 6), slice(-6, None) if col == 0 else slice(0, 6)]
    assert np.abs(opposite.astype(int) - 128).max() < 20


def test_corrupt_truncated_and_empty_inputs_raise_image_error_naming_the_source():
    png = encode(Image.fromarray(RNG.integers(0, 256, (64, 64, 3), dtype=np.uint8)))
    cases = {
        "s3://bucket/garbage.png": b"this is not an image",
        "s3://bucket/truncated.png": png[: len(png) // 2],
        "s3://bucket/empty.png": b"",
    }
    for source, data in cases.items():
        with pytest.raises(ImageError) as err:
            decode_image(data, source)
        assert source in str(err.value)
        assert "Remove it from the image set" in str(err.value)


def test_zero_size_image_is_rejected():
    with pytest.raises(ImageError, match="zero.png"):
        decode_image(png_header_only(0, 10), "zero.png")


def test_image_over_max_pixels_is_rejected_before_decoding():
    data = encode(Image.fromarray(np.zeros((50, 40, 3), np.uint8)))
    assert decode_image(data, "ok.png", max_pixels=2000).shape == (50, 40, 3)
    with pytest.raises(ImageError, match=r"big\.png.*50 = 2000 pixels, over the max_pixels setting \(1999\).*raise max_pixels"):
        decode_image(data, "big.png", max_pixels=1999)
    with pytest.raises(ImageError, match="over the max_pixels setting"):
        decode_for_model(data, "big.png", 32, max_pixels=1999)


def test_pillow_limit_in_config_is_pillows():
    assert PILLOW_PIXEL_LIMIT == 2 * Image.MAX_IMAGE_PIXELS


def test_jpeg_is_decoded_reduced_but_reports_its_original_size():
    rgb = np.tile(np.linspace(0, 255, 1000, dtype=np.uint8)[None, :, None], (800, 1, 3))
    decoded = decode_for_model(encode(Image.fromarray(rgb), "JPEG", quality=95), "wide.jpg", min_side=224)
    assert (decoded.height, decoded.width) == (800, 1000)
    assert decoded.rgb.shape == (400, 500, 3)  # 1/2: 1/4 would make the short side 200 < 224
    full = decode_image(encode(Image.fromarray(rgb), "JPEG", quality=95), "wide.jpg")
    assert np.abs(full[::2, ::2].astype(int) - decoded.rgb.astype(int)).mean() < 4


def test_reduced_decode_reports_the_original_size_after_exif_rotation():
    im = Image.fromarray(np.zeros((300, 1200, 3), np.uint8))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90: the displayed image is 1200 high, 300 wide
    decoded = decode_for_model(encode(im, "JPEG", exif=exif), "rotated.jpg", min_side=64)
    assert (decoded.height, decoded.width) == (1200, 300)
    assert decoded.rgb.shape == (300, 75, 3)  # stored 300 x 1200 reduced by 1/4, then rotated


def test_png_is_decoded_whole_for_the_model():
    rgb = RNG.integers(0, 256, (40, 50, 3), dtype=np.uint8)
    decoded = decode_for_model(encode(Image.fromarray(rgb)), "x.png", min_side=32)
    assert (decoded.height, decoded.width) == (40, 50)
    np.testing.assert_array_equal(decoded.rgb, rgb)


def test_decompression_bomb_header_is_an_image_error():
    # Declares 20000 x 20000 pixels: Pillow itself refuses it as a decompression bomb.
    with pytest.raises(ImageError, match=r"bomb\.png.*too large"):
        decode_image(png_header_only(20000, 20000), "bomb.png", max_pixels=10**10)


# --- Preprocessing -----------------------------------------------------------


def test_preprocessing_dict_round_trip_and_validation():
    spec = Preprocessing(size=64, mode="paper")
    d = spec.to_dict()
    assert d == {"size": 64, "mode": "paper", "mean": list(IMAGENET_MEAN), "std": list(IMAGENET_STD)}
    assert Preprocessing.from_dict(d) == spec
    assert Preprocessing.from_dict({}) == Preprocessing()
    with pytest.raises(ValueError, match="size must be an integer >= 32"):
        Preprocessing.from_dict({"size": 16})
    with pytest.raises(ValueError, match="mode must be one of"):
        Preprocessing.from_dict({"mode": "crop"})
    with pytest.raises(ValueError, match="unknown preprocessing keys"):
        Preprocessing.from_dict({"sizes": 64})


def smooth_image(height: int, width: int) -> np.ndarray:
    """H x W x 3 uint8 with smooth content, where resampling methods differ by at most one grey level."""
    return np.clip(
        128 + 60 * np.sin(np.arange(height)[:, None, None] / 7 + np.arange(width)[None, :, None] / 11 + np.arange(3)), 0, 255
    ).astype(np.uint8)


@pytest.mark.parametrize("mode", ["full", "paper"])
@pytest.mark.parametrize("height, width", [(70, 110), (110, 70), (64, 64), (20, 31), (517, 389)])
def test_resize_for_model_is_torchvisions_resize_bit_for_bit(mode, height, width):
    image = RNG.integers(0, 256, (height, width, 3), dtype=np.uint8)
    spec = Preprocessing(size=32, mode=mode)
    out = resize_for_model(image, spec)
    assert out.shape == (32, 32, 3) and out.dtype == np.uint8 and out.flags.c_contiguous
    np.testing.assert_array_equal(out, torchvision_geometry(image, spec))


@pytest.mark.parametrize("mode", ["full", "paper"])
def test_resize_for_model_is_within_one_level_of_torchvisions_pil_pipeline(mode):
    image = smooth_image(70, 110)
    spec = Preprocessing(size=32, mode=mode)
    size = (spec.size, spec.size) if mode == "full" else spec.resize_to
    reference = transforms.CenterCrop(spec.size)(transforms.Resize(size)(Image.fromarray(image)))
    difference = resize_for_model(image, spec).astype(int) - np.asarray(reference, dtype=int)
    assert np.abs(difference).max() <= 1


def test_paper_mode_crops_the_sides_of_a_wide_image_and_full_mode_keeps_them():
    # H=60, W=100; paper at 32: shorter side -> 37, width -> 61, crop 32 starting at column 14.
    image = np.full((60, 100, 3), 128, np.uint8)
    image[:, :12] = (255, 0, 0)  # left 12% of the width
    red = lambda a: (a[..., 0] > 200) & (a[..., 1] < 60)  # noqa: E731 - strongly red pixels
    full = red(resize_for_model(image, Preprocessing(size=32, mode="full")))
    paper = red(resize_for_model(image, Preprocessing(size=32, mode="paper")))
    assert not paper.any()
    assert full[:, :3].all() and not full[:, 5:].any()


@pytest.mark.parametrize("height, width", [(60, 100), (100, 60), (37, 37), (80, 80), (61, 97), (333, 517), (40, 400)])
def test_cropped_share_is_the_area_torchvisions_resize_and_centre_crop_leave_out(height, width):
    spec = Preprocessing(size=32, mode="paper")
    # Direct: an image whose pixels hold their own row and column, through torchvision's paper transform (nearest).
    rows, cols = np.meshgrid(np.arange(height), np.arange(width), indexing="ij")
    index = Image.fromarray(np.stack([rows % 256, cols % 256, (rows // 256) * 16 + cols // 256], axis=2).astype(np.uint8))
    resized = transforms.Resize(spec.resize_to, interpolation=transforms.InterpolationMode.NEAREST)(index)
    kept = np.asarray(transforms.CenterCrop(spec.size)(resized)).astype(int)
    seen_rows = kept[..., 0] + 256 * (kept[..., 2] // 16)
    seen_cols = kept[..., 1] + 256 * (kept[..., 2] % 16)
    # The crop keeps size/h' of the rows and size/w' of the columns of the resized image (h' x w', from torchvision).
    resized_width, resized_height = resized.size
    exact = 1 - spec.size**2 / (resized_height * resized_width)
    assert cropped_share(height, width, spec) == pytest.approx(exact, abs=1e-12)
    # ... which is the share of the original's rows x columns the crop spans, to a pixel at either scale per side.
    spanned = (np.ptp(seen_rows) + 1) * (np.ptp(seen_cols) + 1) / (height * width)
    slack = 1 / resized_height + 1 / height + 1 / resized_width + 1 / width
    assert abs((1 - spanned) - cropped_share(height, width, spec)) <= slack
    assert cropped_share(height, width, Preprocessing(size=32, mode="full")) == 0.0


def test_square_images_lose_the_border_and_long_ones_more():
    spec = Preprocessing(mode="paper")  # 224 of 256
    assert cropped_share(900, 900, spec) == pytest.approx(1 - (224 / 256) ** 2)
    assert cropped_share(900, 1800, spec) == pytest.approx(1 - 224 * 224 / (256 * 512))
    summary = crop_summary([(900, 900), (900, 1800), (600, 400)], spec)
    shares = [cropped_share(h, w, spec) for h, w in [(900, 900), (900, 1800), (600, 400)]]
    assert summary["images"] == 3 and summary["images_losing_more_than_square"] == 2
    assert summary["mean_dropped_share"] == pytest.approx(np.mean(shares))
    assert summary["max_dropped_share"] == pytest.approx(max(shares)) and summary["min_dropped_share"] == pytest.approx(min(shares))
    assert "use preprocess: full" in summary["message"] and "3 images" in summary["message"] and "2 non-square" in summary["message"]
    assert crop_summary([(900, 1800)], Preprocessing(mode="full")) is None and crop_summary([], spec) is None
    with pytest.raises(ValueError, match="positive"):
        cropped_share(0, 10, spec)


def nearest_exact_indices(n_in: int, n_out: int) -> np.ndarray:
    return np.minimum(np.floor((np.arange(n_out) + 0.5) * n_in / n_out).astype(int), n_in - 1)


@pytest.mark.parametrize("mode", ["full", "paper"])
def test_preprocess_mask_geometry(mode):
    height, width, size = 60, 100, 32
    mask = np.zeros((height, width), np.uint8)
    mask[10:25, 30:80] = 255
    mask[50:, 95:] = 1
    out = preprocess_mask(mask, Preprocessing(size=size, mode=mode))
    assert out.shape == (size, size) and out.dtype == bool
    if mode == "full":
        rows, cols = nearest_exact_indices(height, size), nearest_exact_indices(width, size)
    else:  # resize to 37 x 61, then crop rows 2..33 and columns 14..45
        rows = nearest_exact_indices(height, 37)[2 : 2 + size]
        cols = nearest_exact_indices(width, 61)[14 : 14 + size]
    np.testing.assert_array_equal(out, mask[np.ix_(rows, cols)] > 0)


@pytest.mark.parametrize("mode", ["full", "paper"])
@pytest.mark.parametrize("height, width", [(48, 80), (61, 97), (120, 70), (333, 517)])
def test_preprocess_mask_is_torchvisions_nearest_exact_and_lines_up_with_the_image(mode, height, width):
    mask = np.zeros((height, width), bool)
    mask[height // 4 : height * 5 // 6, width // 4 : width * 2 // 3] = True
    spec = Preprocessing(size=32, mode=mode)
    out = preprocess_mask(mask, spec)
    np.testing.assert_array_equal(out, torchvision_geometry(mask.astype(np.uint8), spec, nearest=True) > 0)
    image = np.repeat(np.where(mask, 255, 0).astype(np.uint8)[:, :, None], 3, axis=2)
    np.testing.assert_array_equal(out, resize_for_model(image, spec)[..., 0] > 127)


# --- resize_map ---------------------------------------------------------------


def bilinear_reference(a: np.ndarray, height: int, width: int) -> np.ndarray:
    """Brute-force bilinear, align_corners=False: sample at (i + 0.5) * scale - 0.5, edges clamped."""

    def axis(n_in: int, n_out: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        src = np.clip((np.arange(n_out) + 0.5) * n_in / n_out - 0.5, 0, n_in - 1)
        lo = np.floor(src).astype(int)
        hi = np.minimum(lo + 1, n_in - 1)
        return lo, hi, src - lo

    r0, r1, fr = axis(a.shape[0], height)
    c0, c1, fc = axis(a.shape[1], width)
    top = a[r0][:, c0] * (1 - fc) + a[r0][:, c1] * fc
    bottom = a[r1][:, c0] * (1 - fc) + a[r1][:, c1] * fc
    return top * (1 - fr[:, None]) + bottom * fr[:, None]


@pytest.mark.parametrize("height, width", [(50, 75), (13, 21), (32, 32)])
def test_resize_map_is_bilinear_with_half_pixel_centres(height, width):
    anomaly_map = RNG.random((32, 32)).astype(np.float32)
    out = resize_map(anomaly_map, height, width)
    assert out.shape == (height, width) and out.dtype == np.float32
    np.testing.assert_allclose(out, bilinear_reference(anomaly_map.astype(np.float64), height, width), atol=1e-5)
