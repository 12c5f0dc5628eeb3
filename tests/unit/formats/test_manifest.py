"""manifest.py in process: local manifest files, ids, names and shards.

Listing folders, globs and manifests on a local folder and on the S3 test server is in
tests/integration/formats/test_manifest.py.
"""

from __future__ import annotations

import io

import pyarrow as pa
import pyarrow.csv as pa_csv
import pyarrow.parquet as pq
import pytest

from spade_batch.formats import listing, storage
from spade_batch.formats.manifest import Manifest, build_manifest, output_stem


def write_table(kind: str, uri: str, columns: dict[str, list], options) -> None:
    """Write ``columns`` as a .csv or .parquet file at ``uri``."""
    table = pa.table(columns)
    buffer = io.BytesIO()
    if kind == "csv":
        pa_csv.write_csv(table, buffer)
    else:
        pq.write_table(table, buffer)
    storage.write_bytes(uri, buffer.getvalue(), options)


@pytest.mark.parametrize("kind", ["csv", "parquet"])
def test_table_manifest_without_uri_column_is_an_error(tmp_path, kind: str) -> None:
    source = str(tmp_path / f"manifest.{kind}")
    write_table(kind, source, {"path": ["a.png"]}, None)
    with pytest.raises(ValueError, match=r"manifest\.(csv|parquet) has no 'uri' column \(columns: path\)"):
        build_manifest(source)


def test_csv_manifest_with_an_empty_uri_is_an_error(tmp_path) -> None:
    source = tmp_path / "manifest.csv"
    source.write_text("uri,label\na.png,0\n,1\n")
    with pytest.raises(ValueError, match="row 2 has uri ''"):
        build_manifest(str(source))


def test_empty_manifest_file_is_an_error(tmp_path) -> None:
    source = tmp_path / "empty.txt"
    source.write_text("# nothing yet\n\n")
    with pytest.raises(ValueError, match="empty.txt lists no images"):
        build_manifest(str(source))


def test_missing_manifest_file_is_an_error_naming_it(tmp_path) -> None:
    with pytest.raises(FileNotFoundError, match="missing.txt"):
        build_manifest(str(tmp_path / "missing.txt"))


def test_an_entry_listed_twice_is_one_image(tmp_path) -> None:
    source = tmp_path / "dups.txt"
    source.write_text(f"{tmp_path}/a.png\n{tmp_path}/b.png\na.png\n{tmp_path}/sub/../a.png\n")
    manifest = build_manifest(str(source))
    assert manifest.ids == ("a.png", "b.png")
    assert manifest.rejected == ()


def test_images_differing_only_by_extension_keep_the_first(tmp_path) -> None:
    for name in ("a.png", "a.jpg", "b.png"):
        (tmp_path / name).write_bytes(b"x")
    manifest = build_manifest(str(tmp_path))
    assert manifest.ids == ("a.jpg", "b.png")
    assert manifest.rejected == ((f"{tmp_path}/a.png", f"its outputs (masks/a.png) would overwrite those of {tmp_path}/a.jpg; rename one of them"),)


def test_unsafe_names_are_rejected_with_a_reason(tmp_path) -> None:
    names = {"ok.png": None, "tab\there.png": "control characters", "x" * 251 + ".png": "over the 250"}
    for name in names:
        (tmp_path / name).write_bytes(b"x")
    manifest = build_manifest(str(tmp_path))
    assert manifest.ids == ("ok.png",)
    reasons = dict(manifest.rejected)
    assert len(reasons) == 2
    for name, words in names.items():
        if words:
            assert words in reasons[f"{tmp_path}/{name}"]


@pytest.mark.parametrize(("image_id", "stem"), [("a/b.png", "a/b"), ("c.tar.png", "c.tar"), ("noext", "noext"), ("d/.png", "d/.png")])
def test_output_stem_drops_the_extension_only(image_id: str, stem: str) -> None:
    assert output_stem(image_id) == stem


@pytest.mark.parametrize("bad_id", ["", "/a.png", "../a.png", "x/../../a.png"])
def test_ids_must_stay_below_the_root(bad_id: str) -> None:
    with pytest.raises(ValueError, match="is not a relative path below s3://b/x"):
        Manifest("s3://b/x", (bad_id,), ("s3://b/x/a.png",))


def test_mixed_schemes_are_an_error(tmp_path) -> None:
    source = tmp_path / "mixed.txt"
    source.write_text("s3://bucket/a.png\n/data/b.png\n")
    with pytest.raises(ValueError, match=r"mixes storage schemes \(local path, s3\)"):
        build_manifest(str(source))


def test_a_single_image_file_is_not_a_source(tmp_path) -> None:
    image = tmp_path / "a.png"
    image.write_bytes(b"x")
    with pytest.raises(ValueError, match="a.png is a single file"):
        build_manifest(str(image))


