"""Datasets in the MVTec AD layout: a reader, and two synthetic generators (a texture, aligned parts).

Layout of one category (``<dataset>/<category>``)::

    train/good/*.png                        normal images for fitting
    test/good/*.png, test/<defect>/*.png    images to score
    ground_truth/<defect>/<stem>_mask.png   0/255 defect masks of test/<defect>/<stem>.*
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw
from scipy.ndimage import gaussian_filter

from spade_batch.formats.images import IMAGE_SUFFIXES, ImageError

DEFECT_TYPES = ("scratch", "spot", "crack")

_LAYOUT = "train/good/<images>, test/<good|defect>/<images>, ground_truth/<defect>/<stem>_mask.png"


# --- synthetic demo data -----------------------------------------------------


def make_demo_data(
    out_dir: str,
    *,
    category: str = "tiles",
    n_train: int = 40,
    n_test_good: int = 10,
    n_test_per_defect: int = 6,
    min_size: int = 96,
    max_size: int = 160,
    seed: int = 0,
) -> str:
    """Write a deterministic synthetic inspection dataset in the MVTec AD layout.

    Images are RGB PNGs of a grained, unevenly lit surface, each with its own
    height and width in ``[min_size, max_size]`` pixels. Test images carry one
    defect of their type (``DEFECT_TYPES``); masks are 0/255 L-mode PNGs of
    exactly the changed pixels. Same arguments give byte-identical files.

    Returns:
        The category folder ``out_dir/category``.

    Raises:
        ValueError: bad counts or sizes.
        FileExistsError: the category folder exists and is not empty.
    """
    if not 16 <= min_size <= max_size:
        raise ValueError(f"make_demo_data needs 16 <= min_size <= max_size, got {min_size}, {max_size}")

    def surface(rng: np.random.Generator) -> tuple[np.ndarray, None]:
        return _surface(rng, min_size, max_size), None

    return _write_category(out_dir, category, (n_train, n_test_good, n_test_per_defect), seed, surface)


def make_aligned_data(
    out_dir: str,
    *,
    category: str = "parts",
    n_train: int = 40,
    n_test_good: int = 10,
    n_test_per_defect: int = 6,
    size: int = 128,
    max_shift: float = 3.0,
    max_rotation: float = 3.0,
    seed: int = 0,
) -> str:
    """Write a deterministic synthetic set of ALIGNED parts in the MVTec AD layout.

    Every image is ``size`` x ``size`` RGB: a turned flange (a disc with a hub
    hole, six bolt holes and a notch in its rim) on a dark background, always
    at the image centre up to a jitter of at most ``max_shift`` pixels in x and
    y, ``max_rotation`` degrees and a few percent of brightness. Unlike
    ``make_demo_data``'s texture, *where* a pixel lies tells what it should
    look like, as on a fixtured production line. Test images carry one defect
    of their type (``DEFECT_TYPES``), painted on the part's face only; masks
    are 0/255 L-mode PNGs of exactly the changed pixels. Same arguments give
    byte-identical files.

    Returns:
        The category folder ``out_dir/category``.

    Raises:
        ValueError: bad counts, size or jitter.
        FileExistsError: the category folder exists and is not empty.
    """
    if size < 32 or not 0 <= max_shift <= size / 16 or not 0 <= max_rotation <= 180:
        raise ValueError(
            "make_aligned_data needs size >= 32, 0 <= max_shift <= size / 16 and 0 <= max_rotation <= 180, "
            f"got {size}, {max_shift}, {max_rotation}"
        )

    def part(rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        return _part(rng, size, max_shift, max_rotation)

    return _write_category(out_dir, category, (n_train, n_test_good, n_test_per_defect), seed, part)


ImageMaker = Callable[[np.random.Generator], tuple[np.ndarray, "np.ndarray | None"]]
"""rng -> (H x W x 3 float64 image, H x W bool where defects may be painted, or None: anywhere)."""


def _write_category(
    out_dir: str, category: str, counts: tuple[int, int, int], seed: int, make_image: ImageMaker
) -> str:
    """Write ``out_dir/category`` in the MVTec layout; counts are (train, test good, test per defect type)."""
    n_train, n_test_good, n_test_per_defect = counts
    if min(counts) < 0 or n_train == 0:
        raise ValueError("a synthetic set needs n_train >= 1 and non-negative test counts")
    root = os.path.join(out_dir, category)
    if os.path.isdir(root) and os.listdir(root):
        raise FileExistsError(f"{root} already exists and is not empty; remove it or choose another out_dir")

    # One independent generator per image, keyed by (seed, split, label, index).
    def rng(split: int, label: int, index: int) -> np.random.Generator:
        return np.random.default_rng([seed, split, label, index])

    for i in range(n_train):
        _write_png(make_image(rng(0, 0, i))[0], os.path.join(root, "train", "good", f"{i:03d}.png"))
    for i in range(n_test_good):
        _write_png(make_image(rng(1, 0, i))[0], os.path.join(root, "test", "good", f"{i:03d}.png"))
    for d, defect in enumerate(DEFECT_TYPES, start=1):
        for i in range(n_test_per_defect):
            g = rng(1, d, i)
            image, allowed = make_image(g)
            mask, delta = _paint_defect(g, defect, allowed, image.shape[0], image.shape[1])
            image[mask] += delta[mask][:, None]
            _write_png(image, os.path.join(root, "test", defect, f"{i:03d}.png"))
            _write_png(mask.astype(np.uint8) * 255, os.path.join(root, "ground_truth", defect, f"{i:03d}_mask.png"))
    return root


_MIN_DEFECT_PIXELS = 8
_MAX_DEFECT_TRIES = 50


def _paint_defect(
    rng: np.random.Generator, defect: str, allowed: np.ndarray | None, height: int, width: int
) -> tuple[np.ndarray, np.ndarray]:
    """A defect of type ``defect`` -> (H x W bool mask, H x W intensity change).

    With ``allowed``, the mask is cut to it, and a defect that leaves fewer
    than ``_MIN_DEFECT_PIXELS`` there is drawn again (deterministically, from
    the same generator).
    """
    for _ in range(_MAX_DEFECT_TRIES):
        mask, delta = _DEFECT_MAKERS[defect](rng, height, width)
        if allowed is None:
            return mask, delta
        mask &= allowed
        if mask.sum() >= _MIN_DEFECT_PIXELS:
            return mask, delta
    raise ValueError(f"no {defect} of {_MIN_DEFECT_PIXELS}+ pixels fits the part in {_MAX_DEFECT_TRIES} tries")


def _part(rng: np.random.Generator, size: int, max_shift: float, max_rotation: float) -> tuple[np.ndarray, np.ndarray]:
    """A turned flange at the centre, jittered -> (size x size x 3 float64 image, size x size bool face).

    The face is the part's material at least 2 px inside its edges: where defects may be painted.
    """
    shift = rng.uniform(-max_shift, max_shift, size=2)
    theta = np.deg2rad(rng.uniform(-max_rotation, max_rotation))
    gain = rng.uniform(0.94, 1.06)
    yy, xx = np.mgrid[0:size, 0:size].astype(float)
    # Part-frame coordinates (pixels): the image point minus the jittered centre, rotated back by theta.
    x, y = xx - (size - 1) / 2 - shift[0], yy - (size - 1) / 2 - shift[1]
    u, v = np.cos(theta) * x + np.sin(theta) * y, -np.sin(theta) * x + np.cos(theta) * y
    r = np.hypot(u, v)
    inside = _flange_depth(u, v, r, size)  # px inside the material; negative outside it
    coverage = np.clip(inside + 0.5, 0.0, 1.0)  # one-pixel anti-aliased edges
    turning = 5 * np.sin(2 * np.pi * r / 3.0)  # concentric tool marks, 3 px pitch
    light = 20 * (xx + yy) / (2 * size)  # fixed to the camera, not to the part
    blotches = 4 * _unit(gaussian_filter(rng.standard_normal((size, size)), sigma=6.0))
    metal = 140 + turning + light + blotches + 3 * rng.standard_normal((size, size))
    background = 40 + 2 * rng.standard_normal((size, size))
    gray = gain * (coverage * metal + (1 - coverage) * background)
    return gray[:, :, None] * np.array([0.95, 0.98, 1.0]), inside >= 2


def _flange_depth(u: np.ndarray, v: np.ndarray, r: np.ndarray, size: int) -> np.ndarray:
    """Signed distance (px) into the flange's material at part-frame points (u, v); r = hypot(u, v)."""
    outer, hub, bolt_circle, bolt = 0.40 * size, 0.13 * size, 0.27 * size, 0.045 * size
    depth = np.minimum(outer - r, r - hub)
    for angle in np.deg2rad(np.arange(30, 360, 60)):
        centre = bolt_circle * np.array([np.cos(angle), np.sin(angle)])
        depth = np.minimum(depth, np.hypot(u - centre[0], v - centre[1]) - bolt)
    notch_half_width, notch_depth = 0.05 * size, 0.08 * size
    in_notch = np.minimum(notch_half_width - np.abs(v), u - (outer - notch_depth))  # > 0 inside the notch
    return np.minimum(depth, -in_notch)


