import io
from html.parser import HTMLParser

import matplotlib
import numpy as np
import pytest
from PIL import Image

from spade_batch.formats.heatmap import colour_range
from spade_batch.reports.figures import (
    Example,
    example_grid,
    html_page,
    overlay,
    pro_plot,
    roc_plot,
    score_histogram,
)


def decode_plot(png: bytes) -> np.ndarray:
    """Decode PNG bytes and check that the picture is a real, non-blank plot; returns H x W x 3 uint8."""
    image = Image.open(io.BytesIO(png))
    assert image.format == "PNG"
    pixels = np.asarray(image.convert("RGB"))
    height, width, _ = pixels.shape
    assert 300 <= width <= 3000 and 200 <= height <= 3000
    assert len(np.unique(pixels.reshape(-1, 3), axis=0)) >= 10
    assert pixels.std() > 10
    return pixels


def test_roc_plot_is_a_png_plot():
    fpr = np.linspace(0, 1, 50)
    decode_plot(roc_plot({"image": (fpr, np.sqrt(fpr), 0.67), "pixel": (fpr, fpr**0.2, 0.83)}))


def test_pro_plot_is_a_png_plot():
    fpr = np.linspace(0, 1, 100)
    decode_plot(pro_plot(fpr, np.minimum(1, 3 * fpr), pro_score=0.5))


def test_score_histogram_is_a_png_plot_and_allows_one_empty_group():
    rng = np.random.default_rng(0)
    normal, defect = rng.normal(size=200), rng.normal(2, 1, size=50)
    decode_plot(score_histogram({"normal": normal, "defect": defect}, {"fpr 1%": 2.3, "f1": 1.1}))
    decode_plot(score_histogram({"normal": normal, "defect": np.array([])}, {}, xlabel="pixel score"))
    decode_plot(score_histogram({"calibration": normal[:20], "tonight": defect}, {}, density=True))
    with pytest.raises(ValueError, match="all empty"):
        score_histogram({"normal": np.array([]), "defect": np.array([])}, {})


def test_roc_plot_and_example_grid_reject_empty_input():
    with pytest.raises(ValueError, match="at least one curve"):
        roc_plot({})
    with pytest.raises(ValueError, match="at least one Example"):
        example_grid([], 0.0, 1.0)


def make_example(seed: int, with_ground_truth: bool) -> Example:
    rng = np.random.default_rng(seed)
    image = rng.integers(0, 256, size=(48, 64, 3), dtype=np.uint8)
    anomaly_map = np.zeros((48, 64), dtype=np.float32)
    anomaly_map[10:30, 20:40] = 3.0
    mask = anomaly_map > 1
    return Example(image, anomaly_map, mask, mask if with_ground_truth else None, f"crack/{seed:03d}.png  score 4.21")


def test_example_grid_has_one_row_per_example():
    one = decode_plot(example_grid([make_example(0, True)], 0.0, 3.0))
    two = decode_plot(example_grid([make_example(0, True), make_example(1, False)], 0.0, 3.0))
    assert two.shape[1] == one.shape[1]
    assert two.shape[0] > 1.8 * one.shape[0]


def test_example_grid_leaves_out_the_ground_truth_column_when_no_example_has_one():
    with_truth = decode_plot(example_grid([make_example(0, True)], 0.0, 3.0))
    without = decode_plot(example_grid([make_example(0, False)], 0.0, 3.0))
    assert without.shape[0] == with_truth.shape[0]
    assert without.shape[1] == round(with_truth.shape[1] * 3 / 4)


def test_overlay_changes_pixels_only_where_the_map_is_high():
    image = np.full((32, 48, 3), 100, dtype=np.uint8)
    anomaly_map = np.zeros((32, 48), dtype=np.float32)
    anomaly_map[:, 24:] = 5.0  # above `high`: clipped to the top of the colour scale
    anomaly_map[:, :24] = -1.0  # below `low`
    blended = overlay(image, anomaly_map, low=0.0, high=2.0, alpha=0.5)
    assert blended.shape == image.shape and blended.dtype == np.uint8
    np.testing.assert_array_equal(blended[:, :24], image[:, :24])
    top_colour = np.asarray(matplotlib.colormaps["jet"](1.0)[:3]) * 255
    expected = np.rint(0.5 * 100 + 0.5 * top_colour).astype(np.uint8)
    np.testing.assert_array_equal(blended[:, 24:], np.broadcast_to(expected, (32, 24, 3)))
    np.testing.assert_array_equal(overlay(image, anomaly_map, 0.0, 2.0, alpha=0.0), image)