@pytest.mark.parametrize(
    ("n", "size", "sizes"), [(10, 3, [3, 3, 3, 1]), (10, 10, [10]), (10, 15, [10]), (3, 1, [1, 1, 1])]
)
def test_shards_are_consecutive_slices(n: int, size: int, sizes: list[int]) -> None:
    ids = tuple(f"img{i:03d}.png" for i in range(n))
    manifest = Manifest("s3://b/x", ids, tuple(f"s3://b/x/{i}" for i in ids))

    shards = manifest.shards(size)

    assert [len(s) for s in shards] == sizes
    assert all(s.root == manifest.root for s in shards)
    assert tuple(i for s in shards for i in s.ids) == manifest.ids
    assert tuple(u for s in shards for u in s.uris) == manifest.uris


@pytest.mark.parametrize("size", [0, -2])
def test_shard_size_below_one_is_an_error(size: int) -> None:
    with pytest.raises(ValueError, match=f"shard_size must be at least 1, got {size}"):
        Manifest("r", ("a",), ("r/a",)).shards(size)


def test_manifest_rejects_mismatched_lengths() -> None:
    with pytest.raises(ValueError, match="2 ids but 1 uris"):
        Manifest("r", ("a", "b"), ("r/a",))


@pytest.mark.parametrize("source", ["folder", "glob", "manifest file"])
def test_each_image_keeps_its_listing_s_fingerprint_through_rejections_and_shards(tmp_path, source: str) -> None:
    """A folder or glob: the fingerprint its listing gave; a local manifest file's entries: their stat's."""
    from spade_batch.formats.layout import Outputs
    from spade_batch.formats.manifest import reject_long_outputs

    names = ["a.png", "b.png", "x" * 240 + ".png", "c.png"]
    for index, name in enumerate(names):
        (tmp_path / "imgs" / name).parent.mkdir(exist_ok=True)
        (tmp_path / "imgs" / name).write_bytes(b"x" * (index + 1))
    (tmp_path / "list.txt").write_text("\n".join(f"imgs/{name}" for name in names))
    given = {"folder": str(tmp_path / "imgs"), "glob": str(tmp_path / "imgs" / "*.png"), "manifest file": str(tmp_path / "list.txt")}
    expected = {str(tmp_path / "imgs" / name): listing.fingerprint(listing.info(str(tmp_path / "imgs" / name))) for name in names}

    manifest = build_manifest(given[source])
    assert dict(zip(manifest.uris, manifest.fingerprints)) == expected and all(expected.values())
    deep_out = str(tmp_path.joinpath(*["o" * 250] * 15, "run"))  # about 3,900 bytes: room for a.png's outputs, not the long name's
    checked = reject_long_outputs(manifest, Outputs(deep_out).files)
    assert len(checked.rejected) == 1 and checked.fingerprint_of() == {i: expected[u] for i, u in zip(checked.ids, checked.uris)}
    assert [f for shard in checked.shards(2) for f in shard.fingerprints] == list(checked.fingerprints)
    assert manifest.sha256() == Manifest(manifest.root, manifest.ids, manifest.uris).sha256(), "fingerprints are not the run's identity"


def deep_stem(size: int) -> str:
    """A stem of exactly `size` bytes, in segments a file name can hold."""
    segments, left = [], size
    while left > 200:
        segments.append("d" * 199)
        left -= 200
    return "/".join([*segments, "e" * left])


@pytest.mark.parametrize("kind", ["s3", "local"])
def test_an_image_whose_output_path_would_not_fit_the_store_is_rejected_alone(tmp_path, kind: str) -> None:
    """The longest output (overlays/<stem>.png) counts: its key (below the bucket) or local path must fit."""
    from spade_batch.formats.layout import Outputs
    from spade_batch.formats.manifest import MAX_KEY_BYTES, MAX_LOCAL_PATH_BYTES, reject_long_outputs

    out = "s3://bucket/run" if kind == "s3" else str(tmp_path / "run")
    fixed = len("run/overlays/.png") if kind == "s3" else len(f"{tmp_path}/run/overlays/.png")
    limit = MAX_KEY_BYTES if kind == "s3" else MAX_LOCAL_PATH_BYTES
    fits, too_long = deep_stem(limit - fixed) + ".png", deep_stem(limit - fixed + 1) + ".png"
    root = "s3://in" if kind == "s3" else "/in"
    ids = sorted(["a.png", fits, too_long])
    manifest = Manifest(root, tuple(ids), tuple(f"{root}/{i}" for i in ids), (("s3://in/bad?versionId=1", "earlier reason"),))

    checked = reject_long_outputs(manifest, Outputs(out).files)

    assert checked.ids == tuple(sorted(["a.png", fits]))
    assert checked.uris == tuple(f"{root}/{i}" for i in checked.ids)
    store = "S3" if kind == "s3" else "a local file system"
    what = "key" if kind == "s3" else "path"
    assert dict(checked.rejected) == {
        "s3://in/bad?versionId=1": "earlier reason",
        f"{root}/{too_long}": f"its output {Outputs(out).overlay(too_long)} would have a {limit + 1}-byte {what}, "
                              f"over the {limit:,} bytes {store} allows; shorten the name, or the output location",
    }
    assert reject_long_outputs(checked, Outputs(out).files) == checked