def _write_png(array: np.ndarray, path: str) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.fromarray(np.clip(np.rint(array), 0, 255).astype(np.uint8)).save(path, format="PNG")


def _unit(field: np.ndarray) -> np.ndarray:
    return (field - field.mean()) / field.std()


def _surface(rng: np.random.Generator, min_size: int, max_size: int) -> np.ndarray:
    """A brushed-metal-like surface: H x W x 3 float64 intensities, about 60..200."""
    height, width = (int(v) for v in rng.integers(min_size, max_size + 1, size=2))
    grain = _unit(gaussian_filter(rng.standard_normal((height, width)), sigma=(0.7, 6.0)))
    blotches = _unit(gaussian_filter(rng.standard_normal((height, width)), sigma=8.0))
    yy, xx = np.mgrid[0:height, 0:width] / max(height, width)
    angle = rng.uniform(0, 2 * np.pi)
    illumination = np.cos(angle) * xx + np.sin(angle) * yy
    fine = rng.standard_normal((height, width))
    gray = 128 + 9 * grain + 6 * blotches + 30 * (illumination - illumination.mean()) + 3 * fine
    return gray[:, :, None] * np.array([1.0, 0.97, 0.92])  # warm grey tint


def _draw(height: int, width: int, lines: list[list[tuple[float, float]]], line_width: int) -> np.ndarray:
    """Rasterise polylines of (x, y) points -> H x W bool."""
    canvas = Image.new("L", (width, height), 0)
    draw = ImageDraw.Draw(canvas)
    for points in lines:
        draw.line(points, fill=255, width=line_width, joint="curve")
    return np.asarray(canvas) > 0


