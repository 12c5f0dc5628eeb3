"""What the operator reads on stdout: `show` and `config show`, the two-column summary table every command prints,
and the rows and lines those tables share (dry runs, left-out and suspect images, near-duplicates, numbers)."""

from __future__ import annotations

import json
import sys
from typing import TYPE_CHECKING, Any

import yaml

from spade_batch.config import GROUPS, Settings, describe, load_settings
from spade_batch.formats import storage
from spade_batch.formats.card import load_card
from spade_batch.formats.layout import ModelLayout, Outputs
from spade_batch.formats.manifest import Manifest, build_manifest
from spade_batch.formats.text import format_number
from spade_batch.formats.versions import resolve

if TYPE_CHECKING:
    from spade_batch.reports.review_page import ReviewPage


def print_table(title: str, rows: list[tuple[str, Any]]) -> None:
    """A two-column summary table on stdout."""
    width = max(len(name) for name, _ in rows)
    print(f"\n{title}")
    print("-" * len(title))
    for name, value in rows:
        print(f"{name:<{width}}  {value}")


def show_config(path: str | None, keys: bool) -> int:
    """--keys: every key by group, with its type, default and meaning; else the effective settings as grouped YAML."""
    if keys:
        for group in GROUPS:
            print(f"{group.name}: {group.title} (used by {', '.join(group.commands)})")
            for doc in describe():
                if doc.group == group.name:
                    print(f"  {doc.key} ({doc.kind}, default {doc.default}): {doc.help}")
        return 0
    print(yaml.safe_dump(load_settings(path).grouped(redact=True), sort_keys=False), end="")
    return 0


def show(uri: str, settings: Settings, top: int, output: str = "table", verdicts: str | None = None) -> int:
    """Print what the model or the run at uri holds (output: table, json, or csv: a run's review sheet of its top
    flagged images); with verdicts (a filled-in sheet), the run as the reviewers judged it."""
    from spade_batch.formats.review import read_sheet, sheet_csv
    from spade_batch.reports.summary import review_rows, summarise, verdicts_summary

    options = settings.fsspec_options()
    if verdicts:
        judged = verdicts_summary(uri, read_sheet(verdicts, options), options)
        if output == "json":
            print(json.dumps(judged, indent=2))
        else:
            _print_verdicts(judged)
        return 0
    summary = summarise(uri, options, top)
    if output == "csv":
        if summary["kind"] != "run":
            raise ValueError(f"{uri} is a model: a review sheet (--format csv) is written for a run's OUT_URI")
        print(sheet_csv(review_rows(summary)), end="")
    elif output == "json":
        print(json.dumps(summary, indent=2))
    elif summary["kind"] == "model":
        _print_model(summary)
    else:
        _print_run(summary)
    return 0


def _print_model(summary: dict[str, Any]) -> None:
    training, thresholds = summary["training"], summary["thresholds"]
    print_table(
        "model",
        [
            ("model", f"{summary['uri']} (version {summary['version']}, the current one)"),
            ("backbone", f"{summary['backbone']} ({summary['weights']} weights, {summary['weights_sha256']})"),
            ("method", ", ".join(f"{key}={value}" for key, value in summary["settings"].items() if key not in ("backbone", "weights"))),
            ("gallery images", training["gallery_images"]),
            ("calibration images", training["calibration_images"]),
            ("failed images", training["failed_images"]),
            ("image threshold", thresholds["image"]),
            ("pixel threshold", thresholds["pixel"]),
            ("thresholds set by", summary["thresholds_set_by"]),
            *summary["decisions"].items(),
            ("alignment", summary["alignment"]),
            ("created", f"{summary['created']} (spade-batch {summary['package_version']})"),
        ],
    )
    _print_failures(summary["failures"])
    _print_unused(summary["unused"])
    print("\nversions (current: *)")
    print(f"{'':1} {'version':>7}  {'parent':>6}  {'added':>6}  {'gallery':>7}  {'image thr':>10}  {'pixel thr':>10}  {'set by':<21}  created")
    for row in summary["versions"]:
        thresholds = row["thresholds"]
        print(f"{'*' if row['current'] else ' '} {row['number']:>7}  {row['parent'] or '-':>6}  {row['images_added'] or '-':>6}  "
              f"{row['gallery_images']:>7}  {format_number(thresholds['image']):>10}  {format_number(thresholds['pixel']):>10}  "
              f"{row['thresholds_set_by']:<21}  {row['created']}")


def _print_unused(unused: dict[str, Any], limit: int = 20) -> None:
    """The training images the model does not use (left out, duplicates), its near-duplicate count, and what each
    version left out of the images new to it or used by its parent; `limit` of each list (--json: all)."""
    if unused["recorded"] is False:
        print("\ntraining images not used: not recorded (a model from before they were)")
        return
    listed = [(f"training images not used ({len(unused['images'])})", unused["images"]),
              *((f"left out by version {v['number']} ({len(v['left_out'])})", v["left_out"]) for v in unused["by_version"])]
    for title, entries in listed:
        if entries:
            print(f"\n{title}")
            for entry in entries[:limit]:
                print(f"  {entry['id']}: {entry['reason']}")
            if len(entries) > limit:
                print(f"  ... and {len(entries) - limit} more (--json lists them)")
    print(f"\nnear-duplicates: {near_duplicates(unused['near_duplicates'])}")