def test_the_colour_range_puts_the_pixel_threshold_at_mid_scale():
    assert colour_range(1.5, peak=9.0) == (0.0, 3.0)  # a scoring run's pictures start at 0
    assert colour_range(1.5, peak=9.0, low=1.0) == (1.0, 2.0)  # evaluate's start at the median normal pixel
    assert colour_range(None, peak=9.0) == (0.0, 9.0)  # no threshold: up to the largest value shown
    low, high = colour_range(None, peak=0.0)
    assert low < high  # a flat map still draws (overlay refuses low >= high)
    low, high = colour_range(1.0, peak=9.0, low=5.0)
    assert low < high


def test_overlay_rejects_bad_input():
    image = np.zeros((8, 8, 3), dtype=np.uint8)
    with pytest.raises(ValueError, match="image must be H x W x 3 uint8"):
        overlay(image.astype(np.float32), np.zeros((8, 8)), 0.0, 1.0)
    with pytest.raises(ValueError, match="anomaly_map must be H x W"):
        overlay(image, np.zeros((8, 9)), 0.0, 1.0)
    with pytest.raises(ValueError, match="low < high"):
        overlay(image, np.zeros((8, 8)), 1.0, 1.0)


class PageParser(HTMLParser):
    """Collects text, image sources and unbalanced tags of an HTML page."""

    VOID = {"meta", "img", "br", "link", "hr", "input"}

    def __init__(self):
        super().__init__()
        self.open_tags: list[str] = []
        self.errors: list[str] = []
        self.texts: list[str] = []
        self.image_sources: list[str] = []

    def handle_starttag(self, tag, attrs):
        if tag == "img":
            self.image_sources.append(dict(attrs)["src"])
        if tag not in self.VOID:
            self.open_tags.append(tag)

    def handle_endtag(self, tag):
        if not self.open_tags or self.open_tags.pop() != tag:
            self.errors.append(f"unexpected </{tag}>")

    def handle_data(self, data):
        if data.strip():
            self.texts.append(data.strip())


def test_html_page_holds_table_images_and_notes_and_parses():
    page = html_page(
        "bottle <nightly> & co",
        [
            {"metric": "image ROCAUC", "value": 0.98765, "images": 83},
            {"metric": "PRO", "value": 0.91, "bins": 4096},
        ],
        {"ROC curves": "roc.png", "examples": "overlays/crack 003.png"},
        ["preprocessing: resize 224", "K = 50"],
    )
    parser = PageParser()
    parser.feed(page)
    parser.close()
    assert parser.errors == [] and parser.open_tags == []
    assert parser.texts[0] == "bottle <nightly> & co"  # escaped, decoded back by the parser
    for text in ["image ROCAUC", "0.9877", "83", "PRO", "0.9100", "4096", "bins", "ROC curves", "K = 50"]:
        assert text in parser.texts
    assert parser.image_sources == ["roc.png", "overlays/crack%20003.png"]
    assert page.index("0.9877") < page.index("roc.png") < page.index("K = 50")


def test_html_page_puts_further_tables_under_their_headings_before_the_figures():
    page = html_page(
        "eval",
        [{"subset": "all", "PRO (FPR <= 0.3)": 0.8}],
        {"ROC curves": "roc.png"},
        ["a note"],
        {"Decisions at the calibrated thresholds vs F1-optimal (label-chosen)": [
            {"measure": "pixel SegF1 (pooled)", "calibrated": 0.41234, "F1-optimal": "n/a"}]},
    )
    parser = PageParser()
    parser.feed(page)
    parser.close()
    assert parser.errors == [] and parser.open_tags == []
    for text in ["Decisions at the calibrated thresholds vs F1-optimal (label-chosen)", "pixel SegF1 (pooled)", "0.4123", "n/a"]:
        assert text in parser.texts
    assert page.index("PRO (FPR &lt;= 0.3)") < page.index("Decisions at") < page.index("0.4123") < page.index("roc.png")
