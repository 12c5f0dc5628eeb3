"""The review page's HTML on its own (no run, no browser): hostile names render inert, and the sheet lines it embeds are
review.sheet_csv's. The page's behaviour in Chromium: tests/integration/reports/test_review_page.py."""

from __future__ import annotations

import html
import json
import shlex
from html.parser import HTMLParser

import numpy as np

from spade_batch.formats.calibration_matches import PixelMatches
from spade_batch.formats.features import LayerShape
from spade_batch.formats.review import COLUMNS, read_cell, sheet_csv
from spade_batch.reports.review_page import match_grid, render_review_page, sheet_line
from spade_batch.reports.run_report import _review_page

HOSTILE = ["a\"quote'd.png", "x<script>alert(1)</script>.png", "=cmd|' /C calc'!A0.png", "@sum(1).png", "'quoted.png", "&amp;.png"]
SUMMARY = {"out_uri": "/runs/<b>night</b>", "model_uri": "s3://bucket/model\"<i>", "model_version": 2,
           "thresholds": {"image": 1.5, "pixel": 0.7}}


def row(image_id: str, score: float) -> dict:
    return {"id": image_id, "uri": f"/images/{image_id}", "image_score": score, "mask_uri": f"/runs/masks/{image_id}",
            "neighbour_ids": ["good/<img src=x onerror=alert(1)>.png"], "is_anomalous": True, "height": 8, "width": 8}


def card(image_id: str, score: float) -> dict:
    return {"row": row(image_id, score), "image": "p0", "mask": None, "map": None, "map_note": "no map <kept>",
            "neighbours": [{"id": "good/<img src=x onerror=alert(1)>.png", "picture": "p0"}]}


class Elements(HTMLParser):
    """Every start tag with its attributes, and the text of each <script>."""

    def __init__(self) -> None:
        super().__init__()
        self.tags: list[tuple[str, dict]] = []
        self.scripts: list[tuple[dict, str]] = []
        self._script: dict | None = None

    def handle_starttag(self, tag: str, attrs: list) -> None:
        self.tags.append((tag, dict(attrs)))
        if tag == "script":
            self._script = dict(attrs)
            self.scripts.append((self._script, ""))

    def handle_data(self, data: str) -> None:
        if self._script is not None:
            self.scripts[-1] = (self._script, self.scripts[-1][1] + data)

    def handle_endtag(self, tag: str) -> None:
        if tag == "script":
            self._script = None


def test_hostile_ids_and_paths_render_as_text_never_as_markup_or_script() -> None:
    page = render_review_page(SUMMARY, "tok", [card(i, 3.0 - n / 10) for n, i in enumerate(HOSTILE)], {"p0": "data:image/png;base64,AA=="}, 9)
    parsed = Elements()
    parsed.feed(page)

    assert {tag for tag, _ in parsed.tags} >= {"article", "img", "button"}
    assert not [tag for tag, _ in parsed.tags if tag in ("b", "i")], "no name becomes markup"
    assert all(not name.startswith("on") for _, attrs in parsed.tags for name in attrs), "no event handler attribute"
    assert [attrs.get("type") for attrs, _ in parsed.scripts] == ["application/json", "application/json", None]
    assert all(attrs.get("src") is None for attrs, _ in parsed.scripts)
    images = [attrs for tag, attrs in parsed.tags if tag == "img"]
    assert all(set(attrs) <= {"class", "data-picture", "alt"} for attrs in images)  # the picture's source is set by the script alone
    titles = [attrs["aria-label"] for tag, attrs in parsed.tags if tag == "div" and attrs.get("class") == "marks"]
    assert titles == [f"verdict for {i}" for i in HOSTILE]  # unescaped by the parser: the exact names, as text

    state = json.loads(parsed.scripts[0][1])
    assert [c["id"] for c in state["cards"]] == HOSTILE and state["key"] == "/runs/<b>night</b>\ntok"
    assert "</script" not in parsed.scripts[0][1] and "<" not in parsed.scripts[0][1]


