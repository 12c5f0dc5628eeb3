"""The review sheet: written with empty verdicts, read back filled in; unknown verdicts; the images marked normal."""

from __future__ import annotations

import pytest

from spade_batch.formats.review import COLUMNS, Verdict, normal_images, read_sheet, sheet_csv

ROWS = [
    {"id": "cam1/001.png", "uri": "s3://line/2024-05-01/cam1/001.png", "image_score": 3.25, "mask_uri": "s3://out/masks/cam1/001.png"},
    {"id": "a,b.png", "uri": "/data/night/a,b.png", "image_score": 2.5, "mask_uri": "/out/masks/a,b.png"},
]


def test_a_sheet_round_trips_with_empty_verdicts_and_reads_the_filled_in_ones(tmp_path):
    text = sheet_csv(ROWS)
    assert text.splitlines()[0] == ",".join(COLUMNS) and text.splitlines()[1].endswith(",")
    (tmp_path / "empty.csv").write_text(text)
    assert [(v.line, v.id, v.uri, v.verdict) for v in read_sheet(str(tmp_path / "empty.csv"))] == [
        (2, "cam1/001.png", "s3://line/2024-05-01/cam1/001.png", ""), (3, "a,b.png", "/data/night/a,b.png", "")]
    filled = text.splitlines()
    filled[1] += " Normal "
    filled[2] += "defect"
    (tmp_path / "filled.csv").write_text("\ufeff" + "\n".join(filled) + "\n")  # a spreadsheet's byte-order mark
    assert [v.verdict for v in read_sheet(str(tmp_path / "filled.csv"))] == ["normal", "defect"]


def test_an_unknown_verdict_or_a_missing_column_is_an_error_naming_it(tmp_path):
    lines = sheet_csv(ROWS).splitlines()
    (tmp_path / "maybe.csv").write_text("\n".join([lines[0], lines[1] + "normal", lines[2] + "maybe"]) + "\n")
    with pytest.raises(ValueError, match=r"maybe.csv line 3 \(id a,b.png\): verdict 'maybe' is not normal or defect"):
        read_sheet(str(tmp_path / "maybe.csv"))
    (tmp_path / "bare.csv").write_text("id,uri\nx.png,/x.png\n")
    with pytest.raises(ValueError, match="bare.csv has no verdict column"):
        read_sheet(str(tmp_path / "bare.csv"))


def test_two_rows_of_one_image_with_different_verdicts_are_an_error_naming_both_lines(tmp_path):
    lines = sheet_csv(ROWS).splitlines()
    (tmp_path / "twice.csv").write_text("\n".join([lines[0], lines[1] + "normal", lines[2], lines[1] + " Normal", lines[1] + "defect"]) + "\n")
    with pytest.raises(ValueError, match=r"twice.csv lines 2 and 5 \(id cam1/001.png\): verdicts 'normal' and 'defect' disagree; keep one"):
        read_sheet(str(tmp_path / "twice.csv"))
    (tmp_path / "agree.csv").write_text("\n".join([lines[0], lines[1] + "normal", ",,,,", lines[1] + "NORMAL", lines[1]]) + "\n")
    assert [(v.line, v.verdict) for v in read_sheet(str(tmp_path / "agree.csv"))] == [(2, "normal"), (4, "normal"), (5, "")]


def test_a_semicolon_separated_sheet_gets_a_hint(tmp_path):
    (tmp_path / "excel.csv").write_text("id;uri;image_score;mask_uri;verdict\nx.png;/x.png;1.0;/m.png;normal\n")
    with pytest.raises(ValueError, match="excel.csv has no id, uri, verdict column .* separated by semicolons: save it as comma-separated CSV"):
        read_sheet(str(tmp_path / "excel.csv"))


def test_the_images_marked_normal_are_named_by_their_uris_path():
    verdicts = [Verdict(2, "cam1/001.png", "s3://line/2024-05-01/cam1/001.png", "normal"),
                Verdict(3, "cam1/001.png", "s3://line/2024-05-02/cam1/001.png", "normal"),  # the same name another night
                Verdict(4, "cam1/002.png", "s3://line/2024-05-02/cam1/002.png", "defect"),
                Verdict(5, "cam1/003.png", "s3://line/2024-05-02/cam1/003.png", ""),
                Verdict(6, "cam1/001.png", "s3://line/2024-05-01/cam1/001.png", "normal")]  # listed twice: one image
    manifest = normal_images(verdicts)
    assert manifest.ids == ("line/2024-05-01/cam1/001.png", "line/2024-05-02/cam1/001.png")
    assert manifest.uris == ("s3://line/2024-05-01/cam1/001.png", "s3://line/2024-05-02/cam1/001.png")
    assert normal_images([Verdict(2, "x.png", "/data/x.png", "normal")]).ids == ("data/x.png",)


def test_a_row_whose_id_is_not_its_uris_path_or_one_image_judged_both_ways_under_two_ids_is_refused(tmp_path):
    """add --verdicts adds each row's uri: an id edited (or rows mixed) so that it names another image is an error naming the
    line, and so are two rows of one uri under two ids, one normal and one defect."""
    header = ",".join(COLUMNS)
    (tmp_path / "mixed.csv").write_text(f"{header}\ncam1/001.png,/night/cam1/002.png,3.0,/out/masks/cam1/001.png,normal\n")
    with pytest.raises(ValueError, match=r"mixed.csv line 2: id 'cam1/001.png' is not the path of its uri '/night/cam1/002.png'"):
        read_sheet(str(tmp_path / "mixed.csv"))
    (tmp_path / "both.csv").write_text(f"{header}\ncam1/001.png,/night/cam1/001.png,3.0,/m.png,normal\n"
                                       f"001.png,/night/cam1/001.png,3.0,/m.png,defect\n")
    with pytest.raises(ValueError, match=r"both.csv lines 2 and 3 \(uri /night/cam1/001.png\): verdicts 'normal' and 'defect' disagree"):
        read_sheet(str(tmp_path / "both.csv"))
    (tmp_path / "same.csv").write_text(f"{header}\ncam1/001.png,/night/cam1/001.png,3.0,/m.png,normal\n"
                                       f"001.png,/night/cam1/001.png,3.0,/m.png,Normal\n")
    assert normal_images(read_sheet(str(tmp_path / "same.csv"))).uris == ("/night/cam1/001.png",)
