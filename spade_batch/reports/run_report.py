"""The run report: OUT/report.html, written at the end of every score and nightly, and a plan's page linking them.

One self-contained HTML file (inline CSS, figures embedded as data: URIs), so it can be copied or
opened from object storage alone. Its sections, by element id: `counts`, `drift` (tonight's anomaly
rate against the calibration band, see drift.py), `histogram` (tonight's image scores over the
calibration scores), `anomalies` (the top-N images: image, map overlay, mask), `failures` (grouped
by reason) and `throughput`.

The report never fails a scored run: a picture it cannot read (an image moved since, a mask deleted,
a read that failed for a transient reason) is drawn grey, marked missing and listed with why
(RunReport.undrawn); the run's exit status stays its scoring outcome, 75 when a read was transient.
"""

from __future__ import annotations

import base64
import dataclasses
import heapq
import html
import io
import json
import posixpath
import shlex
import urllib.parse
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

import numpy as np
from PIL import Image

from spade_batch.config import Settings
from spade_batch.formats import retry, storage
from spade_batch.formats.card import CalibrationRecord, ModelCard, load_card
from spade_batch.formats.heatmap import colour_range
from spade_batch.formats.images import decode_image, resize_map
from spade_batch.formats.layout import Outputs, read_columns
from spade_batch.formats.text import BLANK, first_line
from spade_batch.formats.versions import resolve
from spade_batch.reports.drift import DriftCheck, check_drift
from spade_batch.reports.figures import STYLE, Example, example_grid, html_document, html_table, score_histogram
from spade_batch.reports.summary import FailureGroup, decision_rules, group_failures

TOP_N = 8
THUMBNAIL = 192
"""Longest side, in pixels, of each picture of the top anomalies."""
EXAMPLE_IDS = 3
"""Image ids listed per failure reason."""
MISSING_GREY = 0.85
"""The grey a picture that could not be read is drawn in (on the 0-1 scale of masks)."""
T = TypeVar("T")


@dataclass(frozen=True)
class Undrawn:
    """A picture of the top anomalies that could not be read: drawn as missing."""

    id: str
    picture: str
    """"image", "mask" or "map" (the review page: "model", when its training images could not be listed)."""
    reason: str
    transient: bool
    """It failed for a reason that may pass: a re-run of the same command draws it."""


@dataclass(frozen=True)
class RunReport:
    """What writing a run's report found: where it is, the drift check, the pictures drawn as missing."""

    uri: str
    drift: DriftCheck
    undrawn: list[Undrawn]

    @property
    def retryable(self) -> int:
        """Pictures that could not be read for a transient reason."""
        return sum(note.transient for note in self.undrawn)


@dataclass
class RunScores:
    """What the report reads from a run's scores table.

    scores: (m,) float64 image scores of the scored images; top: up to TOP_N rows (id, uri,
    image_score, is_anomalous, height, width), highest score first, anomalous ones only when a threshold is known;
    failures: grouped by reason (summary.group_failures, as `spade-batch show` groups them).
    """

    scores: np.ndarray
    anomalous: int
    top: list[dict[str, Any]]
    failures: list[FailureGroup] = field(default_factory=list)


def read_run_scores(out_uri: str, options: storage.StorageOptions, top_n: int | None = TOP_N, extra: Sequence[str] = ()) -> RunScores:
    """Scores, anomaly count, top rows and failures over every part file under OUT/scores/ (a few columns at a time).

    top_n: how many top rows (None: every candidate); extra: more columns of the scores table the top rows keep.
    """
    columns = ["id", "uri", "image_score", "is_anomalous", "height", "width", "error", *extra]
    scores: list[float] = []
    anomalous = 0
    candidates: list[tuple[float, str, dict[str, Any]]] = []
    failed: list[tuple[str, str]] = []
    for _, table in read_columns(Outputs(out_uri).parts(options).own, columns, options):
        for row in (dict(zip(columns, values)) for values in zip(*(table[name] for name in columns))):
            if row["error"] is not None:
                failed.append((row["id"], row["error"]))
                continue
            scores.append(row["image_score"])
            anomalous += bool(row["is_anomalous"])
            if row["is_anomalous"] is not False:  # None: no threshold, every image is a candidate
                candidates.append((row["image_score"], row["id"], row))
    top = [row for _, _, row in heapq.nlargest(len(candidates) if top_n is None else top_n, candidates, key=lambda item: (item[0], item[1]))]
    return RunScores(np.array(scores, dtype=np.float64), anomalous, top, group_failures(failed, EXAMPLE_IDS))


