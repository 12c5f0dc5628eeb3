"""`nightly --plan`: the plan file's checks, and lines run in process by stand-ins. Real plans on a local Ray
are in tests/integration/test_nightly_plan.py."""

from __future__ import annotations

import datetime
import json
import logging
import re
from pathlib import Path

import pytest
import yaml

from spade_batch import cli
from spade_batch.config import ConfigError, Settings
from spade_batch.exit_codes import ExitCode
from spade_batch.formats.text import BLANK
from spade_batch.logs import configure_logging
from spade_batch.nightly_plan import Line, check_outputs, format_table, load_plan, run_plan

DAY = "2026-01-02"


def write_plan(path: Path, lines: list[dict]) -> Path:
    path.write_text(yaml.safe_dump({"lines": lines}, sort_keys=False))
    return path


def line_entry(**changes: object) -> dict:
    return {"name": "a", "train": "/t", "model": "/m", "images": "/i/{date}", "out": "/o/{name}/{date}", **changes}


def test_a_plan_line_takes_the_run_settings_with_its_own_over_them(tmp_path: Path) -> None:
    plan = write_plan(tmp_path / "p.yaml", [line_entry(), line_entry(name="b", settings={"image_fpr": 0.2})])
    lines = load_plan(str(plan), Settings(k=7), frozenset({"k"}))
    assert [(line.name, line.settings.k, line.settings.image_fpr) for line in lines] == [("a", 7, 0.01), ("b", 7, 0.2)]
    assert lines[1].explicit == {"k", "image_fpr"} and lines[0].out == "/o/a/{date}"


@pytest.mark.parametrize("lines, message", [
    ([line_entry(camera="3")], r"line 1: unknown keys camera"),
    ([line_entry(), {"name": "b", "train": "/t"}], r"line 2: missing model, images, out"),
    ([line_entry(), line_entry(settings={"k": "many"})], r"line 2 \(a\): k in .*expected int"),
    ([line_entry(settings={"kk": 3})], r"line 1 \(a\): unknown key 'kk'"),
    ([line_entry(), line_entry()], r"line names must be unique"),
    ([line_entry(name="../up")], r"name '../up' must be letters"),
    ([], r"non-empty list of lines"),
])
def test_a_bad_plan_is_refused_before_any_line_runs_naming_the_line(tmp_path: Path, lines: list, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        load_plan(str(write_plan(tmp_path / "p.yaml", lines)), Settings(), frozenset())


def test_plan_and_single_line_flags_do_not_mix(capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit) as exited:
        cli.main(["nightly", "--plan", "p.yaml", "--train", "/t", "--out", "/o"])
    assert exited.value.code == ExitCode.USAGE
    assert "--plan replaces --train" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli.main(["nightly", "--model", "/m", "--out", "/o"])
    assert "--train, --model and --images are required (or --plan)" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli.main(["nightly", "--plan", "p.yaml", "--model-version", "2", "--out", "/o"])
    assert "--model-version is not taken with --plan: each line scores its model's current version" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli.main(["nightly", "--model", "/m", "--images", "/i", "--model-version", "2", "--out", "/o"])
    assert "--train, --model and --images are required (or --plan)" in capsys.readouterr().err


def test_the_summary_table_aligns_columns() -> None:
    text = format_table([{"line": "a", "exit": 0}, {"line": "longer", "exit": 75}])
    assert text.splitlines() == ["line    exit", "------  ----", "a       0", "longer  75"]


def nested_aliases(depth: int) -> str:
    """A plan of a few hundred bytes whose line settings expand to 9 ** depth values through nested aliases."""
    levels = ["a0: &a0 [x, x, x, x, x, x, x, x, x]"]
    levels += [f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 9)}]" for i in range(1, depth + 1)]
    return "lines:\n  - {name: a, train: /t, model: /m, images: /i, out: /o, settings: {storage_options: {" + ", ".join(levels) + "}}}\n"


