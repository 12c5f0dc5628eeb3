"""The review page: OUT/review.html, one self-contained page where a reviewer sees why each flagged image was flagged,
marks it normal or defect, and downloads the review sheet that `add --verdicts` and `show --verdicts` read.

One card per flagged image, highest score first (TOP_N by default, or every flagged one): the image with its mask as
an overlay (toggled), the anomaly map the run kept, its score against the threshold, and the first NEIGHBOURS of the
K normal images its search retrieved (the scores table's neighbour_ids; their files are where the model's feature
parts say they were read). Pictures are thumbnails at the run report's size, embedded once each as data: URIs in a
JSON block (a normal image retrieved for many cards is read and embedded once), so the page needs no server and no
network. The page's behaviour is review_page.js and its style review_page.css, package data inlined into the page.

Where its pixel matches came from: given a NearestNormalOf (the `review` and `nightly --review-top` commands build one
from the method; reports import no torch), each card's image is searched again against its retrieved images, on this
machine, and the card holds a small grid (at most MATCH_SIDE cells a side) naming for each cell the retrieved image and
the cell of its nearest normal pixel. Clicking a pixel of the image or map shows it on that image's thumbnail; the most
anomalous cell's match is shown by default. A model or image that cannot be searched leaves its cards without it, said so.

The sheet it downloads is formats.review's: each row's cells are written here by review.sheet_csv (its columns, its
quoting of formula-like cells) with an empty verdict, the last column; the page only appends the verdict. Verdicts
are kept in the browser's local storage under the run's key (its OUT and run token), and a sheet can be loaded back.
A picture that cannot be read is said so on its card, never a failed page.
"""

from __future__ import annotations

import base64
import html
import io
import json
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from importlib import resources
from typing import Any

import numpy as np
from PIL import Image

from spade_batch.config import Settings
from spade_batch.formats import retry, storage
from spade_batch.formats.calibration_matches import PixelMatches
from spade_batch.formats.features import INDEX_SCHEMA, LayerShape
from spade_batch.formats.heatmap import colour_range, overlay
from spade_batch.formats.images import decode_image, resize_map
from spade_batch.formats.layout import ModelLayout, Outputs, part_files, read_columns
from spade_batch.formats.review import COLUMNS, safe_cell, sheet_csv
from spade_batch.formats.text import first_line
from spade_batch.formats.versions import lineage
from spade_batch.reports.figures import STYLE, html_document
from spade_batch.reports.run_report import Undrawn, _read_map, _read_mask, _read_picture, _thumbnail_size, read_run_scores

TOP_N = 100
"""Cards on a page unless --top or --all-flagged says otherwise."""
NEIGHBOURS = 3
"""Retrieved normal images shown per card."""
JPEG_QUALITY = 75
"""About 9 kB for a 192 x 192 photograph: 100 cards (image and map) and their retrieved images stay near 3 MB."""
NEIGHBOUR_SIDE = 128
"""Longest side, in pixels, of a retrieved normal image's thumbnail."""
MASK_RGBA = (255, 0, 255, 110)
"""The mask overlay's colour (magenta, about 43% opaque): unlike any heat-map colour."""
SHEET_NAME = "verdicts.csv"
"""The name the page downloads its sheet under."""
MATCH_SIDE = 28
"""Most cells a side of a card's nearest-normal grid: a finer layer's cells are taken in blocks, each block shown by its
most distant cell (the most anomalous there); 784 cells of two small numbers, about 6 kB a card."""
_COLUMNS = ["mask_uri", "neighbour_ids"]

NearestNormal = Callable[[np.ndarray, list[str]], tuple[LayerShape, PixelMatches]]
"""(an H x W x 3 uint8 image, its retrieved normal images' ids, nearest first) -> the grid of the layer searched and, for
each of its cells, the nearest normal pixel among those images (one layer, kappa 1: method.scorer.Scorer.nearest_normal)."""
NearestNormalOf = Callable[[str, int], NearestNormal]
"""(model URI, version) -> that model's NearestNormal (loading it may fail: the cards then say so)."""
SEARCH_ERRORS = (OSError, ValueError, LookupError, RuntimeError)
"""What a model that cannot be loaded or an image that cannot be searched raises (ModelError is a ValueError; an id the
model does not hold a KeyError; torch's failures RuntimeErrors): the card goes without its matches."""


