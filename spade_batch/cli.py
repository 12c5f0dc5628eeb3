"""`spade-batch fit | add | model current | thresholds | score | nightly | evaluate | demo | make-demo-data | config | show | review`: parse arguments,
call the library."""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import sys
import typing
from collections.abc import Sequence
from typing import Any

from spade_batch import __version__
from spade_batch.config import KeyDoc, Settings, describe, field_types, groups_of, load_request
from spade_batch.exit_codes import MEANING, ExitCode, explain
from spade_batch.formats.text import redact
from spade_batch.logs import configure_logging, secret_values

log = logging.getLogger("spade_batch")


def _add_settings_flags(parser: argparse.ArgumentParser, command: str) -> None:
    """--config, and one flag per key of the groups `command` uses (--image-size for image_size), in a section per group.

    The keys of other groups get hidden flags, so that giving one is the ConfigError naming the commands that use it
    (config.load_request), not argparse's bare "unrecognized arguments".
    """
    parser.add_argument("--config", metavar="YAML", help="settings file (local path or URI), grouped like these sections")
    sections = {group.name: parser.add_argument_group(f"{group.name} ({group.title})") for group in groups_of(command)}
    for doc in describe():
        flag, options = "--" + doc.key.replace("_", "-"), _flag_options(doc)
        if doc.group in sections:
            sections[doc.group].add_argument(flag, dest=doc.key, **options)
        else:
            parser.add_argument(flag, dest=doc.key, **{**options, "help": argparse.SUPPRESS})


def _flag_options(doc: KeyDoc) -> dict[str, Any]:
    """add_argument's options for a setting's flag."""
    kind = field_types()[doc.key]
    if kind is bool:
        # --no-<flag> too, so a command line can turn off what the YAML file turns on.
        return {"action": argparse.BooleanOptionalAction, "help": doc.help}
    if doc.key == "storage_options":
        return {"type": json_object, "metavar": "JSON", "help": doc.help}
    base = next(t for t in typing.get_args(kind) or (kind,) if t is not type(None))
    return {"type": base, "metavar": base.__name__.upper(), "help": f"{doc.help} [default: {doc.default}]"}


def _add_dry_run(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--dry-run", action="store_true", help="list what would be processed and where outputs go; compute nothing")


def _add_drift_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--fail-on-drift", action="store_true",
                        help="exit with status 5 when the anomaly rate or the score distribution is outside the calibration band, "
                             "or when drift cannot be checked (a model without calibration); without it, a warning line")


def _add_model_version(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model-version", type=version_number, metavar="N",
                        help="score against version N [default: the current one; a resumed run keeps the version it started with]")


