"""Many production lines in one nightly job: `spade-batch nightly --plan lines.yaml --out PLAN_OUT`.

A plan file lists the lines; `{date}` in any URI becomes the run date, `{name}` the line's name:

    lines:
      - name: line3
        train: s3://factory/line3/normal/          # used only when the model is missing
        model: s3://factory/models/line3
        images: s3://factory/line3/archive/{date}/
        out: s3://factory/line3/results/{date}
        settings: {image_fpr: 0.02}                # optional: over --config and the flags

Each line is fitted if its model is missing, then scored, one after the other on the one cluster.
Everything about a line (its run, reading its run.json, linking its report) happens inside its own
error handling: a line that fails is recorded and the next one runs. A line's figures come only from
the run.json this invocation's run of it wrote (its `started` time), never from an older run found in
its out. A summary table ends the run, and PLAN_OUT gets report.html (linking each line's run report)
and plan.json (the same rows). Every line's credentials are masked in every message and log line.

Refused before any line runs (ConfigError): YAML aliases (`*name`: a few lines could expand to
billions of values); two lines writing to one place, or a line's out that is PLAN_OUT, holds it or
lies inside it (after {date} and {name} are replaced); anything malformed. A line's `log_level`
applies to that line's run; the plan's own messages (which line runs, which failed) log at the plan's level.
"""

from __future__ import annotations

import datetime
import itertools
import json
import logging
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import yaml

from spade_batch.config import ConfigError, Settings
from spade_batch.exit_codes import MEANING, ExitCode, plan_exit_code, user_error
from spade_batch.formats import retry, storage
from spade_batch.formats.layout import Outputs, PlanOutputs
from spade_batch.formats.text import BLANK, first_line, redact
from spade_batch.logs import add_secrets, logging_at, secret_values
from spade_batch.reports.run_report import render_plan_report, report_link

log = logging.getLogger(__name__)

LINE_KEYS = ("name", "train", "model", "images", "out")
NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")


@dataclass(frozen=True)
class Line:
    """One production line: its URIs ({date} still in them) and its settings (the run's, with the line's own over them)."""

    name: str
    train: str
    model: str
    images: str
    out: str
    settings: Settings
    explicit: frozenset[str]


@dataclass(frozen=True)
class LineResult:
    """What one line did tonight."""

    line: Line
    code: ExitCode
    error: str  # why the line failed ("" when it ran)
    run: dict[str, Any]  # the run.json its run wrote tonight ({} when none)
    report: str  # how the plan page links its run report ("" when it wrote none tonight)


def load_plan(uri: str, settings: Settings, explicit: frozenset[str]) -> list[Line]:
    """The lines of the plan file at uri, every line's settings validated before any line runs.

    Raises ConfigError naming the file, the line and the key for anything malformed.
    """
    try:
        text = storage.read_text(uri, settings.fsspec_options())
        _refuse_aliases(text, uri)
        loaded = yaml.safe_load(text)
    except FileNotFoundError:
        raise ConfigError(f"plan file {uri} does not exist") from None
    except yaml.YAMLError as error:
        raise ConfigError(f"plan file {uri} is not valid YAML: {str(error).splitlines()[0]}") from None
    if not isinstance(loaded, dict) or set(loaded) != {"lines"} or not isinstance(loaded["lines"], list) or not loaded["lines"]:
        raise ConfigError(f"plan file {uri} must be a mapping with one key, lines: a non-empty list of lines")
    lines = [_line(entry, index, uri, settings, explicit) for index, entry in enumerate(loaded["lines"], 1)]
    names = [line.name for line in lines]
    if len(set(names)) != len(names):
        raise ConfigError(f"plan file {uri}: line names must be unique, got {', '.join(names)}")
    return lines


def _refuse_aliases(text: str, uri: str) -> None:
    """Raise ConfigError at the plan's first YAML alias: a 1 KB file of nested aliases expands to billions of values.

    The file's events are read one by one (linear in its length); nothing is built from them.
    """
    alias = next((event for event in yaml.parse(text, Loader=yaml.SafeLoader) if isinstance(event, yaml.AliasEvent)), None)
    if alias is not None:
        raise ConfigError(
            f"plan file {uri}: YAML alias *{alias.anchor} (text line {alias.start_mark.line + 1}): aliases are refused in a plan "
            "(nested ones expand to billions of values); write each value out, and put settings every line shares in --config"
        )


def check_outputs(lines: list[Line], out: str, day: str) -> None:
    """Refuse the plan (ConfigError naming both) when two of its writers share a place: the plan's out and every
    line's out (its {date} replaced) must each be apart from the others, neither the same nor inside another."""
    writers = [("the plan's --out", out), *((f"line {line.name}'s out", line.out.replace("{date}", day)) for line in lines)]
    for (first, first_uri), (second, second_uri) in itertools.combinations(writers, 2):
        relation = storage.relation(second_uri, first_uri)
        if relation:
            raise ConfigError(f"{second} {second_uri} {relation} {first} {first_uri}: every line needs an out of its own, "
                              "apart from the other lines' and from the plan's --out")