@dataclass(frozen=True)
class ReviewPage:
    """What writing a review page found: where it is, its cards, the pictures that could not be read."""

    uri: str
    cards: int
    flagged: int | None
    """The run's flagged images (None: no image threshold, every image is a candidate)."""
    undrawn: list[Undrawn] = field(default_factory=list)


@dataclass
class Pictures:
    """The page's pictures, each embedded once: key -> data: URI; each source read once (source -> key, or None)."""

    uris: dict[str, str] = field(default_factory=dict)
    made: dict[str, str | None] = field(default_factory=dict)
    sizes: dict[str, tuple[int, int]] = field(default_factory=dict)
    """Retrieved image id -> its (width, height) in pixels, of those read."""

    def add(self, source: str, make: Callable[[], bytes | None], kind: str) -> str | None:
        """The key of source's picture, made (kind: jpeg or png bytes, or None when it cannot be) only the first time."""
        if source not in self.made:
            data = make()
            key = None
            if data is not None:
                key = f"p{len(self.uris)}"
                self.uris[key] = f"data:image/{kind};base64,{base64.b64encode(data).decode()}"
            self.made[source] = key
        return self.made[source]


def write_review_page(out_uri: str, settings: Settings, top_n: int | None = TOP_N, page_uri: str | None = None,
                      nearest: NearestNormalOf | None = None) -> ReviewPage:
    """Write the review page of the finished run at out_uri (top_n cards, None: every flagged image) to page_uri
    (default OUT/review.html); with `nearest`, each card shows where its pixels' nearest normal pixels are."""
    options = settings.fsspec_options()
    outputs = Outputs(out_uri)
    if not storage.exists(outputs.run_json, options):
        raise FileNotFoundError(f"no finished run at {out_uri}: its run.json is missing; `spade-batch score` writes it")
    summary = json.loads(storage.read_text(outputs.run_json, options))
    run = read_run_scores(out_uri, options, top_n, _COLUMNS)
    wanted = {image_id for row in run.top for image_id in (row["neighbour_ids"] or [])[:NEIGHBOURS]}
    pictures, undrawn = Pictures(), []
    try:
        training = training_uris(summary["model_uri"], summary["model_version"], wanted, options)
    except (OSError, ValueError) as error:  # the model moved or gone: the cards name their neighbours without pictures
        training = {}
        undrawn.append(Undrawn(summary["model_uri"], "model", f"{type(error).__name__}: {first_line(error, 'no message')}",
                               retry.is_transient(error)))
    search = _search(nearest, summary, undrawn) if nearest is not None and run.top else None
    cards = [_card(row, training, summary["thresholds"]["pixel"], outputs, settings, pictures, undrawn, search) for row in run.top]
    uri = page_uri or outputs.review
    flagged = run.anomalous if summary["thresholds"]["image"] is not None else None
    storage.write_text(uri, render_review_page(summary, outputs.token(options) or "", cards, pictures.uris, flagged), options)
    return ReviewPage(uri, len(cards), flagged, undrawn)


def training_uris(model_uri: str, version: int, ids: set[str], options: storage.StorageOptions) -> dict[str, str]:
    """id -> where it was read, for the training images among ids of the model's version `version`: from the index
    columns of the feature parts of the version and its ancestors (a later version's row of an id wins)."""
    found: dict[str, str] = {}
    for model_version in lineage(model_uri, version, options):
        parts = part_files(ModelLayout(model_version.uri).features, options)
        for _, columns in read_columns(parts, ["id", "uri"], options, INDEX_SCHEMA):
            found.update((image_id, uri) for image_id, uri in zip(columns["id"], columns["uri"]) if image_id in ids)
    return found


def _search(nearest: NearestNormalOf, summary: dict[str, Any], undrawn: list[Undrawn]) -> NearestNormal | str:
    """The run's model's NearestNormal, or why there is none (noted in undrawn)."""
    try:
        return nearest(summary["model_uri"], summary["model_version"])
    except SEARCH_ERRORS as error:
        reason = f"{type(error).__name__}: {first_line(error, 'no message')}"
        undrawn.append(Undrawn(summary["model_uri"], "model (for the nearest-normal positions)", reason, retry.is_transient(error)))
        return f"the model could not be loaded ({reason})"


