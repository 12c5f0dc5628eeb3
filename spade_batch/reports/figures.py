"""Evaluation report: plots, heat-map overlays, mask PNGs and an HTML page.

Every function returns bytes (or a str, for HTML); the caller writes them to
local or object storage. Figures are drawn with matplotlib's Agg canvas
through `Figure` objects, never pyplot, so no global state is shared between
calls or threads.
"""

from __future__ import annotations

import html
import io
from dataclasses import dataclass
from urllib.parse import quote

import matplotlib
import numpy as np
from matplotlib.axes import Axes
from matplotlib.figure import Figure

from spade_batch.formats.heatmap import overlay

_DPI = 100


def _png(figure: Figure) -> bytes:
    """Render a figure to PNG bytes."""
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=_DPI)
    return buffer.getvalue()


def _curve_axes(figure: Figure, xlabel: str, ylabel: str) -> Axes:
    axes = figure.add_subplot()
    axes.set_xlim(0, 1)
    axes.set_ylim(0, 1.02)
    axes.set_xlabel(xlabel)
    axes.set_ylabel(ylabel)
    axes.grid(alpha=0.3)
    return axes


def roc_plot(curves: dict[str, tuple[np.ndarray, np.ndarray, float]]) -> bytes:
    """ROC curves on one axes, as PNG bytes.

    curves: name -> (fpr (M,), tpr (M,), auc), e.g. {"image": ..., "pixel": ...}.
    """
    if not curves:
        raise ValueError("roc_plot needs at least one curve; pass {name: (fpr, tpr, auc)}")
    figure = Figure(figsize=(5, 5))
    axes = _curve_axes(figure, "false positive rate", "true positive rate")
    axes.plot([0, 1], [0, 1], linestyle="--", color="grey", label="chance")
    for name, (fpr, tpr, auc) in curves.items():
        axes.plot(fpr, tpr, linewidth=2, label=f"{name} (AUC {auc:.3f})")
    axes.set_title("ROC")
    axes.legend(loc="lower right")
    return _png(figure)


def pro_plot(fpr: np.ndarray, pro: np.ndarray, pro_score: float, max_fpr: float = 0.3) -> bytes:
    """Per-region-overlap curve, the integrated part (FPR <= max_fpr) shaded, as PNG bytes.

    fpr, pro: (M,) float, fpr ascending; pro_score: normalised area up to max_fpr.
    """
    fpr = np.asarray(fpr)
    pro = np.asarray(pro)
    figure = Figure(figsize=(5, 5))
    axes = _curve_axes(figure, "false positive rate (normal pixels)", "per-region overlap")
    axes.plot(fpr, pro, linewidth=2, label=f"PRO (area to FPR {max_fpr:g}) = {pro_score:.3f}")
    inside = fpr <= max_fpr
    axes.fill_between(fpr[inside], pro[inside], alpha=0.3)
    axes.axvline(max_fpr, linestyle="--", color="grey")
    axes.set_title("PRO")
    axes.legend(loc="lower right")
    return _png(figure)


def score_histogram(
    groups: dict[str, np.ndarray],
    thresholds: dict[str, float],
    xlabel: str = "image score",
    density: bool = False,
) -> bytes:
    """Overlaid histograms of score groups on shared bins, each threshold a labelled vertical line; PNG bytes.

    groups: name -> (N_g,) float scores, e.g. {"normal": ..., "defect": ...} (empty groups are left out, not all).
    thresholds: name -> score, e.g. {"fpr 1%": 3.2}.
    density: each group normalised to unit area, for groups of very different sizes.
    """
    groups = {name: np.asarray(scores, dtype=float) for name, scores in groups.items()}
    groups = {name: scores for name, scores in groups.items() if scores.size}
    if not groups:
        raise ValueError(f"score_histogram needs some scores; the groups {', '.join(groups) or '(none)'} are all empty")
    edges = np.histogram_bin_edges(np.concatenate(list(groups.values())), bins=40)
    figure = Figure(figsize=(7, 4))
    axes = figure.add_subplot()
    for name, scores in groups.items():
        axes.hist(scores, bins=edges, alpha=0.5, density=density, label=f"{name} ({scores.size})")
    colors = matplotlib.color_sequences["Dark2"]
    for index, (name, value) in enumerate(thresholds.items()):
        axes.axvline(value, color=colors[index % len(colors)], linestyle="--", linewidth=2, label=f"{name} = {value:.3g}")
    axes.set_xlabel(xlabel)
    axes.set_ylabel("density" if density else "count")
    axes.legend()
    figure.tight_layout()
    return _png(figure)