def _check_nightly_inputs(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """nightly takes either --plan or all of --train, --model and --images."""
    given = [flag for flag in ("train", "model", "images") if getattr(args, flag) is not None]
    if args.plan and given:
        parser.error(f"nightly: --plan replaces {', '.join('--' + flag for flag in given)} (each line of the plan names its own)")
    if args.plan and args.model_version is not None:
        parser.error("nightly: --model-version is not taken with --plan: each line scores its model's current version "
                     "(`spade-batch model current` chooses it)")
    if not args.plan and len(given) < 3:
        parser.error("nightly: the arguments --train, --model and --images are required (or --plan)")


def version_number(text: str) -> int:
    """A model version number: 1 or more."""
    try:
        number = int(text)
    except ValueError:
        number = 0
    if number < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a version number (1, 2, ...; `spade-batch show MODEL_URI` lists them)")
    return number


def card_count(text: str) -> int:
    """How many cards a review page holds: 1 or more."""
    try:
        number = int(text)
    except ValueError:
        number = 0
    if number < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of cards (1 or more)")
    return number


def json_object(text: str) -> dict[str, Any]:
    """The value of --storage-options: a JSON object. A mistake is reported without the value, which may hold credentials."""
    try:
        value = json.loads(text)
    except json.JSONDecodeError as error:
        raise argparse.ArgumentTypeError(
            f"not valid JSON ({error.msg} at line {error.lineno}, column {error.colno}); "
            "the value is not shown as it may hold credentials"
        ) from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"must be a JSON object ({{...}}), got a JSON {type(value).__name__}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="spade-batch",
        description="SPADE anomaly detection on Ray: fit on normal images, score image archives, evaluate.",
    )
    parser.add_argument("--version", action="version", version=f"spade-batch {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    fit = commands.add_parser("fit", help="extract features of normal images and build a model")
    fit.add_argument("--train", required=True, metavar="URI", help="normal images: folder/prefix, glob, or manifest (.txt/.csv/.parquet)")
    fit.add_argument("--model", required=True, metavar="MODEL_URI", help="where the model artifact is written")
    _add_dry_run(fit)
    _add_settings_flags(fit, "fit")

    add = commands.add_parser("add", help="add normal images to a model: its next version, refitted from stored features")
    add.add_argument("--model", required=True, metavar="MODEL_URI", help="a model written by fit; its current version grows")
    added = add.add_mutually_exclusive_group(required=True)
    added.add_argument("--images", metavar="URI",
                       help="normal images: folder/prefix, glob, or manifest; only ids the model does not hold are extracted")
    added.add_argument("--verdicts", metavar="SHEET",
                       help="a review sheet (`show OUT --format csv`, filled in): adds its rows marked normal, each named by its URI's path")
    _add_dry_run(add)
    _add_settings_flags(add, "add")

    model = commands.add_parser("model", help="manage a model's versions: `model current MODEL_URI N` makes version N current")
    model_commands = model.add_subparsers(dest="model_command", required=True, metavar="ACTION")
    current = model_commands.add_parser("current", help="make version N current (until a newer one is published); nothing is deleted")
    current.add_argument("model_uri", metavar="MODEL_URI", help="a model written by fit")
    current.add_argument("version", type=version_number, metavar="N", help="the version to make current (`spade-batch show MODEL_URI` lists them)")
    _add_settings_flags(current, "model")

    score = commands.add_parser("score", help="score an image archive: masks, scores table, run.json")
    score.add_argument("--model", required=True, metavar="MODEL_URI", help="a model written by fit")
    _add_model_version(score)
    score.add_argument("--images", required=True, metavar="URI", help="images to score: folder/prefix, glob, or manifest")
    score.add_argument("--out", required=True, metavar="OUT_URI", help="where masks/, scores/, run.json and report.html are written")
    _add_drift_flag(score)
    _add_dry_run(score)
    _add_settings_flags(score, "score")

    nightly = commands.add_parser("nightly", help="fit if the model is missing, then score today's archive (or every line of a plan)")
    nightly.add_argument("--train", metavar="URI", help="normal images, used only when the model is missing (not with --plan)")
    nightly.add_argument("--model", metavar="MODEL_URI", help="the model; fitted first if missing (not with --plan)")
    nightly.add_argument("--images", metavar="URI", help="archive to score; {date} becomes the run date (YYYY-MM-DD) (not with --plan)")
    nightly.add_argument("--out", required=True, metavar="OUT_URI", help="output URI (with --plan: the plan's report); {date} becomes the run date")
    nightly.add_argument("--plan", metavar="YAML", help="many lines in one job: a plan file listing each line's name, train, model, images, out")
    nightly.add_argument("--date", metavar="YYYY-MM-DD", help="run date [default: today, UTC]")
    _add_model_version(nightly)
    nightly.add_argument("--review-top", type=card_count, metavar="N",
                         help="also write OUT/review.html, the review page of the N highest flagged images (`spade-batch review`), "
                              "linked from the run report (with --plan: each line's) [default: none]")
    _add_drift_flag(nightly)
    _add_dry_run(nightly)
    _add_settings_flags(nightly, "nightly")

    evaluate = commands.add_parser("evaluate", help="score an MVTec-layout test split and report metrics")
    evaluate.add_argument("--model", required=True, metavar="MODEL_URI", help="a model written by fit")
    evaluate.add_argument("--data", required=True, metavar="ROOT/CATEGORY", help="an MVTec AD layout category folder")
    evaluate.add_argument("--out", required=True, metavar="OUT", help="where metrics.json, the report and the scores go")
    _add_model_version(evaluate)
    resolution = evaluate.add_mutually_exclusive_group()
    resolution.add_argument(
        "--original-resolution", dest="original_resolution", action="store_const", const=True, default=None,
        help="pixel metrics at each image's original size: the default with full preprocessing; refused for paper",
    )
    resolution.add_argument(
        "--working-resolution-only", dest="original_resolution", action="store_const", const=False,
        help="pixel ROCAUC and PRO at the working size only (faster); decisions still compare the masks as written",
    )
    evaluate.add_argument("--every", type=int, default=1, metavar="N", help="evaluate every N-th test image of each label, for quick looks [default: 1]")
    _add_dry_run(evaluate)
    _add_settings_flags(evaluate, "evaluate")

    thresholds = commands.add_parser("thresholds", help="set a model's thresholds from labelled images: its next version, before/after printed")
    thresholds.add_argument("--model", required=True, metavar="MODEL_URI", help="a model written by fit; its current version's thresholds are set")
    thresholds.add_argument("--labelled", required=True, metavar="DATA",
                            help="labelled images: an MVTec-layout folder (test/good, test/<defect>, ground_truth/ masks; no train/ needed), "
                                 "or a review sheet (.csv, `show OUT --format csv` filled in: image threshold only, no masks)")
    thresholds.add_argument("--target", default="best_f1", metavar="TARGET",
                            help="the image threshold's target: best_f1, or recall=R (the highest threshold flagging a share R of the "
                                 "defective images; the FPR it costs is printed) [default: best_f1]; the pixel threshold is at best SegF1")
    thresholds.add_argument("--out", metavar="OUT_URI",
                            help="keep the labelled images' scoring run here [default: a temporary local folder, removed afterwards; "
                                 "on a cluster of several nodes give a location every node reaches]")
    thresholds.add_argument("--dry-run", action="store_true", help="score and print the decisions before and after; publish nothing")
    _add_settings_flags(thresholds, "thresholds")

    demo = commands.add_parser("demo", help="generate a synthetic dataset, then fit, score and evaluate on a local Ray")
    demo.add_argument("--out", default="demo-output", metavar="DIR", help="working folder [default: demo-output]")
    _add_dry_run(demo)
    _add_settings_flags(demo, "demo")

    data = commands.add_parser("make-demo-data", help="write the synthetic inspection dataset (MVTec layout)")
    data.add_argument("out", metavar="OUT", help="folder to create")
    data.add_argument("--seed", type=int, default=0, help="dataset seed [default: 0]")
    data.add_argument("--kind", choices=("texture", "aligned"), default="texture",
                      help="texture: a grained surface, images of varying sizes (category tiles); aligned: a part at a "
                           "fixed place with small jitter, 128 x 128 images (category parts) [default: texture]")

    config = commands.add_parser("config", help="show the effective configuration or the documented keys")
    config.add_argument("--show", action="store_true", help="print the effective settings as YAML")
    config.add_argument("--keys", action="store_true", help="print every key with its type, default and meaning")
    config.add_argument("--config", metavar="YAML", help="settings file to merge over the defaults")

    show = commands.add_parser("show", help="summarise a model or a run's outputs (local or s3://)")
    show.add_argument("uri", metavar="URI", help="a model (MODEL_URI, holding spade.json) or a run (OUT_URI, holding run.json)")
    show.add_argument("--format", dest="output", choices=("table", "json", "csv"), default="table",
                      help="tables; one JSON object; or csv: a run's review sheet of its N highest flagged images (id, uri, "
                           "image_score, mask_uri and an empty verdict column for reviewers: normal or defect) [default: table]")
    show.add_argument("--json", dest="output", action="store_const", const="json", help="the same as --format json")
    show.add_argument("--top", type=int, default=10, metavar="N", help="a run's N highest-scoring images [default: 10]")
    show.add_argument("--verdicts", metavar="SHEET",
                      help="a run's review sheet filled in: flagged images reviewed, confirmed defects, false alarms, precision")
    _add_settings_flags(show, "show")

    review = commands.add_parser("review", help="write a run's review page: its flagged images to mark normal or defect, one HTML file")
    review.add_argument("uri", metavar="OUT_URI", help="a finished run (holding run.json)")
    cards = review.add_mutually_exclusive_group()
    cards.add_argument("--top", type=card_count, default=100, metavar="N", help="the N highest-scoring flagged images [default: 100]")
    cards.add_argument("--all-flagged", action="store_true", help="every flagged image (a large run makes a large page)")
    review.add_argument("--out", metavar="FILE", help="where the page is written (local path or URI) [default: OUT_URI/review.html]")
    _add_settings_flags(review, "review")
    return parser


def settings_from(args: argparse.Namespace) -> tuple[Settings, frozenset[str]]:
    """Settings from --config and flags, and the keys the user set explicitly."""
    keys = {spec.name for spec in dataclasses.fields(Settings)}
    overrides = {key: value for key, value in vars(args).items() if key in keys and value is not None}
    return load_request(getattr(args, "config", None), overrides, args.command)


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command == "nightly":
        _check_nightly_inputs(parser, args)
    # Known before the settings load, so that even an error loading them is redacted; _run adds the file's.
    secrets = set(secret_values(getattr(args, "storage_options", None)))
    command = " ".join(filter(None, (args.command, getattr(args, "model_command", None))))  # `model current`, in full
    try:
        return _run(args, secrets)
    except KeyboardInterrupt:
        print(f"spade-batch {command}: {MEANING[ExitCode.INTERRUPTED]}", file=sys.stderr)
        return int(ExitCode.INTERRUPTED)
    except Exception as error:  # one line here, the (redacted) traceback in the debug log
        log.debug("traceback", exc_info=True)
        code, message = explain(error)
        print(redact(f"spade-batch {command}: {message}", secrets), file=sys.stderr)
        return int(code)


def _run(args: argparse.Namespace, secrets: set[str]) -> int:
    """Run the command; adds the credentials of the effective settings to ``secrets`` once they are loaded."""
    from spade_batch import commands, tables

    if args.command == "make-demo-data":
        from spade_batch.formats.datasets import make_aligned_data, make_demo_data

        print((make_aligned_data if args.kind == "aligned" else make_demo_data)(args.out, seed=args.seed))
        return 0
    if args.command == "config":
        return tables.show_config(args.config, args.keys)
    settings, explicit = settings_from(args)
    secrets.update(secret_values(settings.fsspec_options()))
    configure_logging(settings.log_level, secrets)
    handlers: dict[str, Any] = {
        "fit": lambda: commands.fit(args.train, args.model, settings, args.dry_run),
        "add": lambda: commands.add(args.images, args.model, settings, explicit, args.dry_run, args.verdicts),
        "model": lambda: commands.make_current(args.model_uri, args.version, settings),
        "score": lambda: commands.score(args.model, args.images, args.out, settings, explicit, args.dry_run, args.fail_on_drift,
                                        args.model_version),
        "evaluate": lambda: commands.evaluate(args.model, args.data, args.out, settings, explicit, args.original_resolution, args.every, args.dry_run,
                                              args.model_version),
        "nightly": lambda: (
            commands.nightly_plan(args.plan, args.out, args.date, settings, explicit, args.dry_run, args.fail_on_drift,
                                  args.review_top) if args.plan
            else commands.nightly(args.train, args.model, args.images, args.out, args.date, settings, explicit, args.dry_run,
                                  args.fail_on_drift, args.model_version, args.review_top)
        ),
        "thresholds": lambda: commands.thresholds(args.model, args.labelled, settings, explicit, args.target, args.out, args.dry_run),
        "demo": lambda: commands.demo(args.out, settings, explicit, args.dry_run),
        "show": lambda: tables.show(args.uri, settings, args.top, args.output, args.verdicts),
        "review": lambda: commands.review(args.uri, settings, None if args.all_flagged else args.top, args.out),
    }
    return handlers[args.command]()


if __name__ == "__main__":
    sys.exit(main())