@pytest.mark.parametrize("text, alias", [
    (nested_aliases(9), "*a0 (text line 2)"),  # 387 million values
    ("lines:\n  - {name: a, train: /t, model: /m, images: /i, out: /o, settings: &common {k: 5}}\n"
     "  - {name: b, train: /t, model: /m, images: /i, out: /p, settings: *common}\n", "*common (text line 3)"),
])
def test_a_plan_with_yaml_aliases_is_refused_before_they_expand(tmp_path: Path, text: str, alias: str) -> None:
    plan = tmp_path / "p.yaml"
    plan.write_text(text)
    with pytest.raises(ConfigError, match=re.escape(f"YAML alias {alias}: aliases are refused in a plan")):
        load_plan(str(plan), Settings(), frozenset())


def plan_lines(tmp_path: Path, outs: list[str]) -> list[Line]:
    """Lines a, b, ... of a plan file under tmp_path, with these outs."""
    entries = [line_entry(name=chr(ord("a") + i), out=out) for i, out in enumerate(outs)]
    return load_plan(str(write_plan(tmp_path / "p.yaml", entries)), Settings(), frozenset())


@pytest.mark.parametrize("outs, plan_out, message", [
    (["{root}/r/{date}", "{root}/r/{date}/"], "{root}/p", r"line b's out \S+/r/2026-01-02/ is the same place as line a's out"),
    (["{root}/r/x-{date}", "{root}/r/x-2026-01-02"], "{root}/p", r"line b's out \S+ is the same place as line a's out"),
    (["file://{root}/r/a/../b", "{root}/r/b/{name}"], "{root}/p", r"line b's out \S+/r/b/b is inside line a's out file://"),
    (["{root}/link/{name}", "{root}/real/a"], "{root}/p", r"line b's out \S+/real/a is the same place as line a's out \S+/link/a"),
    (["s3://bucket/r/{name}", "s3a://bucket/r/a/"], "{root}/p", r"line b's out s3a://bucket/r/a/ is the same place as line a's out s3://"),
    (["{root}/o/{name}", "{root}/p/"], "{root}/p", r"line b's out \S+/p/ is the same place as the plan's --out"),
    (["{root}/o/{name}", "{root}/p/{name}/{date}"], "{root}/p", r"line b's out \S+/p/b/2026-01-02 is inside the plan's --out"),
    (["{root}/o/{name}", "{root}"], "{root}/p", r"line b's out \S+ holds the plan's --out"),
])
def test_a_plan_whose_writers_share_a_place_is_refused_naming_both(tmp_path: Path, outs: list[str], plan_out: str, message: str) -> None:
    (tmp_path / "real").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "real")
    lines = plan_lines(tmp_path, [out.replace("{root}", str(tmp_path)) for out in outs])
    with pytest.raises(ConfigError, match=message + ".*every line needs an out of its own"):
        check_outputs(lines, plan_out.replace("{root}", str(tmp_path)), DAY)


def test_outs_that_only_share_a_prefix_are_apart(tmp_path: Path) -> None:
    lines = plan_lines(tmp_path, [str(tmp_path / "r" / "line1"), str(tmp_path / "r" / "line10"), str(tmp_path / "r" / "line1-{date}")])
    check_outputs(lines, str(tmp_path / "r" / "line"), DAY)