def write_run_report(summary: dict[str, Any], settings: Settings) -> RunReport:
    """Write OUT/report.html for a finished run (its run.json as `summary`): its URI, the drift check, the pictures drawn as missing."""
    options = settings.fsspec_options()
    out_uri = summary["out_uri"]
    card = load_card(resolve(summary["model_uri"], summary["model_version"], options).uri, options)  # the version scored
    run = read_run_scores(out_uri, options)
    check = check_drift(run.scores, run.anomalous, card.calibration, summary["thresholds"]["image"],
                        calibrated=card.thresholds.image)
    undrawn: list[Undrawn] = []
    examples = _examples(run.top, out_uri, summary["thresholds"]["pixel"], settings, undrawn)
    # run.json gains the verdict and the pictures not drawn, for `nightly --plan`'s summary and for scripts.
    summary = {**summary, "drift": {"alarm": check.drifted, "checked": check.checked, "verdict": check.verdict(),
                                    "reasons": check.reasons, "ks_pvalue": check.ks_pvalue,
                                    "band": dataclasses.asdict(check.band) if check.band else None},
               "pictures_missing": [dataclasses.asdict(note) for note in undrawn]}
    storage.write_text(Outputs(out_uri).run_json, json.dumps(summary, indent=2), options)
    uri, review = Outputs(out_uri).report, Outputs(out_uri).review
    review_href = report_link(uri, review) if storage.exists(review, options) else None
    storage.write_text(uri, render_run_report(summary, card, run, check, examples, undrawn, review_href), options)
    return RunReport(uri, check, undrawn)


def _thumbnail_size(height: int, width: int) -> tuple[int, int]:
    scale = min(1.0, THUMBNAIL / max(height, width))
    return max(1, round(height * scale)), max(1, round(width * scale))


def _examples(
    top: list[dict[str, Any]], out_uri: str, pixel_threshold: float | None, settings: Settings, undrawn: list[Undrawn],
) -> bytes | None:
    """image | map overlay | mask of the top rows, at thumbnail size; PNG bytes, None without rows.

    The map is the one the output stage saved (every anomalous image's, or all with save_maps); a
    row without one shows its mask as the map. Masks and maps are read where the run's layout puts
    them (not the row's mask_uri, which an old run may hold relative to where it started). A picture
    that cannot be read is drawn grey and appended to undrawn.
    """
    if not top:
        return None
    options, outputs = settings.fsspec_options(), Outputs(out_uri)
    examples = []
    for row in top:
        def read(picture: str, reader: Callable[[], T]) -> T | None:
            return _read_picture(row["id"], picture, reader, undrawn)

        original = read("image", lambda: decode_image(storage.read_bytes(row["uri"], options), row["uri"], settings.max_pixels))
        height, width = _thumbnail_size(*(original.shape[:2] if original is not None else (row["height"], row["width"])))
        image = (np.full((height, width, 3), round(255 * MISSING_GREY), np.uint8) if original is None
                 else np.asarray(Image.fromarray(original).resize((width, height), Image.Resampling.BILINEAR)))
        mask = read("mask", lambda: _read_mask(outputs.mask(row["id"]), height, width, options))
        saved = read("map", lambda: _read_map(outputs.map(row["id"]), options))
        if saved is not None:
            anomaly_map = resize_map(saved, height, width)
        else:  # the top of the scale where the mask is set
            anomaly_map = (mask if mask is not None else np.zeros((height, width), np.float32)) * colour_range(pixel_threshold, 1.0)[1]
        missing = tuple(picture for picture, value in (("image", original), ("mask", mask)) if value is None)
        examples.append(Example(image, anomaly_map, np.full((height, width), MISSING_GREY) if mask is None else mask, None,
                                f"{row['id']}  score {row['image_score']:.4g}", missing))
    return example_grid(examples, *colour_range(pixel_threshold, max(float(e.anomaly_map.max()) for e in examples)))


