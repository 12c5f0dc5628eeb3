"""Scores tables: Parquet round trip with nullable fields and the neighbour list column."""

from __future__ import annotations

import dataclasses

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from spade_batch.formats import listing, storage
from spade_batch.formats.layout import EvaluationOutputs, Outputs, PlanOutputs, part_name, read_columns
from spade_batch.formats.parquet_parts import DamagedPartError
from spade_batch.formats.score_table import SCHEMA, ScoreRow, read_scores, write_scores
from tests.unit.conftest import flip_data_bytes

ROWS = [
    ScoreRow(
        id="a/1.png",
        uri="s3://b/a/1.png",
        image_score=1.5,
        is_anomalous=True,
        max_pixel_score=3.25,
        anomalous_fraction=0.125,
        mask_uri="s3://out/masks/a/1.png",
        neighbour_ids=["n/3.png", "n/1.png"],
        height=120,
        width=96,
    ),
    # No thresholds known: is_anomalous and anomalous_fraction are null.
    ScoreRow(id="a/2.png", uri="s3://b/a/2.png", image_score=0.5, max_pixel_score=1.0, mask_uri="s3://out/masks/a/2.png",
             neighbour_ids=["n/2.png"], height=64, width=64),
    # Failed image: every score null, no neighbours.
    ScoreRow(id="a/3.png", uri="s3://b/a/3.png", error="cannot decode s3://b/a/3.png: empty"),
]


def test_round_trip_keeps_nulls_lists_and_types(tmp_path):
    uri = str(tmp_path / "scores" / "part-00000.parquet")
    write_scores(uri, ROWS)
    table = read_scores([uri])
    assert table.schema == SCHEMA
    # The chosen values are exact in float32, so the rows compare equal.
    assert table.to_pylist() == [dataclasses.asdict(row) for row in ROWS]
    assert table.column("is_anomalous").null_count == 2
    assert table.column("image_score").null_count == 1
    assert table.column("neighbour_ids").to_pylist()[2] == []
    assert pq.read_table(uri).schema.field("image_score").type == pa.float32()


def test_float_scores_are_stored_as_float32(tmp_path):
    uri = str(tmp_path / "part.parquet")
    write_scores(uri, [ScoreRow(id="x", uri="x", image_score=0.1)])
    assert read_scores([uri]).column("image_score").to_pylist()[0] == float(np.float32(0.1))


def test_parts_are_concatenated_in_the_given_order(tmp_path):
    uris = [str(tmp_path / "part-00000.parquet"), str(tmp_path / "part-00001.parquet")]
    write_scores(uris[0], ROWS[:2])
    write_scores(uris[1], ROWS[2:])
    assert read_scores(uris).column("id").to_pylist() == ["a/1.png", "a/2.png", "a/3.png"]
    assert read_scores(uris[::-1]).column("id").to_pylist() == ["a/3.png", "a/1.png", "a/2.png"]


def test_empty_part_and_no_parts(tmp_path):
    uri = str(tmp_path / "empty.parquet")
    write_scores(uri, [])
    assert read_scores([uri]).num_rows == 0
    empty = read_scores([])
    assert empty.num_rows == 0 and empty.schema == SCHEMA


# ---------------------------------------------------------------- docs/outputs.md's snippets


def readme_snippets() -> list[str]:
    """The python blocks of docs/outputs.md's "Reading the scores" section."""
    import re
    from pathlib import Path

    text = (Path(__file__).resolve().parents[3] / "docs" / "outputs.md").read_text()
    section = text[text.index("## Reading the scores\n") :]
    section = section[: section.index("\n## ", 1)]
    return re.findall(r"```python\n(.*?)```", section, flags=re.S)


def test_the_readme_snippets_read_a_scores_table_with_pyarrow_pandas_and_duckdb(tmp_path, capsys) -> None:
    rng = np.random.default_rng(0)
    rows = [
        ScoreRow(id=f"cam/{i:03d}.png", uri=f"/a/cam/{i:03d}.png", image_score=float(score), is_anomalous=bool(score > 0.8),
                 mask_uri=f"/o/masks/cam/{i:03d}.png", height=64, width=64)
        for i, score in enumerate(rng.random(40))
    ]
    rows += [ScoreRow(id="cam/bad.png", uri="/a/cam/bad.png", error="cannot decode IMAGE: empty")]
    write_scores(str(tmp_path / "scores" / "part-a.parquet"), rows[:25])  # several part files, as a run writes them
    write_scores(str(tmp_path / "scores" / "part-b.parquet"), rows[25:])
    expected = [row.id for row in sorted(rows[:-1], key=lambda row: (-np.float32(row.image_score), row.id)) if row.is_anomalous]
    assert 3 <= len(expected) < 40

    snippets = readme_snippets()
    imports = [[line for line in code.splitlines() if line.startswith(("import ", "from "))] for code in snippets]
    assert [lines[-1] for lines in imports] == ["import pyarrow.parquet as pq", "import pandas as pd", "import duckdb"]
    for code in snippets:
        namespace: dict = {}
        exec(code.replace('"OUT/', f'"{tmp_path}/').replace("'OUT/", f"'{tmp_path}/"), namespace)
        anomalies = namespace["anomalies"]
        ids = anomalies["id"].to_pylist() if isinstance(anomalies, pa.Table) else anomalies["id"].tolist()
        assert ids == expected, code.splitlines()[0]
        assert "cam/" in capsys.readouterr().out