def test_a_plan_whose_lines_share_an_out_is_refused_before_any_line_runs(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    out = str(tmp_path / "results" / "{date}")  # no {name}: both lines would write there
    plan = write_plan(tmp_path / "p.yaml", [line_entry(name="first", out=out), line_entry(name="second", out=out)])
    code = cli.main(["nightly", "--plan", str(plan), "--out", str(tmp_path / "plan"), "--date", DAY])
    assert code == ExitCode.USAGE
    assert "line second's out" in capsys.readouterr().err.replace(str(tmp_path), "")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["p.yaml"]  # no line ran, no plan page


def write_run(out: Path, started: datetime.datetime, images: int) -> None:
    """A run.json and report.html in out, as a run started at `started` with `images` images writes them."""
    out.mkdir(parents=True, exist_ok=True)
    run = {"images": images, "scored": images, "failed": 0, "anomalous": 1, "started": started.isoformat()}
    (out / "run.json").write_text(json.dumps(run))
    (out / "report.html").write_text("<html></html>")


def test_each_line_is_judged_on_tonights_run_alone_and_no_failure_stops_the_next(
    tmp_path: Path, capsys: pytest.CaptureFixture, restore_logging: None
) -> None:
    """a raises with c's secret in its message; b writes nothing tonight over last night's run.json; c's run.json
    cannot be read; d runs. Only d shows figures and a link; c's secret is nowhere."""
    secret = "c-only-session-token-271828"
    entries = [line_entry(name=name, out=str(tmp_path / "results" / name)) for name in "abcd"]
    entries[2]["settings"] = {"storage_options": {"token": secret}}
    lines = load_plan(str(write_plan(tmp_path / "p.yaml", entries)), Settings(), frozenset())
    write_run(tmp_path / "results" / "b", datetime.datetime(2025, 1, 1, tzinfo=datetime.timezone.utc), 99)
    configure_logging("INFO")

    def run_line(line: Line) -> int:
        out = tmp_path / "results" / line.name
        if line.name == "a":
            raise OSError(f"could not reach http://gateway/{secret}/models")
        if line.name == "c":
            out.mkdir()
            (out / "run.json").write_text("{cut short")
        if line.name == "d":
            write_run(out, datetime.datetime.now(datetime.timezone.utc), 5)
        return 0 if line.name != "b" else ExitCode.RETRYABLE  # b: its fit could not read every image

    code = run_plan(lines, str(tmp_path / "plan"), DAY, None, False, run_line)

    assert code == ExitCode.LINES_FAILED
    summary = json.loads((tmp_path / "plan" / "plan.json").read_text())
    rows = {row["line"]: row for row in summary["lines"]}
    assert [rows[name]["exit"] for name in "abcd"] == [1, 75, 1, 0]
    assert [rows[name]["images"] for name in "abcd"] == [BLANK, BLANK, BLANK, 5]
    assert rows["a"]["error"] == "OSError: could not reach http://gateway/***/models"
    assert rows["c"]["error"].startswith("JSONDecodeError")
    assert summary["reports"] == {"d": "../results/d/report.html"}
    printed = capsys.readouterr()
    page = (tmp_path / "plan" / "report.html").read_text()
    for text in (printed.out, printed.err, json.dumps(summary), page):
        assert secret not in text


def test_a_lines_log_level_holds_for_that_line_only(tmp_path: Path, capfd: pytest.CaptureFixture, restore_logging: None) -> None:
    entries = [line_entry(name="quiet", out="/o/quiet"), line_entry(name="loud", out="/o/loud", settings={"log_level": "DEBUG"})]
    lines = load_plan(str(write_plan(tmp_path / "p.yaml", entries)), Settings(), frozenset())
    configure_logging("INFO")
    log = logging.getLogger("spade_batch.test")

    def run_line(line: Line) -> int:
        log.debug("detail of %s", line.name)
        return 0

    run_plan(lines, str(tmp_path / "plan"), DAY, None, True, run_line)
    err = capfd.readouterr().err
    assert "detail of loud" in err and "detail of quiet" not in err
    assert logging.getLogger().level == logging.INFO


def test_a_line_that_met_a_transient_storage_failure_is_retryable_not_failed(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """E.g. its store was down when the line started: the plan exits 75, re-run it; another line's success stands."""
    from spade_batch.formats.retry import TransientStorageError
    from spade_batch.nightly_plan import run_plan

    plan = write_plan(tmp_path / "p.yaml", [line_entry(out=str(tmp_path / "a")), line_entry(name="b", out=str(tmp_path / "b"))])
    lines = load_plan(str(plan), Settings(), frozenset())

    def run_line(line) -> int:
        if line.name == "a":
            raise TransientStorageError(11, "Cannot list: still failing for a transient reason", "s3://b/imgs")
        return 0

    assert run_plan(lines, str(tmp_path / "plan"), "2026-11-29", None, False, run_line) == ExitCode.RETRYABLE
    assert "a     75    failed" in capsys.readouterr().out