def test_the_sheet_the_page_writes_is_the_sheet_show_writes_with_the_verdicts_appended() -> None:
    rows = [row(i, 2.5) for i in HOSTILE] + [row("multi\nline, \"cell\".png", 1.25)]
    page_lines = [sheet_line(r) for r in rows]
    assert ",".join(COLUMNS) + "\n" + "".join(line + "\n" for line in page_lines) == sheet_csv(rows)
    assert all(line.endswith(",") for line in page_lines)  # the verdict, last, is what the page appends
    # A formula-like id is written quoted, and reads back as the name.
    assert page_lines[2].startswith("'=cmd") and read_cell(page_lines[2].split(",")[0]) == HOSTILE[2]


def test_a_run_without_an_image_threshold_says_so_on_each_card() -> None:
    summary = {**SUMMARY, "thresholds": {"image": None, "pixel": None}}
    page = render_review_page(summary, "", [card("a.png", 2.0)], {"p0": "data:image/png;base64,AA=="}, None)
    assert "no image threshold" in page and "1 highest-scoring images (no image threshold)" in page


def test_the_run_report_links_the_page_names_it_where_a_browser_cannot_follow_or_gives_the_command() -> None:
    assert '<a href="review.html">review page</a>' in _review_page("/runs/night", "review.html")
    on_s3 = _review_page("s3://bucket/night", "s3://bucket/night/review.html")
    assert "<a " not in on_s3 and "<code>s3://bucket/night/review.html</code>" in on_s3
    out = "/runs/<x> 'a'"
    hostile = _review_page(out, None)
    assert "<x>" not in hostile and f"<code>spade-batch review {html.escape(shlex.quote(out))}</code>" in hostile


def test_the_match_grid_keeps_each_blocks_most_distant_cell_and_names_the_images_shown_first() -> None:
    rng = np.random.default_rng(0)
    side, ids = 57, [f"good/{n}.png" for n in range(6)]  # 57 cells a side: blocks of 3 (19 a side), none cut
    distances = rng.random((side * side, 1)).astype(np.float32)
    distances[40 * side + 7] = 2.0  # the most distant cell: block (13, 2)
    sources = rng.integers(0, 6, size=(side * side, 1)).astype(np.int16)
    cells = rng.integers(0, side * side, size=(side * side, 1)).astype(np.int32)
    grid = match_grid(LayerShape("layer1", side, side, 8), PixelMatches(ids, [distances], [sources], [cells]), 3, {"good/1.png": (90, 60)})

    assert (grid["grid"], grid["step"], grid["columns"]) == ([side, side], 3, 19) and len(grid["cells"]) == 2 * 19 * 19
    assert grid["ids"][:3] == ids[:3] and sorted(grid["ids"]) == sorted(ids)  # the shown first, then the others matched
    assert grid["sizes"] == [None if i != "good/1.png" else [90, 60] for i in grid["ids"]]
    assert grid["top"] == 13 * 19 + 2
    for block in (grid["top"], 0, 19 * 19 - 1):
        rows, columns = divmod(block, 19)
        inside = [(y * side + x) for y in range(3 * rows, 3 * rows + 3) for x in range(3 * columns, 3 * columns + 3)]
        chosen = inside[int(np.argmax(distances[inside, 0]))]
        assert grid["ids"][grid["cells"][2 * block]] == ids[sources[chosen, 0]] and grid["cells"][2 * block + 1] == cells[chosen, 0]


def test_a_card_without_its_matches_says_why_and_a_card_with_them_carries_its_grid() -> None:
    with_match = {**card("a.png", 2.0), "match": {"grid": [1, 1], "step": 1, "columns": 1, "ids": ["n"], "sizes": [None], "cells": [0, 0],
                                                   "top": 0}}
    without = {**card("b<i>.png", 1.0), "match": None, "match_note": "Not shown: the model could not be loaded (<gone>)."}
    page = render_review_page(SUMMARY, "tok", [with_match, without], {"p0": "data:image/png;base64,AA=="}, 2)
    state = json.loads(page.split('id="review-state">', 1)[1].split("</script>", 1)[0])
    assert [c["match"] for c in state["cards"]] == [with_match["match"], None]
    assert "Click a pixel of the image or map" in page and html.escape(without["match_note"]) in page and "(<gone>)" not in page
