"""A corpus of bad and odd inputs: images and names.

Images and names go through one real scoring run on the session's Ray (a local folder: a file
system allows every byte a name can hold, which S3 keys mostly share). Each gets a scored row or
an error row that names it and says what to do, and the run goes on. Manifests, model artifacts
and configs that cannot be used at all are refused before any work: tests/unit/test_bad_inputs.py.
"""

from __future__ import annotations

import io
import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from spade_batch.engine.score import run_score
from spade_batch.formats.images import decode_image
from spade_batch.formats.layout import Outputs
from spade_batch.formats.model import SpadeModel
from spade_batch.method import detector
from tests.unit.test_bad_inputs import encode, texture

MAX_PIXELS = 100_000


def frames(fmt: str) -> bytes:
    """A two-frame animation / two-page file; the first frame is texture(48, 48)."""
    first, second = Image.fromarray(texture(48, 48)), Image.fromarray(texture(48, 48, seed=9))
    buffer = io.BytesIO()
    lossless = {"lossless": True} if fmt == "WEBP" else {}  # lossy WebP would change the frame the test compares
    first.save(buffer, format=fmt, save_all=True, append_images=[second], **lossless)
    return buffer.getvalue()


def cmyk_jpeg() -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(texture(40, 56)).convert("CMYK").save(buffer, format="JPEG")
    return buffer.getvalue()


def rotated_jpeg() -> bytes:
    """A 40 x 64 (h x w) JPEG whose EXIF orientation (6) turns it to 64 x 40."""
    image = Image.fromarray(texture(40, 64))
    exif = image.getexif()
    exif[0x0112] = 6
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", exif=exif)
    return buffer.getvalue()


def mode_png(mode: str, array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).convert(mode).save(buffer, format="PNG")
    return buffer.getvalue()


GOOD = encode(texture(48, 64), "PNG")