def _read_picture(image_id: str, picture: str, reader: Callable[[], T], undrawn: list[Undrawn]) -> T | None:
    """reader()'s picture, or None when it cannot be read (noted in undrawn): the report goes on without it."""
    try:
        return reader()
    except (OSError, ValueError) as error:  # missing, transient, undecodable: each is a note, never the run's failure
        undrawn.append(Undrawn(image_id, picture, f"{type(error).__name__}: {first_line(error, 'no message')}", retry.is_transient(error)))
        return None


def _read_mask(uri: str, height: int, width: int, options: storage.StorageOptions) -> np.ndarray:
    """The mask PNG at uri, at height x width, in [0, 1]."""
    with Image.open(io.BytesIO(storage.read_bytes(uri, options))) as mask_png:
        return np.asarray(mask_png.convert("L").resize((width, height), Image.Resampling.NEAREST), np.float32) / 255.0


def _read_map(uri: str, options: storage.StorageOptions) -> np.ndarray | None:
    """The anomaly map saved at uri (float32), None when none was saved."""
    return storage.read_npy(uri, options).astype(np.float32) if storage.exists(uri, options) else None


def _embedded(png: bytes, alt: str) -> str:
    return f'<img src="data:image/png;base64,{base64.b64encode(png).decode()}" alt="{html.escape(alt)}">'


def _percent(count: int, total: int) -> str:
    return f"{count / total:.1%}" if total else BLANK


def _drift_section(check: DriftCheck, calibration: CalibrationRecord) -> str:
    if not check.checked:
        verdict = f'<p class="verdict alarm">Drift {html.escape(check.verdict())}.</p>'
        rows: list[dict[str, object]] = []
    elif check.band is None:
        verdict = '<p class="verdict">No band: the run has no image threshold, no calibration count, or no scored image.</p>'
        rows = []
    else:
        band = check.band
        status, text = ("alarm", "DRIFT: " + "; ".join(check.reasons)) if check.drifted else ("ok", "Tonight looks like the calibration images.")
        verdict = f'<p class="verdict {status}">{html.escape(text)}</p>'
        rows = [
            {"": "tonight", "anomalous images": check.anomalous, "rate": _percent(check.anomalous, check.images)},
            {"": "predicted by calibration", "anomalous images": f"{band.predicted * band.images:.1f}", "rate": f"{band.predicted:.1%}"},
            {"": "band (no alarm inside)", "anomalous images": f"{band.low} - {band.high}",
             "rate": f"{_percent(band.low, band.images)} - {_percent(band.high, band.images)}"},
        ]
    facts = [
        {"": "calibration images", "value": calibration.count},
        {"": "target image FPR", "value": calibration.image_fpr if calibration.image_fpr is not None else "unknown"},
        {"": "score distribution, Kolmogorov-Smirnov p", "value": "no calibration scores in the model card" if check.ks_pvalue is None
         else f"{check.ks_pvalue:.3g}"},
    ]
    return f"{verdict}\n{html_table(rows) if rows else ''}\n{html_table(facts)}"


def _failures_section(run: RunScores, summary: dict[str, Any]) -> str:
    rows: list[dict[str, object]] = [
        {"reason": group.reason, "images": group.count, "e.g.": ", ".join(group.examples)} for group in run.failures
    ]
    if summary["retryable"]:
        examples = ", ".join(failure["id"] for failure in summary["retryable_failures"][:EXAMPLE_IDS])
        rows.append({"reason": "transient read failure: re-run the same command", "images": summary["retryable"], "e.g.": examples})
    return html_table(rows) if rows else "<p>No image failed.</p>"