def _scratch(rng: np.random.Generator, height: int, width: int) -> tuple[np.ndarray, np.ndarray]:
    """Thin curved line (quadratic Bezier), dark or bright. -> (H x W bool mask, H x W intensity change)."""
    size = min(height, width)
    centre = rng.uniform(0.3, 0.7, size=2) * (width, height)
    length = rng.uniform(0.3, 0.5) * size
    angle = rng.uniform(0, np.pi)
    direction = np.array([np.cos(angle), np.sin(angle)])
    normal = np.array([-direction[1], direction[0]])
    p0, p2 = centre - direction * length / 2, centre + direction * length / 2
    p1 = centre + normal * rng.uniform(-0.25, 0.25) * length
    t = np.linspace(0, 1, 40)[:, None]
    curve = (1 - t) ** 2 * p0 + 2 * (1 - t) * t * p1 + t**2 * p2
    mask = _draw(height, width, [[tuple(p) for p in curve]], line_width=int(rng.integers(1, 3)))
    sign = rng.choice([-1.0, 1.0])
    return mask, np.full((height, width), sign * rng.uniform(40, 60))


def _spot(rng: np.random.Generator, height: int, width: int) -> tuple[np.ndarray, np.ndarray]:
    """Elliptic stain, darkest at its centre. -> (H x W bool mask, H x W intensity change)."""
    size = min(height, width)
    cx, cy = rng.uniform(0.25, 0.75, size=2) * (width, height)
    a, b = rng.uniform(3, 3 + 0.08 * size, size=2)
    angle = rng.uniform(0, np.pi)
    yy, xx = np.mgrid[0:height, 0:width]
    u = (xx - cx) * np.cos(angle) + (yy - cy) * np.sin(angle)
    v = -(xx - cx) * np.sin(angle) + (yy - cy) * np.cos(angle)
    r2 = (u / a) ** 2 + (v / b) ** 2
    sign = rng.choice([-1.0, 1.0], p=[0.7, 0.3])
    return r2 <= 1, sign * rng.uniform(40, 55) * (1 - 0.4 * r2)


