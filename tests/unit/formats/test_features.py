"""Feature tables: Arrow / Parquet round trips, failed rows, schema metadata, select / concatenate."""

from __future__ import annotations

import hashlib
import json

import numpy as np
import pyarrow.parquet as pq
import pytest

from spade_batch.formats import parquet_parts
from spade_batch.formats.features import (
    INDEX_SCHEMA,
    FeatureTable,
    LayerShape,
    concatenate,
    content_sha256,
    from_arrow,
    read_features,
    to_arrow,
    write_features,
)
from tests.unit.conftest import flip_data_bytes

SHAPES = [LayerShape("layer1", 4, 4, 3), LayerShape("layer2", 2, 2, 5), LayerShape("layer3", 1, 1, 6)]


def make_table(errors: list[str | None], seed: int = 0, prefix: str = "img") -> FeatureTable:
    """Random features; rows with an error are zero, as the extractor leaves them."""
    rng = np.random.default_rng(seed)
    count = len(errors)
    failed = np.array([e is not None for e in errors])
    global_features = rng.standard_normal((count, 7)).astype(np.float32)
    layers = [rng.standard_normal((count, s.height * s.width, s.channels)).astype(np.float16) for s in SHAPES]
    global_features[failed] = 0
    for layer in layers:
        layer[failed] = 0
    return FeatureTable(
        ids=[f"{prefix}/{i}.png" for i in range(count)],
        uris=[f"s3://bucket/{prefix}/{i}.png" for i in range(count)],
        heights=np.where(failed, 0, rng.integers(50, 200, count)).astype(np.int32),
        widths=np.where(failed, 0, rng.integers(50, 200, count)).astype(np.int32),
        global_features=global_features,
        layers=layers,
        layer_shapes=SHAPES,
        errors=errors,
        sha256=[None if e else f"{i:064x}" for i, e in enumerate(errors)],
    )


def assert_tables_equal(actual: FeatureTable, expected: FeatureTable) -> None:
    assert actual.ids == expected.ids and actual.uris == expected.uris and actual.errors == expected.errors
    assert actual.sha256 == expected.sha256
    assert actual.layer_shapes == expected.layer_shapes
    np.testing.assert_array_equal(actual.heights, expected.heights)
    np.testing.assert_array_equal(actual.widths, expected.widths)
    assert actual.global_features.dtype == np.float32
    np.testing.assert_array_equal(actual.global_features, expected.global_features)
    assert len(actual.layers) == len(expected.layers)
    for got, want in zip(actual.layers, expected.layers):
        assert got.dtype == np.float16 and got.shape == want.shape
        np.testing.assert_array_equal(got, want)


ERRORS = [None, "cannot decode img/1.png: empty", None, None, "cannot decode img/4.png: truncated"]


def test_arrow_round_trip_is_exact():
    features = make_table(ERRORS)
    assert_tables_equal(from_arrow(to_arrow(features)), features)


def test_parquet_round_trip_is_exact_and_failed_rows_stay_zero(tmp_path):
    features = make_table(ERRORS)
    uri = str(tmp_path / "features" / "part-00000.parquet")
    write_features(uri, features)
    back = read_features([uri])
    assert_tables_equal(back, features)
    # Failed rows are nulls on disk and zero (not NaN) in memory.
    assert pq.read_table(uri).column("global").null_count == 2
    assert not np.isnan(back.global_features).any()
    assert all(not np.isnan(layer.astype(np.float32)).any() for layer in back.layers)


def test_all_rows_failed_and_no_rows_failed(tmp_path):
    for errors in ([None, None], ["bad", "worse"]):
        features = make_table(errors)
        uri = str(tmp_path / f"{len([e for e in errors if e])}.parquet")
        write_features(uri, features)
        assert_tables_equal(read_features([uri]), features)


def test_schema_types_and_metadata_hold_the_layer_shapes():
    table = to_arrow(make_table(ERRORS))
    metadata = json.loads(table.schema.metadata[b"spade_batch"])
    assert metadata["layers"] == [{"name": s.name, "height": s.height, "width": s.width, "channels": s.channels} for s in SHAPES]
    assert metadata["global_dim"] == 7 and metadata["schema_version"] == 2
    assert str(table.schema.field("global").type) == "fixed_size_binary[28]"  # 7 float32
    assert str(table.schema.field("layer1").type) == "fixed_size_binary[96]"  # 4 x 4 x 3 float16
    assert [table.schema.field(name).type.__str__() for name in ("height", "width")] == ["int32", "int32"]


def test_a_layer_reads_back_with_plain_pyarrow_and_numpy_as_documented(tmp_path):
    features = make_table(ERRORS)
    write_features(str(tmp_path / "part.parquet"), features)
    row = pq.read_table(tmp_path / "part.parquet").column("layer1")[2].as_py()
    shape = SHAPES[0]
    np.testing.assert_array_equal(np.frombuffer(row, "<f2").reshape(shape.height, shape.width, shape.channels),
                                  features.layers[0][2].reshape(shape.height, shape.width, shape.channels))


