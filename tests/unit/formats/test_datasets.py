import os

import numpy as np
import pytest
from PIL import Image
from scipy.ndimage import binary_dilation

from spade_batch.formats.datasets import (
    DEFECT_TYPES,
    Sample,
    list_categories,
    make_aligned_data,
    make_demo_data,
    read_mask,
    read_mvtec_category,
)
from spade_batch.formats.images import ImageError

SMALL = dict(n_train=5, n_test_good=3, n_test_per_defect=4, min_size=48, max_size=96, seed=7)
MAGNETIC_TILE = "/work/shared/data/magnetic_tile"


@pytest.fixture(scope="module")
def demo_root(tmp_path_factory) -> str:
    return make_demo_data(str(tmp_path_factory.mktemp("demo")), category="widgets", **SMALL)


def all_files(root: str) -> dict[str, bytes]:
    files = {}
    for folder, _, names in os.walk(root):
        for name in names:
            path = os.path.join(folder, name)
            with open(path, "rb") as f:
                files[os.path.relpath(path, root)] = f.read()
    return files


def load(path: str) -> np.ndarray:
    with Image.open(path) as im:
        return np.asarray(im)


# --- make_demo_data ------------------------------------------------------------


def test_demo_data_is_byte_identical_for_the_same_arguments(demo_root, tmp_path):
    again = make_demo_data(str(tmp_path), category="widgets", **SMALL)
    assert all_files(again) == all_files(demo_root)
    other_seed = make_demo_data(str(tmp_path / "other"), category="widgets", **{**SMALL, "seed": 8})
    assert all_files(other_seed).keys() == all_files(demo_root).keys()
    assert all_files(other_seed) != all_files(demo_root)


def test_demo_data_layout_and_counts(demo_root):
    assert demo_root.endswith("widgets")
    assert sorted(os.listdir(demo_root)) == ["ground_truth", "test", "train"]
    assert sorted(os.listdir(os.path.join(demo_root, "train", "good"))) == [f"{i:03d}.png" for i in range(5)]
    assert sorted(os.listdir(os.path.join(demo_root, "test"))) == sorted(["good", *DEFECT_TYPES])
    assert len(os.listdir(os.path.join(demo_root, "test", "good"))) == 3
    assert sorted(os.listdir(os.path.join(demo_root, "ground_truth"))) == sorted(DEFECT_TYPES)  # no masks for good
    for defect in DEFECT_TYPES:
        assert sorted(os.listdir(os.path.join(demo_root, "test", defect))) == [f"{i:03d}.png" for i in range(4)]
        masks = sorted(os.listdir(os.path.join(demo_root, "ground_truth", defect)))
        assert masks == [f"{i:03d}_mask.png" for i in range(4)]


def test_demo_images_are_rgb_of_varying_sizes_within_bounds(demo_root):
    category = read_mvtec_category(demo_root)
    shapes = [load(s.path).shape for s in category.train + category.test]
    assert all(len(shape) == 3 and shape[2] == 3 for shape in shapes)
    heights, widths = {s[0] for s in shapes}, {s[1] for s in shapes}
    assert min(heights) >= 48 and max(heights) <= 96 and min(widths) >= 48 and max(widths) <= 96
    assert len(heights) > 5 and len(widths) > 5
    assert any(h != w for h, w, _ in shapes)


def test_every_defect_image_has_a_visible_exact_mask(demo_root):
    category = read_mvtec_category(demo_root)
    for sample in category.test:
        if not sample.is_anomalous:
            assert sample.mask_path is None
            continue
        image = load(sample.path).astype(float).mean(axis=2)
        with Image.open(sample.mask_path) as im:
            assert im.mode == "L"
            mask_values = np.asarray(im)
        assert mask_values.shape == image.shape
        assert set(np.unique(mask_values)) == {0, 255}
        mask = mask_values > 0
        # Compare with the surrounding texture: a ring 2..6 px around the defect.
        ring = binary_dilation(mask, iterations=6) & ~binary_dilation(mask, iterations=2)
        reference = np.median(image[ring])
        inside = np.abs(image[mask] - reference).mean()
        around = np.abs(image[ring] - reference).mean()
        assert inside > 2 * around, (sample.path, inside, around)


def test_default_demo_set_has_the_documented_counts(tmp_path):
    category = read_mvtec_category(make_demo_data(str(tmp_path)))
    assert category.name == "tiles"
    assert len(category.train) == 40
    assert [s.label for s in category.test].count("good") == 10
    assert all([s.label for s in category.test].count(d) == 6 for d in DEFECT_TYPES)
    sizes = {load(s.path).shape[:2] for s in category.train}
    assert all(96 <= h <= 160 and 96 <= w <= 160 for h, w in sizes)