def _crack(rng: np.random.Generator, height: int, width: int) -> tuple[np.ndarray, np.ndarray]:
    """Dark branching crack: a jittered random walk with side branches. -> (mask, intensity change)."""
    start = rng.uniform(0.3, 0.7, size=2) * (width, height)
    angle = rng.uniform(0, 2 * np.pi)
    trunk = _walk(rng, start, angle, n_steps=int(rng.integers(15, 30)), width=width, height=height)
    lines = [trunk]
    for _ in range(int(rng.integers(1, 4))):
        fork = trunk[int(rng.integers(len(trunk) // 4, len(trunk)))]
        branch_angle = angle + rng.choice([-1.0, 1.0]) * rng.uniform(0.5, 1.1)
        lines.append(_walk(rng, np.array(fork), branch_angle, int(rng.integers(5, 12)), width, height))
    mask = _draw(height, width, lines, line_width=int(rng.integers(1, 3)))
    return mask, np.full((height, width), -rng.uniform(50, 70))


def _walk(
    rng: np.random.Generator, start: np.ndarray, angle: float, n_steps: int, width: int, height: int
) -> list[tuple[float, float]]:
    """Random walk of 2..3.5 px steps whose heading drifts, (x, y) points; stops at the image border."""
    point, points = start.astype(float), [tuple(start)]
    for _ in range(n_steps):
        angle += rng.normal(0, 0.35)
        point = point + rng.uniform(2.0, 3.5) * np.array([np.cos(angle), np.sin(angle)])
        if not (0 <= point[0] < width and 0 <= point[1] < height):
            break
        points.append(tuple(point))
    return points


_DEFECT_MAKERS = {"scratch": _scratch, "spot": _spot, "crack": _crack}


# --- reading the MVTec layout --------------------------------------------------


@dataclass(frozen=True)
class Sample:
    """One image of a category: ``label`` is "good" or the defect type."""

    path: str
    label: str
    mask_path: str | None

    @property
    def is_anomalous(self) -> bool:
        return self.label != "good"


@dataclass(frozen=True)
class MVTecCategory:
    """The images of one category; ``train`` sorted by path, ``test`` by (label, path)."""

    root: str
    name: str
    train: list[Sample]
    test: list[Sample]

    @property
    def defect_types(self) -> list[str]:
        return sorted({s.label for s in self.test if s.is_anomalous})


def read_mvtec_category(root: str) -> MVTecCategory:
    """List the images and masks of ``<dataset>/<category>`` (MVTec AD layout, local path).

    Raises:
        ValueError: ``train/good`` or ``test`` is missing.
    """
    for folder in (os.path.join(root, "train", "good"), os.path.join(root, "test")):
        if not os.path.isdir(folder):
            raise ValueError(f"{folder} is not a folder; an MVTec-layout category needs {_LAYOUT}")
    train = [Sample(p, "good", None) for p in _image_files(os.path.join(root, "train", "good"))]
    test = []
    for label in _subfolders(os.path.join(root, "test")):
        for path in _image_files(os.path.join(root, "test", label)):
            test.append(Sample(path, label, None if label == "good" else _mask_path(root, label, path)))
    test.sort(key=lambda s: (s.label, s.path))
    return MVTecCategory(root=root, name=os.path.basename(os.path.normpath(root)), train=train, test=test)


def _subfolders(folder: str) -> list[str]:
    return sorted(n for n in os.listdir(folder) if not n.startswith(".") and os.path.isdir(os.path.join(folder, n)))


def _image_files(folder: str) -> list[str]:
    """Sorted paths of the files in ``folder`` with an image suffix."""
    names = (n for n in os.listdir(folder) if os.path.splitext(n)[1].lower() in IMAGE_SUFFIXES)
    return sorted(os.path.join(folder, n) for n in names if os.path.isfile(os.path.join(folder, n)))


def _mask_path(root: str, label: str, image_path: str) -> str | None:
    stem = os.path.splitext(os.path.basename(image_path))[0]
    path = os.path.join(root, "ground_truth", label, f"{stem}_mask.png")
    return path if os.path.isfile(path) else None


def list_categories(root: str) -> list[str]:
    """Sorted names of the sub-folders of a dataset root that have ``train/`` and ``test/``."""
    if not os.path.isdir(root):
        raise ValueError(f"dataset root {root} is not a folder; expected <root>/<category>/{{train,test}}")
    return [
        name
        for name in _subfolders(root)
        if os.path.isdir(os.path.join(root, name, "train")) and os.path.isdir(os.path.join(root, name, "test"))
    ]


def read_mask(path: str | None, height: int, width: int) -> np.ndarray:
    """Ground-truth mask file -> height x width bool (> 0 = defect).

    ``None`` gives an all-False mask; a mask of another size is resized with
    nearest neighbour (pixel-centre aligned, as PIL's ``NEAREST``).
    """
    if path is None:
        return np.zeros((height, width), dtype=bool)
    try:
        with Image.open(path) as im:
            if len(im.getbands()) != 1 or im.mode == "P":
                im = im.convert("L")
            if im.size != (width, height):
                im = im.resize((width, height), Image.Resampling.NEAREST)
            return np.asarray(im) > 0
    except (OSError, ValueError, SyntaxError) as e:
        raise ImageError(f"cannot read mask {path}: {e}. Re-export it as a 0/255 grayscale PNG or remove it.") from e