@dataclass(frozen=True)
class Example:
    """One row of the example grid."""

    image: np.ndarray  # H x W x 3 uint8
    anomaly_map: np.ndarray  # H x W float32
    predicted_mask: np.ndarray  # H x W bool, or float in [0, 1] (a mask scaled from the map)
    ground_truth: np.ndarray | None  # H x W bool
    title: str  # e.g. "crack/003.png  score 4.21"
    missing: tuple[str, ...] = ()  # "image", "mask": pictures that could not be read, drawn grey and titled so


def _panel(axes: Axes, picture: np.ndarray, title: str) -> None:
    """Show an H x W x 3 uint8 picture, or an H x W bool/[0, 1] float one in gray, without ticks."""
    axes.set_xticks([])
    axes.set_yticks([])
    axes.set_title(title, fontsize=8)
    if picture.ndim == 2:
        axes.imshow(picture, cmap="gray", vmin=0, vmax=1, interpolation="nearest")
    else:
        axes.imshow(picture, interpolation="nearest")


def example_grid(examples: list[Example], low: float, high: float) -> bytes:
    """One row per example: image | ground truth | overlay | predicted mask; PNG bytes.

    The ground-truth column is left out when no example has one (a scoring run's images).
    low, high: the anomaly-map range mapped onto the colour scale (heatmap.colour_range).
    """
    if not examples:
        raise ValueError("example_grid needs at least one Example")
    with_truth = any(example.ground_truth is not None for example in examples)
    columns = 4 if with_truth else 3
    figure = Figure(figsize=(2.5 * columns, 2.6 * len(examples)))
    grid = figure.subplots(len(examples), columns, squeeze=False)
    for row, example in zip(grid, examples):
        panels = list(row)
        _panel(panels.pop(0), example.image, example.title + ("\n(image missing)" if "image" in example.missing else ""))
        if with_truth:
            if example.ground_truth is None:
                _panel(panels.pop(0), np.full(example.image.shape[:2], 0.85), "no ground truth")  # light gray
            else:
                _panel(panels.pop(0), example.ground_truth, "ground truth")
        _panel(panels[0], overlay(example.image, example.anomaly_map, low, high), "anomaly map")
        _panel(panels[1], example.predicted_mask, "mask missing" if "mask" in example.missing else "predicted mask")
    figure.tight_layout()
    return _png(figure)


def _cell(value: object) -> str:
    text = f"{value:.4f}" if isinstance(value, float) else str(value)
    return f"<td>{html.escape(text)}</td>"


def html_table(rows: list[dict[str, object]]) -> str:
    """HTML table; columns are the union of the rows' keys in first-seen order, missing cells empty."""
    columns = list(dict.fromkeys(key for row in rows for key in row))
    header = "".join(f"<th>{html.escape(str(column))}</th>" for column in columns)
    body = "".join(
        "<tr>" + "".join(_cell(row[column]) if column in row else "<td></td>" for column in columns) + "</tr>\n"
        for row in rows
    )
    return f"<table>\n<thead><tr>{header}</tr></thead>\n<tbody>\n{body}</tbody>\n</table>"


STYLE = """
body { font-family: sans-serif; margin: 2em; }
table { border-collapse: collapse; }
th, td { border: 1px solid #ccc; padding: 0.3em 0.8em; text-align: right; }
figure { display: inline-block; margin: 1em; }
img { max-width: 100%; }
"""


def html_document(title: str, body: str, style: str = STYLE) -> str:
    """The one page skeleton: a self-contained HTML document (inline CSS) whose body starts with the title as <h1>."""
    return f"""<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<title>{html.escape(title)}</title>
<style>{style}</style>
</head>
<body>
<h1>{html.escape(title)}</h1>
{body}
</body>
</html>
"""


def html_page(
    title: str, metrics_table: list[dict[str, object]], images: dict[str, str], notes: list[str],
    tables: dict[str, list[dict[str, object]]] | None = None,
) -> str:
    """evaluate's page: a metrics table, then the other tables under their headings, then each image, then notes.

    metrics_table and each of tables: rows of {column: value}; floats are shown to 4 decimals.
    images: caption -> file name relative to the page.
    """
    more = "".join(f"<h2>{html.escape(heading)}</h2>\n{html_table(rows)}\n" for heading, rows in (tables or {}).items())
    figures = "\n".join(
        f'<figure><img src="{html.escape(quote(path))}" alt="{html.escape(caption)}">'
        f"<figcaption>{html.escape(caption)}</figcaption></figure>"
        for caption, path in images.items()
    )
    note_items = "\n".join(f"<li>{html.escape(note)}</li>" for note in notes)
    return html_document(title, f"""<h2>Metrics</h2>
{html_table(metrics_table)}
{more}<h2>Figures</h2>
{figures}
<h2>Notes</h2>
<ul>
{note_items}
</ul>""")