def _missing_pictures(undrawn: list[Undrawn]) -> str:
    """The note under the top anomalies: which pictures are drawn grey, why, and what to do."""
    if not undrawn:
        return ""
    todo = {"image": "the image is no longer where it was scored", "mask": "re-run the same command: it scores the image again and writes its mask",
            "map": "re-run the same command to draw it"}
    rows: list[dict[str, object]] = [
        {"id": note.id, "picture": note.picture, "why": note.reason,
         "what to do": "re-run the same command to draw it" if note.transient else todo[note.picture]} for note in undrawn
    ]
    return f'\n<p class="verdict alarm">{len(undrawn)} pictures could not be read and are drawn grey:</p>\n{html_table(rows)}'


def _throughput_section(summary: dict[str, Any]) -> str:
    rows: list[dict[str, object]] = [
        {"": "seconds (whole run)", "value": f"{summary['seconds']:.1f}"},
        {"": "images per second", "value": f"{summary['images_per_second']:.2f}"},
        {"": "images resumed from an earlier run", "value": summary["resumed"]},
        {"": "scored again: changed since the last run", "value": summary.get("changed", 0)},
        {"": "scored again: their mask was missing", "value": summary.get("restored", 0)},
        {"": "model workers", "value": summary["model_workers"]},
    ]
    workers = [{"worker": name[:12], "node": entry["node"], "images": entry["images"]} for name, entry in sorted(summary["workers"].items())]
    return html_table(rows) + ("\n" + html_table(workers) if workers else "")


def render_run_report(
    summary: dict[str, Any], card: ModelCard, run: RunScores, check: DriftCheck, examples: bytes | None, undrawn: list[Undrawn],
    review_href: str | None = None,
) -> str:
    """The report page; summary is the run's run.json, card the model's card, undrawn the pictures drawn as missing,
    review_href where the run's review page is, relative to the report (None: it has none)."""
    calibration = card.calibration
    counts: list[dict[str, object]] = [
        {"": "images", "count": summary["images"], "share": "100%"},
        {"": "scored", "count": summary["scored"], "share": _percent(summary["scored"], summary["images"])},
        {"": "anomalous", "count": run.anomalous if summary["thresholds"]["image"] is not None else "unknown (no threshold)",
         "share": _percent(run.anomalous, summary["scored"]) + " of scored"},
        {"": "failed (bad input)", "count": summary["failed"], "share": _percent(summary["failed"], summary["images"])},
        {"": "retryable (transient)", "count": summary["retryable"], "share": _percent(summary["retryable"], summary["images"])},
    ]
    thresholds = {f"image threshold ({summary['thresholds']['image']:.4g})": summary["thresholds"]["image"]} if summary["thresholds"]["image"] is not None else {}
    groups = {"calibration (normal)": np.asarray(calibration.image_scores), "tonight": run.scores}
    histogram = (
        _embedded(score_histogram(groups, thresholds, density=True), "image-score histogram: tonight over calibration")
        if run.scores.size else "<p>No image was scored.</p>"
    )
    if not calibration.image_scores:
        histogram += "<p>The model card keeps no calibration scores (fitted before they were kept): tonight's scores only.</p>"
    anomalies = _embedded(examples, "top anomalies: image, anomaly map, mask") if examples else "<p>No anomalous image.</p>"
    top_rows: list[dict[str, object]] = [
        {"rank": rank, "id": row["id"], "image score": float(row["image_score"]), "mask": Outputs(summary["out_uri"]).mask(row["id"])}
        for rank, row in enumerate(run.top, 1)
    ]
    review = (f"<p>Review sheet of the flagged images, for reviewers to mark each <code>normal</code> or <code>defect</code>: "
              f"<code>{html.escape(_review_command(summary['out_uri'], len(run.top)))} &gt; review.csv</code>; then "
              f"<code>spade-batch add --model {html.escape(summary['model_uri'])} --verdicts review.csv</code> adds the false "
              "alarms to the model as its next version.</p>\n" + _review_page(summary["out_uri"], review_href))
    title = f"spade-batch run: {summary['out_uri']}"
    sections = {
        "counts": ("Counts", html_table(counts)),
        "drift": ("Anomaly rate against the calibration", _drift_section(check, calibration)),
        "decisions": ("What the model's thresholds decide", html_table([{"": key, "rule": value} for key, value in decision_rules(card).items()])),
        "histogram": ("Image scores, tonight over the calibration images", histogram),
        "anomalies": (f"Top {len(run.top)} anomalies",
                      anomalies + _missing_pictures(undrawn) + ("\n" + html_table(top_rows) + review if top_rows else "")),
        "failures": ("Failures by reason", _failures_section(run, summary)),
        "throughput": ("Throughput", _throughput_section(summary)),
    }
    return _page(title, f"model {summary['model_uri']} (version {summary['model_version']})", sections)