def test_make_demo_data_refuses_a_non_empty_target_and_bad_sizes(demo_root):
    with pytest.raises(FileExistsError, match="widgets"):
        make_demo_data(os.path.dirname(demo_root), category="widgets", **SMALL)
    with pytest.raises(ValueError, match="min_size <= max_size"):
        make_demo_data(os.path.dirname(demo_root), category="other", min_size=100, max_size=50)


# --- make_aligned_data -----------------------------------------------------------

ALIGNED = dict(n_train=6, n_test_good=2, n_test_per_defect=3, size=64, max_shift=2.0, max_rotation=3.0, seed=3)


@pytest.fixture(scope="module")
def aligned_root(tmp_path_factory) -> str:
    return make_aligned_data(str(tmp_path_factory.mktemp("aligned")), **ALIGNED)


def test_aligned_data_is_deterministic_and_laid_out_like_mvtec(aligned_root, tmp_path):
    assert all_files(make_aligned_data(str(tmp_path), **ALIGNED)) == all_files(aligned_root)
    assert all_files(make_aligned_data(str(tmp_path / "other"), **{**ALIGNED, "seed": 4})) != all_files(aligned_root)
    category = read_mvtec_category(aligned_root)
    assert category.name == "parts" and len(category.train) == 6
    assert [s.label for s in category.test] == ["crack"] * 3 + ["good"] * 2 + ["scratch"] * 3 + ["spot"] * 3
    assert {load(s.path).shape for s in category.train + category.test} == {(64, 64, 3)}


def part_mask(image: np.ndarray) -> np.ndarray:
    """The bright part against the dark background: H x W bool."""
    return image.astype(float).mean(axis=2) > 90


def test_aligned_parts_sit_at_the_same_place_up_to_the_jitter(aligned_root):
    category = read_mvtec_category(aligned_root)
    parts = [part_mask(load(s.path)) for s in category.train + category.test if not s.is_anomalous]
    for part in parts:
        ys, xs = np.nonzero(part)
        # The flange is symmetric but for its notch (on +x): the centroid is within the shift (2 px) of the
        # image centre, plus a little for the notch and the rotation.
        assert abs(ys.mean() - 31.5) <= 2.5 and abs(xs.mean() - 31.5) <= 3.5
    # The shift that best lays each part over the first (IoU, searched over +-8 px) is within the jitter:
    # at most 2 x 2 px apart, plus 1 for rotation and rounding.
    for part in parts[1:]:
        shifts = [(dy, dx) for dy in range(-8, 9) for dx in range(-8, 9)]
        iou = [(np.roll(part, s, (0, 1)) & parts[0]).sum() / (np.roll(part, s, (0, 1)) | parts[0]).sum() for s in shifts]
        dy, dx = shifts[int(np.argmax(iou))]
        assert max(abs(dy), abs(dx)) <= 5 and max(iou) > 0.85
    # ...while the part is not trivially small or the whole image.
    assert 0.3 < parts[0].mean() < 0.6


def test_aligned_defects_are_on_the_part_visible_and_exactly_masked(aligned_root):
    category = read_mvtec_category(aligned_root)
    for sample in category.test:
        if not sample.is_anomalous:
            continue
        image = load(sample.path).astype(float).mean(axis=2)
        mask = read_mask(sample.mask_path, *image.shape)
        assert mask.sum() >= 8
        # The defect lies on the part: the same image's neighbourhood of the mask is metal, not background.
        near = binary_dilation(mask, iterations=1) & ~mask
        assert np.median(image[near]) > 90, sample.path
        ring = binary_dilation(mask, iterations=5) & ~binary_dilation(mask, iterations=2) & (image > 90)
        reference = np.median(image[ring])
        inside = np.abs(image[mask] - reference).mean()
        around = np.abs(image[ring] - reference).mean()
        assert inside > 2 * around, (sample.path, inside, around)


def test_make_aligned_data_refuses_bad_geometry(tmp_path):
    with pytest.raises(ValueError, match="max_shift"):
        make_aligned_data(str(tmp_path), size=64, max_shift=10)
    with pytest.raises(ValueError, match="size >= 32"):
        make_aligned_data(str(tmp_path), size=16)
    with pytest.raises(ValueError, match="n_train >= 1"):
        make_aligned_data(str(tmp_path), n_train=0)


# --- read_mvtec_category / list_categories / read_mask ------------------------