def match_grid(shape: LayerShape, matches: PixelMatches, shown: int, sizes: dict[str, tuple[int, int]]) -> dict[str, Any]:
    """The page's nearest-normal grid of one image from its one-layer matches (NearestNormal's) on an h x w grid.

    Blocks of step x step cells (step: the fewest making at most MATCH_SIDE a side), each by its most distant cell.
    Returns {"grid": [h, w], "step", "columns": blocks a row, "ids": the retrieved images named (the first `shown`
    retrieved images, then the others matched, in order), "sizes": per id [width, height] or None (unknown),
    "cells": per block (row-major) the position in ids of its match's image and its cell there (h x w grid, row-major),
    flattened, "top": the block holding the most distant cell}.
    """
    height, width = shape.height, shape.width
    step = math.ceil(max(height, width) / MATCH_SIDE)
    rows, columns = math.ceil(height / step), math.ceil(width / step)
    distances = np.full((rows * step, columns * step), -np.inf)
    distances[:height, :width] = matches.distances[0][:, 0].reshape(height, width)
    blocks = distances.reshape(rows, step, columns, step).transpose(0, 2, 1, 3).reshape(rows * columns, step * step)
    within = blocks.argmax(axis=1)
    chosen = (np.arange(rows)[:, None] * step + within.reshape(rows, columns) // step) * width + (
        np.arange(columns)[None, :] * step + within.reshape(rows, columns) % step)
    sources = matches.sources[0][chosen.reshape(-1), 0].astype(np.int64)
    order = list(range(min(shown, len(matches.neighbour_ids)))) + [n for n in dict.fromkeys(sources.tolist()) if n >= shown]
    position = {n: place for place, n in enumerate(order)}
    ids = [matches.neighbour_ids[n] for n in order]
    cells = np.stack([[position[n] for n in sources.tolist()], matches.cells[0][chosen.reshape(-1), 0]], axis=1)
    return {"grid": [height, width], "step": step, "columns": columns, "ids": ids,
            "sizes": [list(sizes[i]) if i in sizes else None for i in ids], "cells": cells.reshape(-1).tolist(),
            "top": int(blocks[np.arange(len(blocks)), within].argmax())}


def _card(
    row: dict[str, Any], training: dict[str, str], pixel_threshold: float | None, outputs: Outputs, settings: Settings,
    pictures: Pictures, undrawn: list[Undrawn], search: NearestNormal | str | None = None,
) -> dict[str, Any]:
    """One card's content: the row, the keys of its pictures (None: not drawn), its nearest-normal grid (match_grid,
    with search) and notes on what is missing."""
    options = settings.fsspec_options()
    image_id = row["id"]

    def read(picture: str, reader: Callable[[], Any]) -> Any:
        return _read_picture(image_id, picture, reader, undrawn)

    original = read("image", lambda: decode_image(storage.read_bytes(row["uri"], options), row["uri"], settings.max_pixels))
    height, width = _thumbnail_size(*(original.shape[:2] if original is not None else (row["height"], row["width"])))
    thumbnail = None if original is None else np.asarray(Image.fromarray(original).resize((width, height), Image.Resampling.BILINEAR))
    mask = read("mask", lambda: _read_mask(outputs.mask(image_id), height, width, options))
    saved = read("map", lambda: _read_map(outputs.map(image_id), options))
    card = {
        "row": row,
        "image": None if thumbnail is None else pictures.add(f"image:{row['uri']}", lambda: _jpeg(thumbnail), "jpeg"),
        "mask": None if mask is None else pictures.add(f"mask:{image_id}", lambda: _mask_png(mask), "png"),
        "map": None,
        "map_note": "No anomaly map kept for this image (the run kept maps of flagged images only, or with save_maps)."
        if saved is None else "",
        "neighbours": [],
        "match": None,
        "match_note": "",
    }
    if saved is not None and thumbnail is not None:
        resized = resize_map(saved, height, width)
        heat = overlay(thumbnail, resized, *colour_range(pixel_threshold, float(resized.max())))
        card["map"] = pictures.add(f"map:{image_id}", lambda: _jpeg(heat), "jpeg")
    elif saved is not None:
        card["map_note"] = "The anomaly map is kept, but the image could not be read to draw it over."
    for neighbour in (row["neighbour_ids"] or [])[:NEIGHBOURS]:
        uri = training.get(neighbour)
        key = None if uri is None else pictures.add(f"image:{uri}", lambda: _neighbour(neighbour, uri, settings, undrawn, pictures.sizes),
                                                    "jpeg")
        card["neighbours"].append({"id": neighbour, "picture": key})
    if search is not None:
        card["match"], card["match_note"] = _matches(search, original, row["neighbour_ids"] or [], pictures.sizes)
    return card


