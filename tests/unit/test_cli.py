"""The command line in process: a flag per setting, config --show, errors, dry runs, the command-line reference page.

That no credential reaches the output of a real process is in tests/integration/test_cli.py.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import json
import pathlib

import numpy as np
import pytest
import yaml
from PIL import Image

from spade_batch import cli
from spade_batch.config import Settings, group_of, groups_of, keys_of, load_settings

REPO = pathlib.Path(__file__).resolve().parents[2]
SETTINGS_COMMANDS = ("fit", "add", "score", "evaluate", "nightly", "demo", "show", "thresholds")
REQUIRED = {
    "show": ["uri"],
    "fit": ["--train", "t", "--model", "m"],
    "add": ["--model", "m", "--images", "i"],
    "score": ["--model", "m", "--images", "i", "--out", "o"],
    "evaluate": ["--model", "m", "--data", "d", "--out", "o"],
    "nightly": ["--train", "t", "--model", "m", "--images", "i", "--out", "o"],
    "demo": [],
    "thresholds": ["--model", "m", "--labelled", "d"],
}
# A valid non-default value for every key; the test below fails when a key is added without one.
NON_DEFAULTS = {
    "backbone": "resnet18",
    "weights": "random",
    "seed": 3,
    "image_size": 64,
    "preprocess": "paper",
    "k": 4,
    "kappa": 2,
    "sigma": 1.5,
    "index": "ivf",
    "ivf_lists": 8,
    "image_score": "combined",
    "map_top": 0.05,
    "layer_normalise": True,
    "match_radius": 8,
    "feature_pool": 3,
    "layers": "2,3",
    "calibration_images": "held_out",
    "calibration_fraction": 0.25,
    "calibration_sample": 50,
    "image_estimator": "pot",
    "suspects": "leave_out",
    "pixel_rule": "region",
    "min_region": 12,
    "gate_masks": False,
    "region_fpr": 0.02,
    "gate_fpr": 0.1,
    "keep_size_outliers": True,
    "image_fpr": 0.05,
    "pixel_quantile": 0.99,
    "image_threshold": 1.25,
    "pixel_threshold": 0.5,
    "shard_size": 3,
    "batch_size": 2,
    "device": "cpu",
    "gpus_per_task": 0.5,
    "cpus_per_task": 2.0,
    "chunk_mib": 4,
    "precision": "bfloat16",
    "model_workers": 3,
    "max_pixels": 1_000_000,
    "save_maps": True,
    "save_overlays": True,
    "overwrite": True,
    "endpoint_url": "http://127.0.0.1:9000",
    "storage_options": {"anon": True},
    "ray_address": "ray://head:10001",
    "log_level": "DEBUG",
}


def flags(values: dict) -> list[str]:
    argv = []
    for key, value in values.items():
        flag = "--" + key.replace("_", "-")
        if isinstance(value, bool):
            argv.append(flag if value else "--no-" + flag[2:])
        else:
            argv += [flag, json.dumps(value) if isinstance(value, dict) else str(value)]
    return argv


def test_non_default_values_cover_every_key_and_differ_from_defaults():
    defaults = Settings()
    assert set(NON_DEFAULTS) == {spec.name for spec in dataclasses.fields(Settings)}
    assert all(getattr(defaults, key) != value for key, value in NON_DEFAULTS.items())


def used_keys(command: str) -> set[str]:
    return {key for group in groups_of(command) for key in keys_of(group.name)}


@pytest.mark.parametrize("command", SETTINGS_COMMANDS)
def test_every_setting_of_the_commands_groups_has_a_flag(command):
    values = {key: value for key, value in NON_DEFAULTS.items() if key in used_keys(command)}
    args = cli.build_parser().parse_args([command, *REQUIRED[command], *flags(values)])
    settings, explicit = cli.settings_from(args)
    assert settings == Settings(**values)
    assert explicit == set(values)


def offered_flags(command: str) -> set[str]:
    """The long options `spade-batch <command> --help` shows."""
    parser = cli.build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices[command]
    return {option for action in sub._actions if action.help != argparse.SUPPRESS for option in action.option_strings if option.startswith("--")}


COMMAND_OPTIONS = {
    "fit": {"--train", "--model", "--dry-run"},
    "add": {"--model", "--images", "--verdicts", "--dry-run"},
    "score": {"--model", "--model-version", "--images", "--out", "--fail-on-drift", "--dry-run"},
    "evaluate": {"--model", "--data", "--out", "--original-resolution", "--working-resolution-only", "--every", "--model-version", "--dry-run"},
    "nightly": {"--train", "--model", "--images", "--out", "--plan", "--date", "--fail-on-drift", "--model-version", "--review-top", "--dry-run"},
    "demo": {"--out", "--dry-run"},
    "show": {"--json", "--format", "--top", "--verdicts"},
    "review": {"--top", "--all-flagged", "--out"},
    "thresholds": {"--model", "--labelled", "--target", "--out", "--dry-run"},
}
"""Each command's own options besides --help, --config and its settings' flags."""


@pytest.mark.parametrize("command", SETTINGS_COMMANDS)
def test_each_commands_flags_are_exactly_its_groups(command):
    setting_flags = {"--" + key.replace("_", "-") for key in used_keys(command)}
    bool_negations = {"--no-" + flag[2:] for flag in setting_flags if isinstance(NON_DEFAULTS[flag[2:].replace("-", "_")], bool)}
    assert offered_flags(command) == {"--help", "--config", *COMMAND_OPTIONS[command], *setting_flags, *bool_negations}
    help_text = load_reference_script().command_help(command)
    for group in groups_of(command):
        assert f"\n{group.name} ({group.title}):\n" in help_text


def test_score_offers_no_method_flag_and_evaluate_no_hold_out():
    assert not offered_flags("score") & {"--k", "--backbone", "--calibration-fraction", "--image-fpr", "--sigma"}
    assert not offered_flags("evaluate") & {"--calibration-fraction", "--image-fpr", "--pixel-quantile", "--k"}
    assert {"--image-threshold", "--shard-size", "--save-maps", "--endpoint-url"} <= offered_flags("score")


@pytest.mark.parametrize("command", SETTINGS_COMMANDS)
def test_a_flag_of_a_group_the_command_does_not_use_is_a_one_line_error_naming_its_commands(command, capsys):
    for key, value in NON_DEFAULTS.items():
        if key in used_keys(command):
            continue
        group = group_of(key)
        assert cli.main([command, *REQUIRED[command], *flags({key: value}), "--dry-run"][: None if command != "show" else -1]) == 2
        captured = capsys.readouterr()
        flag = "--" + key.replace("_", "-")
        assert captured.err == (
            f"spade-batch {command}: error: {command} does not take {flag}: a {group.name} setting ({group.title}), "
            f"used by {', '.join(group.commands)}\n"
        )
        assert captured.out == ""


def test_a_config_file_with_another_commands_group_is_refused_naming_the_key(tmp_path, capsys):
    nightly = str(REPO / "jobs" / "nightly.yaml")
    assert cli.main(["score", *REQUIRED["score"], "--config", nightly, "--dry-run"]) == 2
    assert capsys.readouterr().err == (
        f"spade-batch score: error: score does not take backbone (in {nightly}): a method setting "
        "(fixed at fit and recorded in the model card; score and evaluate use the model's), used by fit, nightly, demo\n"
    )


def test_flags_override_the_config_file_and_no_flag_turns_a_file_bool_off(tmp_path):
    path = tmp_path / "s.yaml"
    path.write_text("thresholds:\n  image_threshold: 9\nrun:\n  shard_size: 2\noutputs:\n  save_overlays: true\n  save_maps: true\n")
    argv = ["score", *REQUIRED["score"], "--config", str(path), "--image-threshold", "5", "--no-save-overlays"]
    settings, explicit = cli.settings_from(cli.build_parser().parse_args(argv))
    assert (settings.image_threshold, settings.shard_size, settings.save_overlays, settings.save_maps) == (5.0, 2, False, True)
    assert explicit == {"image_threshold", "shard_size", "save_overlays", "save_maps"}


def test_unset_flags_are_not_explicit():
    settings, explicit = cli.settings_from(cli.build_parser().parse_args(["fit", *REQUIRED["fit"]]))
    assert settings == Settings() and explicit == frozenset()


def test_config_show_prints_yaml_that_loads_back(tmp_path, capsys):
    path = tmp_path / "s.yaml"
    path.write_text("backbone: resnet18\nk: 7\nsigma: 3\nimage_threshold: 0.5\nsave_maps: true\nendpoint_url: http://x:9000\n")
    assert cli.main(["config", "--show", "--config", str(path)]) == 0
    out = capsys.readouterr().out
    shown = tmp_path / "shown.yaml"
    shown.write_text(out)
    assert load_settings(str(shown)) == load_settings(str(path))
    assert load_settings(str(shown)) != Settings()
    assert yaml.safe_load(out)["method"]["k"] == 7 and yaml.safe_load(out)["outputs"]["save_maps"] is True  # grouped


def test_config_show_never_prints_storage_credentials(tmp_path, capsys):
    path = tmp_path / "s.yaml"
    path.write_text("storage_options: {key: AKIASECRET, secret: hunter2}\n")
    assert cli.main(["config", "--show", "--config", str(path)]) == 0
    out = capsys.readouterr().out
    assert "AKIASECRET" not in out and "hunter2" not in out
    assert yaml.safe_load(out)["storage"]["storage_options"] == {"key": "***", "secret": "***"}


def test_config_keys_lists_every_key(capsys):
    assert cli.main(["config", "--keys"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [line.split(" ")[2] for line in lines if line.startswith("  ")] == [spec.name for spec in dataclasses.fields(Settings)]
    groups = [line.split(":")[0] for line in lines if not line.startswith("  ")]
    assert groups == ["method", "calibration", "thresholds", "run", "outputs", "storage"]


def test_unknown_config_key_is_one_line_on_stderr(tmp_path, capsys):
    path = tmp_path / "s.yaml"
    path.write_text("k: 5\nnum_neighbours: 5\n")
    code = cli.main(["fit", *REQUIRED["fit"], "--config", str(path), "--dry-run"])
    captured = capsys.readouterr()
    assert code != 0
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and "num_neighbours" in lines[0] and str(path) in lines[0]
    assert captured.out == ""


def test_bad_flag_value_is_one_line_on_stderr(capsys):
    assert cli.main(["fit", *REQUIRED["fit"], "--preprocess", "crop", "--dry-run"]) != 0
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and "preprocess" in lines[0] and "crop" in lines[0]


@pytest.mark.parametrize(
    "argv",
    [[], ["fit", "--model", "m"], ["score", "--model", "m", "--images", "i"], ["evaluate", "--model", "m"], ["make-demo-data"]],
)
def test_missing_required_arguments_exit_2(argv, capsys):
    with pytest.raises(SystemExit) as exit_:
        cli.main(argv)
    assert exit_.value.code == 2
    assert "required" in capsys.readouterr().err


@pytest.mark.parametrize(("kind", "category"), [([], "tiles"), (["--kind", "texture"], "tiles"), (["--kind", "aligned"], "parts")])
def test_make_demo_data_writes_the_chosen_kind(tmp_path, capsys, kind, category):
    assert cli.main(["make-demo-data", str(tmp_path), *kind]) == 0
    root = tmp_path / category
    assert capsys.readouterr().out.strip() == str(root)
    sizes = {Image.open(path).size for path in (root / "train" / "good").iterdir()}
    assert len(list((root / "train" / "good").iterdir())) == 40
    assert (sizes == {(128, 128)}) == (category == "parts")  # the texture's images differ in size


@pytest.mark.parametrize("version", ["0", "-1", "two", "1.5"])
@pytest.mark.parametrize("command", ["score", "evaluate", "model current"])
def test_a_version_that_is_not_1_or_more_is_refused_before_anything_runs(command, version, capsys):
    """--model-version 0 once scored the current version silently (0 read as unset)."""
    argv = ["model", "current", "m", version] if command == "model current" else [command, *REQUIRED[command], "--model-version", version]
    with pytest.raises(SystemExit) as exit_:
        cli.main(argv)
    assert exit_.value.code == 2
    assert f"{version!r} is not a version number (1, 2, ...;" in capsys.readouterr().err


@pytest.fixture
def image_folder(tmp_path) -> pathlib.Path:
    """Five real RGB PNGs in two subfolders."""
    folder = tmp_path / "images"
    rng = np.random.default_rng(0)
    for name in ("a/1.png", "a/2.png", "b/3.png", "b/4.png", "b/5.png"):
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (40, 48, 3), dtype=np.uint8)).save(folder / name)
    return folder


def table(out: str) -> dict[str, list[str]]:
    rows: dict[str, list[str]] = {}
    for line in out.splitlines():
        name, _, value = line.partition("  ")
        if value:
            rows.setdefault(name.strip(), []).append(value.strip())
    return rows


def test_fit_dry_run_lists_the_images_and_writes_nothing(image_folder, tmp_path, capsys):
    model = tmp_path / "model"
    assert cli.main(["fit", "--train", str(image_folder), "--model", str(model), "--shard-size", "2", "--dry-run"]) == 0
    rows = table(capsys.readouterr().out)
    assert rows["images"] == ["5"]
    assert rows["part files"] == ["up to 2 images each"]
    assert rows["first image"] == ["a/1.png"] and rows["last image"] == ["b/5.png"]
    assert any(uri.endswith("spade.json") for uri in rows["writes"])
    assert not model.exists()


def test_score_dry_run_lists_the_images_and_writes_nothing(image_folder, tmp_path, capsys):
    out = tmp_path / "out"
    argv = ["score", "--model", str(tmp_path / "model"), "--images", str(image_folder), "--out", str(out), "--dry-run"]
    assert cli.main(argv) == 0
    rows = table(capsys.readouterr().out)
    assert rows["images"] == ["5"] and rows["part files"] == ["up to 64 images each"]
    assert {uri.rstrip("/").rsplit("/", 1)[-1] for uri in rows["writes"]} == {"masks", "scores", "run.json", "report.html"}
    assert "no model there yet" in rows["model"][0]
    assert not out.exists()


def test_demo_dry_run_writes_nothing(tmp_path, capsys):
    out = tmp_path / "demo"
    assert cli.main(["demo", "--out", str(out), "--dry-run"]) == 0
    assert "dry run" in capsys.readouterr().out
    assert not out.exists()


def test_missing_image_source_is_a_one_line_error(tmp_path, capsys):
    missing = tmp_path / "no-such-folder"
    assert cli.main(["fit", "--train", str(missing), "--model", str(tmp_path / "m"), "--dry-run"]) != 0
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and str(missing) in lines[0]
    assert not (tmp_path / "m").exists()


def load_reference_script():
    spec = importlib.util.spec_from_file_location("cli_reference", REPO / "scripts" / "cli_reference.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_reference_script_covers_every_command(monkeypatch):
    monkeypatch.setenv("COLUMNS", "100")  # the script sets it; restored after the test
    reference = load_reference_script().reference()
    for command in (*SETTINGS_COMMANDS, "model current", "make-demo-data", "config"):  # show is among SETTINGS_COMMANDS
        assert f"\n## spade-batch {command}\n\n```\nusage: spade-batch {command} " in reference
    assert "--image-size INT" in reference
    assert max(len(line) for line in reference.splitlines()) <= 100


def test_the_command_line_reference_page_is_current(monkeypatch):
    monkeypatch.setenv("COLUMNS", "100")
    script = load_reference_script()
    advice = "regenerate it: python scripts/cli_reference.py"
    assert script.PAGE == REPO / "docs" / "cli.md"
    assert script.PAGE.read_text() == script.reference(), f"docs/cli.md is stale; {advice}"


def test_dry_run_counts_rejected_names_and_goes_on(image_folder, tmp_path, capsys):
    (image_folder / "a" / "1.jpg").write_bytes(b"same mask as a/1.png")
    argv = ["score", "--model", str(tmp_path / "model"), "--images", str(image_folder), "--out", str(tmp_path / "out"), "--dry-run"]
    assert cli.main(argv) == 0
    rows = table(capsys.readouterr().out)
    assert rows["images"] == ["5"]  # 6 files, a/1.png rejected
    assert rows["rejected"][0].startswith(f"1 (each gets an error row), first: {image_folder}/a/1.png: its outputs")


def test_a_json_typo_in_storage_options_is_reported_without_the_value(capsys):
    with pytest.raises(SystemExit) as exit_:
        cli.main(["fit", *REQUIRED["fit"], "--storage-options", '{"secret": "option-secret-value",}'])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert "--storage-options: not valid JSON" in err and "line 1, column" in err
    assert "option-secret-value" not in err
    with pytest.raises(SystemExit):
        cli.main(["fit", *REQUIRED["fit"], "--storage-options", '["option-secret-value"]'])
    err = capsys.readouterr().err
    assert "must be a JSON object" in err and "option-secret-value" not in err


def test_ctrl_c_is_one_line_and_exit_130_not_a_traceback(monkeypatch, capsys):
    def interrupted(args, secrets):
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, "_run", interrupted)
    assert cli.main(["add", *REQUIRED["add"]]) == 130
    assert capsys.readouterr().err == "spade-batch add: interrupted (Ctrl-C, SIGINT): what was written is kept; re-run the same command to resume\n"


def test_nightly_pinned_to_a_version_of_a_missing_model_is_refused_before_fitting(image_folder, tmp_path, capsys):
    """nightly --model-version 2 on a missing model once fitted version 1 first, then refused to score version 2."""
    model = tmp_path / "model"
    argv = ["nightly", "--train", str(image_folder), "--model", str(model), "--images", str(image_folder), "--out", str(tmp_path / "out"),
            "--model-version", "2", "--backbone", "resnet18", "--weights", "random", "--device", "cpu"]
    assert cli.main(argv) == 2
    assert capsys.readouterr().err == (f"spade-batch nightly: error: no model at {model} yet: nightly would fit its version 1, and "
                                       "--model-version 2 names a version that does not exist; drop --model-version (or give 1)\n")
    assert not model.exists() and not (tmp_path / "out").exists()


def test_errors_name_the_command_in_full(tmp_path, capsys):
    assert cli.main(["model", "current", str(tmp_path / "none"), "2"]) == 2
    assert capsys.readouterr().err.startswith(f"spade-batch model current: error: no model at {tmp_path / 'none'}")


@pytest.mark.parametrize("argv", [["review", "out", "--top", "0"], ["review", "out", "--top", "-3"],
                                  ["nightly", "--train", "t", "--model", "m", "--images", "i", "--out", "o", "--review-top", "0"]])
def test_a_review_page_of_no_cards_is_refused_before_anything_runs(argv, capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(argv)
    assert exit_info.value.code == 2 and "is not a number of cards (1 or more)" in capsys.readouterr().err