def test_a_part_with_damaged_values_is_named(tmp_path):
    uri = str(tmp_path / "part-00005.parquet")
    write_scores(uri, [ScoreRow(id=f"{i}.png", uri=f"/d/{i}.png", error=None, image_score=float(i)) for i in range(200)])
    flip_data_bytes(uri, "image_score")
    with pytest.raises(DamagedPartError, match="part file .*part-00005.parquet is damaged .*CRC"):
        read_scores([uri])



def test_a_runs_paths_are_under_its_root_and_clear_removes_exactly_the_runs_files(tmp_path):
    root = str(tmp_path / "out")
    outputs = Outputs(root)
    files = [outputs.mask("a/1.png"), outputs.map("a/1.png"), outputs.overlay("a/1.png"),
             storage.join(outputs.scores, part_name(["a/1.png"])), outputs.run_json, outputs.inputs_json, outputs.report]
    kept = [outputs.lock, storage.join(root, "notes.txt")]  # the lock is the clearing run's; other files are not the run's
    folders = [outputs.masks, outputs.scores]
    assert all(path.startswith(root + "/") for path in [*files, *kept, *folders]) and len(set(files + kept)) == len(files + kept)
    for path in files + kept:
        storage.write_text(path, "x")
    outputs.clear(None)
    assert listing.list_files(root) == sorted(kept)

    evaluation, plan = EvaluationOutputs(root), PlanOutputs(root)
    paths = [evaluation.test_images, evaluation.run.root, evaluation.metrics_json, evaluation.report, plan.report, plan.plan_json,
             evaluation.roc, evaluation.pro, evaluation.histogram, evaluation.best, evaluation.worst]
    assert all(path.startswith(root + "/") for path in paths)


def test_a_part_written_before_fingerprints_were_kept_reads_them_as_null(tmp_path):
    """Parts of runs from before the fingerprint column: read whole or by columns, the column is null (unknown)."""
    uri = str(tmp_path / "part-old.parquet")
    old = pa.Table.from_pylist([dataclasses.asdict(row) for row in ROWS], schema=SCHEMA).drop_columns(["fingerprint"])
    pq.write_table(old, uri, write_page_checksum=True)
    assert read_scores([uri]).column("fingerprint").to_pylist() == [None] * len(ROWS)
    (_, columns), = read_columns([uri], ["id", "fingerprint"], None, schema=SCHEMA)
    assert columns == {"id": [row.id for row in ROWS], "fingerprint": [None] * len(ROWS)}


def test_dropping_rows_rewrites_their_parts_without_them_and_removes_their_outputs(tmp_path):
    outputs, run = Outputs(str(tmp_path / "out")), "0123abcd"
    rows = [ScoreRow(id=f"{i}.png", uri=f"/in/{i}.png", image_score=float(i), mask_uri=outputs.mask(f"{i}.png"), fingerprint=f"etag {i}")
            for i in range(5)]
    parts = [storage.join(outputs.scores, part_name([row.id for row in batch], run)) for batch in (rows[:3], rows[3:])]
    write_scores(parts[0], rows[:3])
    write_scores(parts[1], rows[3:])
    for row in rows:
        for path in (outputs.mask(row.id), outputs.map(row.id)):
            storage.write_text(path, "x")

    outputs.drop_rows(parts, {"1.png", "3.png", "4.png"}, run, None)

    left = outputs.parts(None, run).own
    assert left == [storage.join(outputs.scores, part_name(["0.png", "2.png"], run))], "a part without the rows, under its new name"
    assert read_scores(left).to_pylist() == [dataclasses.asdict(rows[0]), dataclasses.asdict(rows[2])], "kept rows unchanged"
    assert listing.list_files(outputs.masks) == [outputs.mask("0.png"), outputs.mask("2.png")]
    assert listing.list_files(outputs.maps) == [outputs.map("0.png"), outputs.map("2.png")]

    # Killed after writing the new part, before removing the old one: the kept rows are in two parts. The
    # re-run drops the same ids again and one part is left.
    write_scores(parts[0], rows[:3])
    outputs.drop_rows(outputs.parts(None, run).own, {"1.png"}, run, None)
    assert outputs.parts(None, run).own == left and [row["id"] for row in read_scores(left).to_pylist()] == ["0.png", "2.png"]