def _matches(search: NearestNormal | str, image: np.ndarray | None, neighbour_ids: list[str],
             sizes: dict[str, tuple[int, int]]) -> tuple[dict[str, Any] | None, str]:
    """A card's match_grid, or None and why not."""
    if isinstance(search, str):
        reason = search
    elif image is None or not neighbour_ids:
        reason = "the image could not be read" if image is None else "the run recorded no retrieved normal images"
    else:
        try:
            return match_grid(*search(image, list(neighbour_ids)), NEIGHBOURS, sizes), ""
        except SEARCH_ERRORS as error:
            reason = f"the search failed ({type(error).__name__}: {first_line(error, 'no message')})"
    return None, f"Where its pixels' nearest normal pixels are is not shown: {reason}."


def _neighbour(image_id: str, uri: str, settings: Settings, undrawn: list[Undrawn], sizes: dict[str, tuple[int, int]]) -> bytes | None:
    """A retrieved normal image's thumbnail (JPEG bytes), None when it cannot be read (noted in undrawn); its size noted in sizes."""
    image = _read_picture(image_id, "image", lambda: decode_image(storage.read_bytes(uri, settings.fsspec_options()), uri,
                                                                  settings.max_pixels), undrawn)
    if image is None:
        return None
    sizes[image_id] = (image.shape[1], image.shape[0])
    thumbnail = Image.fromarray(image)
    thumbnail.thumbnail((NEIGHBOUR_SIDE, NEIGHBOUR_SIDE), Image.Resampling.BILINEAR)
    return _jpeg(np.asarray(thumbnail))


def _jpeg(image: np.ndarray) -> bytes:
    """H x W x 3 uint8 as JPEG bytes."""
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="JPEG", quality=JPEG_QUALITY)
    return buffer.getvalue()


def _mask_png(mask: np.ndarray) -> bytes:
    """An H x W mask in [0, 1] as an RGBA PNG: MASK_RGBA where set, transparent elsewhere."""
    rgba = np.zeros((*mask.shape, 4), np.uint8)
    rgba[mask > 0.5] = MASK_RGBA
    buffer = io.BytesIO()
    Image.fromarray(rgba, "RGBA").save(buffer, format="PNG", optimize=True)
    return buffer.getvalue()


def _script_json(value: Any) -> str:
    """value as JSON that cannot end the <script> element holding it (<, > and & as \\u escapes)."""
    return json.dumps(value).replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")


def sheet_line(row: dict[str, Any]) -> str:
    """The row's line of the review sheet (review.sheet_csv: its quoting and formula escaping) without the verdict,
    the last column: the line up to and including its last comma."""
    _, line = sheet_csv([row]).split("\n", 1)
    return line.removesuffix("\n")


def _picture(key: str | None, alt: str, css: str = "") -> str:
    if key is None:
        return f'<p class="missing">{html.escape(alt)}: could not be read</p>'
    return f'<img class="{css}" data-picture="{key}" alt="{html.escape(alt)}">'