def _line(entry: Any, index: int, uri: str, settings: Settings, explicit: frozenset[str]) -> Line:
    where = f"plan file {uri}, line {index}"
    if not isinstance(entry, dict):
        raise ConfigError(f"{where}: must be a mapping with keys {', '.join(LINE_KEYS)} and optional settings")
    unknown = set(entry) - {*LINE_KEYS, "settings"}
    missing = [key for key in LINE_KEYS if key not in entry]
    if unknown or missing:
        problem = f"unknown keys {', '.join(sorted(unknown))}" if unknown else f"missing {', '.join(missing)}"
        raise ConfigError(f"{where}: {problem}; a line has {', '.join(LINE_KEYS)} and optional settings")
    bad = [key for key in LINE_KEYS if not isinstance(entry[key], str) or not entry[key]]
    if bad:
        raise ConfigError(f"{where}: {', '.join(bad)} must be non-empty strings")
    name = entry["name"]
    if not NAME.fullmatch(name):
        raise ConfigError(f"{where}: name {name!r} must be letters, digits, '.', '_' or '-' (it names the line's outputs)")
    own = entry.get("settings") or {}
    if not isinstance(own, dict):
        raise ConfigError(f"{where} ({name}): settings must be a mapping of key: value")
    try:
        line_settings = settings.replace(**own)
    except ConfigError as error:
        raise ConfigError(f"{where} ({name}): {error}") from None
    except TypeError:
        raise ConfigError(f"{where} ({name}): settings keys must be setting names (`spade-batch config --keys`)") from None
    uris = {key: entry[key].replace("{name}", name) for key in LINE_KEYS[1:]}
    return Line(name=name, settings=line_settings, explicit=explicit | frozenset(own), **uris)


def run_plan(
    lines: list[Line], out: str, day: str, options: storage.StorageOptions, dry_run: bool, run_line: Callable[[Line], int]
) -> ExitCode:
    """Run every line with run_line (its exit status), whatever the others did; print the summary, write the plan page."""
    secrets = secret_values(options).union(*(secret_values(line.settings.fsspec_options()) for line in lines))
    add_secrets(secrets)
    page = PlanOutputs(out).report
    results = [_run_line(line, day, page, dry_run, run_line, secrets) for line in lines]
    status = plan_exit_code([result.code for result in results])
    rows = [summary_row(result) for result in results]
    print(f"\nplan: {len(lines)} lines, exit status {int(status)} ({MEANING[status].split(':')[0]})")
    print(format_table(rows))
    if not dry_run:
        _write_plan_outputs(results, rows, out, day, options)
    return status


def _run_line(line: Line, day: str, page: str, dry_run: bool, run_line: Callable[[Line], int], secrets: frozenset[str]) -> LineResult:
    """One line at its own log level, with all that is read about it (its run.json, its report's link) inside its
    error handling: whatever fails is recorded as this line's failure, secrets masked, and the plan goes on."""
    log.info("plan: line %s", line.name)
    began = datetime.datetime.now(datetime.timezone.utc)
    with logging_at(line.settings.log_level):
        try:
            code = ExitCode(run_line(line))
            outputs = Outputs(line.out.replace("{date}", day))
            run = {} if dry_run else _tonights_run(outputs.run_json, began, line.settings.fsspec_options())
            return LineResult(line, code, "", run, redact(report_link(page, outputs.report), secrets) if run else "")
        except Exception as failure:  # noqa: BLE001 - one line's failure must not stop the others
            log.debug("line %s failed", line.name, exc_info=True)
            cause = user_error(failure)  # a failed Ray task's own exception, not Ray's wrapper
            code = ExitCode.RETRYABLE if retry.is_transient(cause) else ExitCode.FAILED  # a re-run may pass: not a failed line
            error = redact(f"{type(cause).__name__}: {first_line(cause)}", secrets)
            log.error("plan: line %s failed: %s", line.name, error)
            return LineResult(line, code, error, {}, "")


def _tonights_run(uri: str, began: datetime.datetime, options: storage.StorageOptions) -> dict[str, Any]:
    """The run.json at uri when a run started at or after `began` wrote it, else {} (none, or an older run's)."""
    if not storage.exists(uri, options):
        return {}
    run = json.loads(storage.read_text(uri, options))
    started = run.get("started")
    return run if started and datetime.datetime.fromisoformat(started) >= began else {}


def summary_row(result: LineResult) -> dict[str, object]:
    """One line's row of the summary table and plan page."""
    run = result.run
    drift = run.get("drift", {})
    return {
        "line": result.line.name,
        "exit": int(result.code),
        "status": "failed" if result.error else MEANING[result.code].split(":")[0],
        "images": run.get("images", BLANK),
        "scored": run.get("scored", BLANK),
        "failed": run.get("failed", BLANK),
        "anomalous": run.get("anomalous", BLANK),
        "drift": ("ALARM" if drift["alarm"] else "no" if drift.get("checked", True) else "unknown") if drift else BLANK,
        "error": result.error,
    }


def format_table(rows: list[dict[str, object]]) -> str:
    """Rows of {column: value} as aligned text columns (every row has the same keys)."""
    columns = list(rows[0])
    cells = [[str(row[column]) for column in columns] for row in rows]
    widths = [max(len(column), *(len(row[i]) for row in cells)) for i, column in enumerate(columns)]
    lines = ["  ".join(text.ljust(width) for text, width in zip(row, widths)).rstrip() for row in [columns, *cells]]
    return "\n".join([lines[0], "  ".join("-" * width for width in widths), *lines[1:]])


def _write_plan_outputs(results: list[LineResult], rows: list[dict[str, object]], out: str, day: str, options: storage.StorageOptions) -> None:
    page_uri = PlanOutputs(out).report
    reports = {result.line.name: result.report for result in results if result.report}
    storage.write_text(page_uri, render_plan_report(f"spade-batch nightly plan, {day}", rows, reports), options)
    storage.write_text(PlanOutputs(out).plan_json, json.dumps({"date": day, "lines": rows, "reports": reports}, indent=2), options)
    print(f"plan report: {page_uri}")