def _review_page(out_uri: str, href: str | None) -> str:
    """The paragraph on the run's review page: a link to it (its URI as text where a browser cannot follow it), or the
    command that writes it."""
    if href is None:
        return (f'<p id="review-page">No review page yet: <code>spade-batch review {html.escape(shlex.quote(out_uri))}</code> writes one '
                "(each flagged image beside its map and nearest normal images, marked with the keyboard; it downloads the sheet).</p>")
    where = f'<a href="{html.escape(href)}">review page</a>' if is_safe_href(href) else f"review page: <code>{html.escape(href)}</code>"
    return f'<p id="review-page">Mark the flagged images on the run\'s {where} (it downloads the filled-in sheet).</p>'


def _review_command(out_uri: str, top: int) -> str:
    """The command that writes the run's review sheet of its `top` highest flagged images (formats.review)."""
    return f"spade-batch show {shlex.quote(out_uri)} --top {max(top, 1)} --format csv"


_REPORT_STYLE = STYLE + """
section { margin-bottom: 2em; }
td { text-align: left; }
.verdict { padding: 0.5em 1em; font-weight: bold; background: #eee; }
.verdict.ok { background: #d9f2d9; }
.verdict.alarm { background: #f7c6c6; }
"""


def _page(title: str, subtitle: str, sections: dict[str, tuple[str, str]]) -> str:
    """A run report or plan page: one <section id=...> with a heading per entry of sections (id -> (heading, HTML body))."""
    body = "\n".join(f'<section id="{key}">\n<h2>{html.escape(heading)}</h2>\n{content}\n</section>' for key, (heading, content) in sections.items())
    return html_document(title, f"<p>{html.escape(subtitle)}</p>\n{body}", _REPORT_STYLE)


def report_link(page_uri: str, report_uri: str) -> str:
    """How the page at page_uri refers to report_uri: a relative path, percent-encoded, when both are local
    files (so a name such as `javascript:x` is a path, never a scheme), else the URI."""
    if storage.is_local(page_uri) and storage.is_local(report_uri):
        page, report = (storage.normalize(uri) for uri in (page_uri, report_uri))
        return urllib.parse.quote(posixpath.relpath(report, posixpath.dirname(page)))
    return report_uri


LINKED_SCHEMES = ("http", "https", "file")
"""The schemes a page links to; any other href (s3:, javascript:, data:, ...) is shown as text."""


def is_safe_href(href: str) -> bool:
    """True for an http(s) or file URL, or a path relative to the page: what a browser can follow without running anything."""
    if any(character.isspace() or not character.isprintable() for character in href):
        return False  # browsers drop tabs and newlines inside a URL: "java\tscript:" is a scheme to them
    scheme = urllib.parse.urlsplit(href).scheme
    return scheme.lower() in LINKED_SCHEMES if scheme else ":" not in href.split("/", 1)[0]


def render_plan_report(title: str, rows: list[dict[str, object]], reports: dict[str, str]) -> str:
    """A plan's page: the summary table (one row per line), then each line's run report (name -> href):
    a link when the href is safe (is_safe_href), else the href as text."""
    items = [
        f'<a href="{html.escape(href)}">{html.escape(name)}</a>' if is_safe_href(href)
        else f"{html.escape(name)}: <code>{html.escape(href)}</code>"
        for name, href in reports.items()
    ]
    links = "\n".join(f"<li>{item}</li>" for item in items) or "<li>No line wrote a report.</li>"
    sections = {"lines": ("Lines", html_table(rows)), "reports": ("Run reports", f"<ul>\n{links}\n</ul>")}
    return _page(title, f"{len(rows)} lines", sections)