def _card_html(index: int, card: dict[str, Any], image_threshold: float | None) -> str:
    row = card["row"]
    image_id, score = row["id"], float(row["image_score"])
    versus = ("no image threshold" if image_threshold is None else f"threshold {image_threshold:.4g}"
              + (f": {score / image_threshold:.2f} times" if image_threshold > 0 else ""))
    neighbours = "\n".join(
        f'<figure class="neighbour"><div class="stack">{_picture(n["picture"], "nearest normal image " + str(rank) + ": " + n["id"])}'
        '<span class="marker" hidden></span></div>'
        f'<figcaption>nearest normal {rank}: <span class="name">{html.escape(n["id"])}</span></figcaption></figure>'
        for rank, n in enumerate(card["neighbours"], 1)
    ) or '<p class="missing">The run recorded no retrieved normal images.</p>'
    mask = "" if card["mask"] is None else _picture(card["mask"], f"mask of {image_id}", "mask")
    anomaly_map = (f'<figure class="map"><div class="stack">{_picture(card["map"], f"anomaly map of {image_id}")}'
                   '<span class="marker" hidden></span></div><figcaption>anomaly map</figcaption></figure>'
                   if card["map"] else f'<figure><p class="missing">{html.escape(card["map_note"])}</p></figure>')
    buttons = "".join(f'<button type="button" class="mark" data-verdict="{verdict}" aria-pressed="false">{label}</button>'
                      for verdict, label in (("normal", "Normal (n)"), ("defect", "Defect (d)"), ("skip", "Skip (s)")))
    match = ('<p class="match" aria-live="polite">Click a pixel of the image or map: its nearest normal pixel is marked on '
             'the retrieved image it came from.</p>' if card.get("match") else
             f'<p class="match missing">{html.escape(card["match_note"])}</p>' if card.get("match_note") else "")
    return f"""<article class="card" id="card-{index}" data-index="{index}" data-verdict="" tabindex="-1" aria-labelledby="title-{index}">
<h2 id="title-{index}">#{index + 1} <span class="name">{html.escape(image_id)}</span></h2>
<p class="score">score <strong>{score:.4g}</strong>, {html.escape(versus)}.
 Verdict: <strong class="verdict-text">not reviewed</strong></p>
<div class="pictures">
<figure class="subject"><div class="stack">{_picture(card["image"], f"image {image_id}")}{mask}<span class="marker" hidden></span></div>
<figcaption>image{", mask over it" if mask else ", no mask could be read"}
 <button type="button" class="toggle-mask" aria-pressed="true">Mask shown (m)</button></figcaption></figure>
{anomaly_map}
{neighbours}
</div>
{match}
<p class="where">read from <code>{html.escape(row["uri"])}</code></p>
<div class="marks" role="group" aria-label="verdict for {html.escape(image_id)}">{buttons}</div>
</article>"""


def render_review_page(summary: dict[str, Any], token: str, cards: list[dict[str, Any]], pictures: dict[str, str],
                       flagged: int | None) -> str:
    """The page: summary is the run's run.json, token its run token (the key of its verdicts in local storage),
    cards as _card makes them, pictures key -> data: URI."""
    out_uri, thresholds = summary["out_uri"], summary["thresholds"]
    state = {
        "key": f"{out_uri}\n{token}",
        "header": ",".join(COLUMNS),
        "sheet": SHEET_NAME,
        "cards": [{"id": card["row"]["id"], "cell": safe_cell(card["row"]["id"]), "line": sheet_line(card["row"]),
                   "match": card.get("match")} for card in cards],
    }
    shown = f"{len(cards)} of {flagged} flagged images" if flagged is not None else f"{len(cards)} highest-scoring images (no image threshold)"
    intro = (f"<p>Model {html.escape(summary['model_uri'])} (version {summary['model_version']}); {html.escape(shown)}, highest score "
             "first. Keys: <kbd>j</kbd> / <kbd>k</kbd> next / previous, <kbd>n</kbd> normal (a false alarm), <kbd>d</kbd> defect, "
             "<kbd>s</kbd> skip, <kbd>m</kbd> mask on or off. Verdicts stay in this browser; <em>Download verdicts</em> gives the "
             f"sheet for <code>spade-batch add --model {html.escape(summary['model_uri'])} --verdicts {SHEET_NAME}</code>.</p>")
    toolbar = """<div id="toolbar" role="toolbar" aria-label="review">
<p id="progress" aria-live="polite">0 reviewed</p>
<label>Show <select id="filter"><option value="all">all</option><option value="unreviewed">unreviewed</option>
<option value="normal">marked normal</option><option value="defect">marked defect</option><option value="skip">skipped</option></select></label>
<button type="button" id="download">Download verdicts</button>
<label>Load a sheet <input type="file" id="load" accept=".csv,text/csv"></label>
<p id="message" role="status"></p>
</div>"""
    body = "\n".join(_card_html(index, card, thresholds["image"]) for index, card in enumerate(cards)) or "<p>No flagged image.</p>"
    script = resources.files(__package__).joinpath("review_page.js").read_text(encoding="utf-8")
    style = resources.files(__package__).joinpath("review_page.css").read_text(encoding="utf-8")
    data = (f'<script type="application/json" id="review-state">{_script_json(state)}</script>\n'
            f'<script type="application/json" id="pictures">{_script_json(pictures)}</script>\n<script>{script}</script>')
    return html_document(f"spade-batch review: {out_uri}", f"{intro}\n{toolbar}\n<main>\n{body}\n</main>\n{data}", STYLE + style)