def test_a_sliced_table_reads_its_own_rows():
    features = make_table(ERRORS)
    part = from_arrow(to_arrow(features).slice(2, 3))
    assert_tables_equal(part, features.select(np.arange(5) >= 2))


def test_parts_written_before_content_hashes_read_them_as_unknown(tmp_path):
    """A part without the sha256 column (fit before it was recorded) reads with None hashes, in full and by its index columns."""
    features = make_table(ERRORS)
    write_features(str(tmp_path / "part.parquet"), features)
    pq.write_table(pq.read_table(tmp_path / "part.parquet").drop_columns(["sha256"]), tmp_path / "old.parquet")
    assert read_features([str(tmp_path / "old.parquet")]).sha256 == [None] * 5
    index = parquet_parts.read_part(str(tmp_path / "old.parquet"), columns=INDEX_SCHEMA.names, schema=INDEX_SCHEMA)
    assert index.column("sha256").to_pylist() == [None] * 5 and index.column("id").to_pylist() == features.ids
    assert content_sha256(b"abc") == hashlib.sha256(b"abc").hexdigest()
    image = np.arange(12, dtype=np.uint8).reshape(2, 2, 3)
    assert content_sha256(image) == content_sha256(image.copy()) != content_sha256(image.reshape(1, 4, 3))


def test_other_schema_version_is_refused():
    table = to_arrow(make_table([None]))
    metadata = json.loads(table.schema.metadata[b"spade_batch"])
    table = table.replace_schema_metadata({"spade_batch": json.dumps({**metadata, "schema_version": 99})})
    with pytest.raises(ValueError, match="schema version 99"):
        from_arrow(table)


def test_read_features_concatenates_parts_in_the_given_order(tmp_path):
    first, second = make_table(ERRORS, seed=1, prefix="a"), make_table([None, "bad", None], seed=2, prefix="b")
    uris = [str(tmp_path / "part-00001.parquet"), str(tmp_path / "part-00000.parquet")]
    write_features(uris[0], first)
    write_features(uris[1], second)
    assert_tables_equal(read_features(uris), concatenate([first, second]))
    assert read_features(uris[::-1]).ids[:3] == ["b/0.png", "b/1.png", "b/2.png"]
    with pytest.raises(ValueError, match="no feature part files"):
        read_features([])


@pytest.mark.parametrize("damage", ["no metadata", "wrong layer shape"])
def test_a_part_whose_metadata_does_not_fit_its_columns_is_named(tmp_path, damage):
    table = to_arrow(make_table(ERRORS))
    metadata = json.loads(table.schema.metadata[b"spade_batch"])
    if damage == "no metadata":
        table = table.replace_schema_metadata(None)
    else:
        metadata["layers"][0]["channels"] *= 2
        table = table.replace_schema_metadata({"spade_batch": json.dumps(metadata)})
    uri = str(tmp_path / "part-00003.parquet")
    pq.write_table(table, uri)
    with pytest.raises(parquet_parts.DamagedPartError, match="part file .*part-00003.parquet is damaged .*delete it and re-run"):
        read_features([uri])


def test_a_part_with_damaged_floats_is_named_not_read_as_features(tmp_path):
    """zstd keeps incompressible blocks (float noise) unchecked: without the page CRCs these bytes read back as
    other floats (NaN, inf) and reach the gallery."""
    uri = str(tmp_path / "part-00004.parquet")
    write_features(uri, make_table([None] * 40))
    flip_data_bytes(uri, "layer1")
    pq.read_table(uri)  # still readable Parquet: only the checksums tell
    with pytest.raises(parquet_parts.DamagedPartError, match="part file .*part-00004.parquet is damaged .*CRC"):
        read_features([uri])


def test_concatenate_select_and_valid():
    first, second = make_table(ERRORS, seed=1, prefix="a"), make_table([None, "bad"], seed=2, prefix="b")
    both = concatenate([first, second])
    assert len(both) == 7
    assert both.ids == first.ids + second.ids
    np.testing.assert_array_equal(both.global_features, np.concatenate([first.global_features, second.global_features]))
    np.testing.assert_array_equal(both.layers[1][5:], second.layers[1])

    valid = both.valid()
    keep = [i for i, e in enumerate(both.errors) if e is None]
    assert valid.ids == [both.ids[i] for i in keep] and valid.errors == [None] * 4
    np.testing.assert_array_equal(valid.global_features, both.global_features[keep])
    for got, full in zip(valid.layers, both.layers):
        np.testing.assert_array_equal(got, full[keep])
    np.testing.assert_array_equal(valid.heights, both.heights[keep])

    mask = np.array([True, False, False, True, False, False, True])
    picked = both.select(mask)
    assert picked.ids == ["a/0.png", "a/3.png", "b/1.png"] and picked.errors == [None, None, "bad"]
    np.testing.assert_array_equal(picked.layers[2], both.layers[2][mask])