def _print_run(summary: dict[str, Any]) -> None:
    counts, thresholds, timings = summary["counts"], summary["thresholds"], summary["timings"]
    rate = summary["anomaly_rate"]
    print_table(
        "run",
        [
            ("run", summary["uri"]),
            ("model", f"{summary['model_uri']} (version {summary['model_version']})"),
            *[(name, counts[name]) for name in ("images", "scored", "failed", "retryable", "resumed", "changed", "restored")],
            ("anomalous", "unknown (no image threshold)" if rate is None else f"{counts['anomalous']} ({rate:.2%} of scored)"),
            ("image threshold", thresholds["image"]),
            ("pixel threshold", thresholds["pixel"]),
            (Outputs.masks, summary["mask_kind"]),
            *([("paper crop", summary["paper_crop"]["message"])] if summary["paper_crop"] else []),
            ("seconds", f"{timings['seconds']:.1f}"),
            ("images/s", f"{timings['images_per_second']:.2f}"),
        ],
    )
    _print_failures(summary["failures"])
    if summary["top"]:
        print(f"\ntop {len(summary['top'])} images by score")
        for row in summary["top"]:
            flag = "anomalous" if row["is_anomalous"] else "normal" if row["is_anomalous"] is not None else "-"
            print(f"{row['image_score']:>12.4f}  {flag:<9}  {row['id']}  {row['mask_uri']}")


def _print_verdicts(judged: dict[str, Any]) -> None:
    precision = judged["precision"]
    print_table(
        "verdicts",
        [
            ("run", judged["uri"]),
            ("flagged images", "unknown (no image threshold)" if judged["flagged"] is None else judged["flagged"]),
            ("reviewed", judged["reviewed"]),
            ("confirmed defects", judged["confirmed_defects"]),
            ("false alarms", judged["false_alarms"]),
            ("precision among reviewed", "n/a (none reviewed)" if precision is None else f"{precision:.1%}"),
            *([("reviewed, not flagged", judged["reviewed_not_flagged"])] if judged["reviewed_not_flagged"] else []),
        ],
    )


def _print_failures(failures: list[dict[str, Any]]) -> None:
    if failures:
        print("\nfailures by reason")
        for failure in failures:
            print(f"{failure['count']:>6}  {failure['reason']}  (e.g. {failure['example']})")


def print_dry_run(source: str | Manifest, settings: Settings, outputs: list[str], model_uri: str | None = None) -> int:
    """Print what a run of the images at source (or of a manifest) would read and write; with model_uri, also what model it would use."""
    manifest = source if isinstance(source, Manifest) else build_manifest(source, settings.fsspec_options())
    rows: list[tuple[str, Any]] = [
        ("images", len(manifest)),
        ("root", manifest.root),
        ("part files", f"up to {settings.shard_size} images each"),
    ]
    if manifest.ids:
        rows += [("first image", manifest.ids[0]), ("last image", manifest.ids[-1])]
    if manifest.rejected:
        uri, reason = manifest.rejected[0]
        rows += [("rejected", f"{len(manifest.rejected)} (each gets an error row), first: {uri}: {reason}")]
    if model_uri is not None:
        rows.append(("model", _describe_model(model_uri, settings)))
    rows += [("writes", uri) for uri in outputs]
    print_table("dry run: nothing computed or written", rows)
    return 0


def _describe_model(model_uri: str, settings: Settings) -> str:
    """A dry run's model row: the current version's backbone, K, gallery and thresholds, or that there is none yet."""
    if not storage.exists(ModelLayout(model_uri).card, settings.fsspec_options()):
        return f"{model_uri}: no model there yet (fit one first)"
    current = resolve(model_uri, None, settings.fsspec_options())
    card = load_card(current.uri, settings.fsspec_options())
    method, thresholds = card.settings, card.thresholds
    return (
        f"{model_uri}: version {current.number}, {method.backbone} ({method.weights}), K={method.k}, "
        f"{card.train_count} gallery images, thresholds image {thresholds.image}, pixel {thresholds.pixel}"
    )


def suspects_count(suspects: list[dict[str, Any]], left_out: bool) -> str:
    """The summary tables' suspect row: how many, and what became of them (calibration setting suspects)."""
    if not suspects:
        return "0"
    return f"{len(suspects)} ({'left out of the gallery and calibration' if left_out else 'kept: --suspects leave_out leaves them out'})"


def print_suspects(suspects: list[dict[str, Any]]) -> None:
    """One line per suspect training image (the first 10), highest score first."""
    for entry in suspects[:10]:
        print(f"suspect: {entry['id']}: image score {entry['score']:.4g}, far above the other calibration images")


def near_duplicates(near: dict[str, Any]) -> str:
    """'N of M calibration images (e.g. a ~ b)': those with a gallery neighbour much closer than the rest."""
    if not near:
        return "not measured"
    examples = ", ".join(f"{e['id']} ~ {e['neighbour']}" for e in near["examples"][:3])
    return f"{near['count']} of {near['checked']} calibration images" + (f" (e.g. {examples})" if examples else "")


def print_left_out(entries: list[dict[str, str]], limit: int = 10) -> None:
    """'left out: id: why' for the first `limit` entries, then how many more."""
    for entry in entries[:limit]:
        print(f"left out: {entry['id']}: {entry['reason']}")
    if len(entries) > limit:
        print(f"left out: ... and {len(entries) - limit} more (spade-batch show MODEL --json lists them)")


def print_review(page: ReviewPage) -> None:
    """`review`'s table: the page written, its cards, and a warning per picture it could not draw."""
    flagged = "unknown (no image threshold)" if page.flagged is None else page.flagged
    print_table("review", [("page", page.uri), ("cards", page.cards), ("flagged images", flagged),
                           ("pictures missing", len(page.undrawn))])
    for note in page.undrawn[:10]:
        print(f"spade-batch: warning: review: the {note.picture} of {note.id} could not be read: {note.reason}", file=sys.stderr)