def test_read_mvtec_category_on_demo_data(demo_root):
    category = read_mvtec_category(demo_root)
    assert category.root == demo_root and category.name == "widgets"
    assert category.defect_types == sorted(DEFECT_TYPES)
    assert category.train == [
        Sample(os.path.join(demo_root, "train", "good", f"{i:03d}.png"), "good", None) for i in range(5)
    ]
    assert [s.label for s in category.test] == ["crack"] * 4 + ["good"] * 3 + ["scratch"] * 4 + ["spot"] * 4
    assert category.test == sorted(category.test, key=lambda s: (s.label, s.path))
    spot = [s for s in category.test if s.label == "spot"][2]
    assert spot.path == os.path.join(demo_root, "test", "spot", "002.png")
    assert spot.mask_path == os.path.join(demo_root, "ground_truth", "spot", "002_mask.png")
    assert spot.is_anomalous and not category.train[0].is_anomalous


def test_reader_skips_non_images_and_tolerates_missing_masks(tmp_path):
    root = tmp_path / "cat"
    for folder in ("train/good", "test/good", "test/dent", "ground_truth/dent"):
        (root / folder).mkdir(parents=True)
    pixel = Image.new("RGB", (4, 4))
    for name in ("train/good/a.PNG", "train/good/b.jpeg", "test/dent/x.bmp", "test/dent/y.png", "test/good/z.tif"):
        pixel.save(root / name)
    (root / "train/good/notes.txt").write_text("not an image")
    (root / "train/good/.DS_Store").write_bytes(b"\0")
    Image.new("L", (4, 4)).save(root / "ground_truth/dent/x_mask.png")
    category = read_mvtec_category(str(root))
    assert [os.path.basename(s.path) for s in category.train] == ["a.PNG", "b.jpeg"]
    dents = [s for s in category.test if s.label == "dent"]
    assert [s.mask_path for s in dents] == [str(root / "ground_truth/dent/x_mask.png"), None]


@pytest.mark.parametrize("missing", ["train/good", "test"])
def test_wrong_layout_is_a_clear_error(tmp_path, missing):
    for folder in ("train/good", "test/good"):
        (tmp_path / folder).mkdir(parents=True)
    os.rename(tmp_path / missing, tmp_path / "elsewhere")
    with pytest.raises(ValueError) as err:
        read_mvtec_category(str(tmp_path))
    assert str(tmp_path / missing) in str(err.value)
    assert "ground_truth/<defect>/<stem>_mask.png" in str(err.value)


def test_list_categories(tmp_path, demo_root):
    for name in ("bottle", "cable"):
        (tmp_path / name / "train").mkdir(parents=True)
        (tmp_path / name / "test").mkdir()
    (tmp_path / "only_train" / "train").mkdir(parents=True)
    (tmp_path / "readme.txt").write_text("")
    assert list_categories(str(tmp_path)) == ["bottle", "cable"]
    assert list_categories(os.path.dirname(demo_root)) == ["widgets"]
    with pytest.raises(ValueError, match="not a folder"):
        list_categories(str(tmp_path / "absent"))


def test_read_mask(tmp_path):
    values = np.zeros((6, 8), np.uint8)
    values[1:3, 2:6] = 255
    values[5, 7] = 1
    Image.fromarray(values).save(tmp_path / "m.png")
    np.testing.assert_array_equal(read_mask(str(tmp_path / "m.png"), 6, 8), values > 0)
    assert not read_mask(None, 5, 7).any() and read_mask(None, 5, 7).shape == (5, 7)
    # A mask at half resolution is scaled up with nearest neighbour: each pixel becomes a 2 x 2 block.
    upscaled = np.kron(values > 0, np.ones((2, 2), bool))
    np.testing.assert_array_equal(read_mask(str(tmp_path / "m.png"), 12, 16), upscaled)
    Image.fromarray(np.stack([values] * 3, axis=2)).save(tmp_path / "rgb.png")
    np.testing.assert_array_equal(read_mask(str(tmp_path / "rgb.png"), 6, 8), values > 0)
    (tmp_path / "bad.png").write_bytes(b"garbage")
    with pytest.raises(ImageError, match="bad.png"):
        read_mask(str(tmp_path / "bad.png"), 6, 8)


@pytest.mark.skipif(not os.path.isdir(MAGNETIC_TILE), reason="magnetic_tile dataset not present")
def test_read_mvtec_category_on_magnetic_tile():
    category = read_mvtec_category(MAGNETIC_TILE)
    assert category.name == "magnetic_tile"
    assert len(category.train) == 635 and len(category.test) == 705
    assert category.defect_types == ["blowhole", "break", "crack", "fray", "uneven"]
    labels = [s.label for s in category.test]
    assert labels.count("good") == 317
    assert all(s.mask_path is None for s in category.test if s.label == "good")
    defects = [s for s in category.test if s.is_anomalous]
    assert all(s.mask_path is not None and os.path.isfile(s.mask_path) for s in defects)
    sample = defects[0]
    image = load(sample.path)
    mask = read_mask(sample.mask_path, *image.shape[:2])
    assert mask.shape == image.shape[:2] and mask.any()
