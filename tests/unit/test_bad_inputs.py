"""Bad and odd inputs refused before any work: manifests, model artifacts and configs that cannot be used
at all are refused with an error naming the file (and the key, for configs).

Images and names go through a real scoring run in tests/integration/engine/test_bad_inputs.py.
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from spade_batch.config import ConfigError, load_settings
from spade_batch.formats.model import SpadeModel, load_card


def encode(array: np.ndarray, fmt: str, **params: Any) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format=fmt, **params)
    return buffer.getvalue()


def texture(height: int, width: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (height, width, 3), np.uint8)


GOOD = encode(texture(48, 64), "PNG")


# ---------------------------------------------------------------- manifests


@pytest.mark.parametrize(
    ("file", "content", "message"),
    [
        ("empty.txt", "", "no image"),
        ("comments-only.txt", "# nothing\n\n", "no image"),
        ("no-uri-column.csv", "path\na.png\n", "uri"),
        ("missing.txt", None, "missing.txt"),
    ],
)
def test_a_manifest_that_lists_nothing_usable_is_refused_naming_it(tmp_path: Path, file: str, content: str | None, message: str) -> None:
    from spade_batch.formats.manifest import build_manifest

    if content is not None:
        (tmp_path / file).write_text(content)
    with pytest.raises((ValueError, FileNotFoundError), match=message) as error:
        build_manifest(str(tmp_path / file))
    assert file in str(error.value)


def test_manifest_entries_are_taken_literally_and_relative_to_the_manifest(tmp_path: Path) -> None:
    from spade_batch.formats.manifest import build_manifest

    (tmp_path / "imgs").mkdir()
    (tmp_path / "imgs" / "a.png").write_bytes(GOOD)
    (tmp_path / "imgs" / "list.txt").write_text("a.png\n./a.png\n# a comment\n\nmissing.png\n")
    manifest = build_manifest(str(tmp_path / "imgs" / "list.txt"))
    assert manifest.ids == ("a.png", "missing.png")  # listed twice is one image; a missing one gets its error row when read


# ---------------------------------------------------------------- model artifacts


@pytest.mark.parametrize(
    ("file", "damage"),
    [
        ("spade.json", b"{not json"),
        ("spade.json", b'{"schema_version": 2, "unknown_field": 1}'),
        ("global.faiss", b"\x00" * 16),
        ("train_ids.json", b"[1, 2"),
        ("centre.npz", b"PK\x03\x04 broken zip"),
        ("pyramid/layer1.npy", None),  # truncated
    ],
)
def test_a_damaged_model_file_is_named_in_the_error(tiny_model: Any, tmp_path: Path, file: str, damage: bytes | None) -> None:
    import shutil

    model = tmp_path / "model"
    shutil.copytree(tiny_model.path, model)
    path = model / file
    path.write_bytes(damage if damage is not None else path.read_bytes()[:-64])
    with pytest.raises(ValueError, match="fit the model again") as error:
        SpadeModel.load(str(model), card=None if file == "spade.json" else load_card(str(model)))
    assert f"{model}/{file}" in str(error.value)


# ---------------------------------------------------------------- configs


@pytest.mark.parametrize(
    ("text", "key"),
    [
        ("k: [3\n", None),  # bad YAML
        ("- k: 3\n", None),  # not a mapping
        ("kk: 3\n", "kk"),  # unknown key
        ("sigma: .nan\n", "sigma"),
        ("image_fpr: .inf\n", "image_fpr"),
        ("k: three\n", "k"),
        ("k: -1\n", "k"),
        ("calibration_fraction: 1.5\n", "calibration_fraction"),
        ("max_pixels: 0\n", "max_pixels"),
        ("save_maps: maybe\n", "save_maps"),
    ],
)
def test_a_bad_config_is_refused_naming_the_file_and_key(tmp_path: Path, text: str, key: str | None) -> None:
    path = tmp_path / "settings.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError) as error:
        load_settings(str(path))
    message = str(error.value)
    assert key is None or key in message
    assert key is not None or "settings.yaml" in message