# name -> (bytes, expected: "scored" or a phrase the error row must hold)
IMAGES: dict[str, tuple[bytes, str]] = {
    "plain.png": (GOOD, "scored"),
    "truncated.png": (GOOD[: len(GOOD) // 2], "corrupt or truncated"),
    "header-only.png": (GOOD[:40], "cannot decode"),
    "zero-bytes.png": (b"", "the file is empty (0 bytes)"),
    "text-named.png": (b"just some notes, not an image\n", "not an image file"),
    "html-error-page.jpg": (b"<html><body>503 Service Unavailable</body></html>", "not an image file"),
    "png-named.jpg": (GOOD, "scored"),
    "gif-named.png": (encode(texture(32, 32), "GIF"), "scored"),
    "cmyk.jpg": (cmyk_jpeg(), "scored"),
    "sixteen-bit.png": (encode((np.arange(48 * 48, dtype=np.uint16) * 23).reshape(48, 48), "PNG"), "scored"),
    "palette.png": (mode_png("P", texture(40, 40)), "scored"),
    "grey.png": (mode_png("L", texture(40, 40)), "scored"),
    "grey-alpha.png": (mode_png("LA", texture(40, 40)), "scored"),
    "rgba.png": (mode_png("RGBA", texture(40, 40)), "scored"),
    "one-bit.png": (mode_png("1", texture(40, 40)), "scored"),
    "float.tif": (encode(np.ones((32, 32), np.float32), "TIFF"), "unsupported image mode 'F'"),
    "animated.png": (frames("PNG"), "scored"),
    "animated-webp.webp": (frames("WEBP"), "scored"),
    "multi-page.tif": (frames("TIFF"), "scored"),
    "one-pixel.png": (encode(texture(1, 1), "PNG"), "scored"),
    "strip.png": (encode(texture(1, 3000), "PNG"), "scored"),
    "over-max-pixels.png": (encode(np.zeros((400, 400, 3), np.uint8), "PNG"), "over the max_pixels setting"),
    "exif-rotated.jpg": (rotated_jpeg(), "scored"),
    "bitmap.bmp": (encode(texture(32, 32), "BMP"), "scored"),
    "upper.PNG": (GOOD, "scored"),
    "webp.webp": (encode(texture(32, 32), "WEBP"), "scored"),
    # names
    "with space.png": (GOOD, "scored"),
    "naïve-日本.png": (GOOD, "scored"),
    "a::b.png": (GOOD, "scored"),
    "query?hash#.png": (GOOD, "scored"),
    "percent%20encoded.png": (GOOD, "scored"),
    ".hidden.png": (GOOD, "scored"),
    "dir.png/inside.png": (GOOD, "scored"),
    "same-stem.jpg": (encode(texture(48, 64), "JPEG"), "scored"),
    "same-stem.png": (GOOD, "name rejected"),  # the first of the two names in sorted order keeps the output path
    "x.jpg": (GOOD, "scored"),
    "x.png/y.png": (GOOD, "name rejected"),
    "long-" + "n" * 246 + ".png": (GOOD, "name rejected"),
    "control\x07char.png": (GOOD, "name rejected"),
}
"""Kinds of input; of names that clash, the first by id keeps the outputs (manifest.py)."""


@pytest.fixture(scope="module")
def corpus_run(tiny_model: Any, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, dict[str, Any]], Any]:
    folder = tmp_path_factory.mktemp("corpus") / "images"
    for name, (data, _) in IMAGES.items():
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_bytes(data)
    os.symlink("loop.png", folder / "loop.png")  # a symlink to itself
    os.symlink("no-such-target.png", folder / "dangling.png")
    out = folder.parent / "out"
    settings = tiny_model.settings.replace(shard_size=8, max_pixels=MAX_PIXELS)
    summary = run_score(tiny_model.path, str(folder), str(out), settings)
    tables = [pq.read_table(p) for p in sorted((out / "scores").glob("*.parquet"))]
    rows = pa.concat_tables(tables).to_pylist()
    by_name = {}
    for row in rows:
        name = os.path.relpath(row["uri"], folder)
        assert name not in by_name, f"{name} has two rows"
        by_name[name] = row
    return folder, by_name, summary


@pytest.mark.usefixtures("ray_local")
@pytest.mark.parametrize("name", sorted(IMAGES))
def test_each_image_gets_a_scored_row_or_an_error_naming_it(corpus_run: Any, name: str) -> None:
    folder, rows, _ = corpus_run
    row = rows[name]
    expected = IMAGES[name][1]
    if expected == "scored":
        assert row["error"] is None and np.isfinite(row["image_score"]), row["error"]
        with Image.open(Outputs(str(folder.parent / "out")).mask(row["id"])) as mask:
            assert (mask.height, mask.width) == (row["height"], row["width"])
    else:
        assert expected in row["error"] and row["image_score"] is None
        assert name in row["error"] or row["id"] == row["uri"], "the error names the image"
        advice = row["error"].lower()
        assert any(word in advice for word in ("re-export", "downscale", "rename", "rejected")), "the error says what to do"


@pytest.mark.usefixtures("ray_local")
@pytest.mark.parametrize("name", ["loop.png", "dangling.png"])
def test_a_symlink_loop_or_dangling_link_is_an_error_row(corpus_run: Any, name: str) -> None:
    _, rows, _ = corpus_run
    assert name in rows[name]["error"] and rows[name]["image_score"] is None


@pytest.mark.usefixtures("ray_local")
def test_the_run_counts_every_input_once(corpus_run: Any) -> None:
    _, rows, summary = corpus_run
    assert len(rows) == len(IMAGES) + 2 == summary.images
    assert summary.scored == sum(expected == "scored" for _, expected in IMAGES.values())
    assert summary.failed == summary.images - summary.scored and summary.retryable == 0


@pytest.mark.usefixtures("ray_local")
@pytest.mark.parametrize("name", ["animated.png", "animated-webp.webp", "multi-page.tif"])
def test_animated_and_multi_page_images_are_scored_on_their_first_frame(corpus_run: Any, tiny_model: Any, name: str) -> None:
    _, rows, _ = corpus_run
    model = SpadeModel.load(tiny_model.path)
    (first_frame,) = detector.score(model, [texture(48, 48)], tiny_model.settings)
    assert rows[name]["image_score"] == pytest.approx(first_frame.score, rel=1e-4)
    assert decode_image(IMAGES[name][0], name).shape == (48, 48, 3)


@pytest.mark.parametrize("where", ["model", "images"])
@pytest.mark.parametrize(("option", "name"), [({"secrt": "testing"}, "secrt"), ({"client_kwargs": {"endpont_url": "x"}}, "endpont_url")])
def test_a_misspelt_storage_option_is_named_as_one_before_any_work(
    tiny_model: Any, s3: Any, s3_bucket: str, tmp_path: Path, where: str, option: dict, name: str, capsys: pytest.CaptureFixture[str],
) -> None:
    """Whatever the run reads first on that store (the model's card, or the images' listing): exit 2, one line
    naming the option, never 'not a spade-batch model card' nor a crash."""
    from spade_batch import cli
    from spade_batch.formats import storage

    model, images = tiny_model.path, str(Path(tiny_model.train) / "test")
    if where == "model":
        model = f"{s3_bucket}/model"
        for file in Path(tiny_model.path).rglob("*"):
            if file.is_file():
                storage.put_file(str(file), f"{model}/{file.relative_to(tiny_model.path)}", s3.storage_options)
    else:
        images = f"{s3_bucket}/imgs"
        storage.write_bytes(f"{images}/a.png", GOOD, s3.storage_options)
    options = {**s3.storage_options, **option}
    if "client_kwargs" in option:
        options["client_kwargs"] = {**s3.storage_options["client_kwargs"], **option["client_kwargs"]}

    status = cli.main(["score", "--model", model, "--images", images, "--out", str(tmp_path / "out"), "--device", "cpu",
                       "--storage-options", json.dumps(options)])

    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("spade-batch score: ")]
    assert status == 2 and len(lines) == 1, lines
    assert lines[0].startswith(f"spade-batch score: error: storage option '{name}' is not one that s3:// storage takes (")
    assert "model card" not in lines[0] and not (tmp_path / "out").exists()
