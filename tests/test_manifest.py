"""manifest.py on a local folder and on a real S3-compatible server (moto)."""

from __future__ import annotations

import io
from typing import TYPE_CHECKING

import pyarrow as pa
import pyarrow.csv as pa_csv
import pyarrow.parquet as pq
import pytest

from spade_batch import storage
from spade_batch.manifest import Manifest, build_manifest

if TYPE_CHECKING:
    from conftest import StorageRoot


def put(root: StorageRoot, *names: str) -> None:
    """Create one small file per name below ``root.base``."""
    for name in names:
        storage.write_bytes(storage.join(root.base, name), b"\x89PNG fake", root.options)


def under(base: str, *names: str) -> tuple[str, ...]:
    return tuple(storage.join(base, name) for name in names)


def test_folder_lists_images_recursively_with_sorted_relative_ids(storage_root: StorageRoot) -> None:
    put(storage_root, "good/sub/b.JPG", "good/a.png", "good/notes.txt", "good/sub/d.webp", "good2/e.png")
    source = storage.join(storage_root.base, "good")

    manifest = build_manifest(source, storage_root.options)

    assert manifest.root == source
    assert manifest.ids == ("a.png", "sub/b.JPG", "sub/d.webp")
    assert manifest.uris == under(source, "a.png", "sub/b.JPG", "sub/d.webp")
    assert len(manifest) == 3
    assert build_manifest(source + "/", storage_root.options) == manifest


def test_suffixes_select_the_files(storage_root: StorageRoot) -> None:
    put(storage_root, "x/a.png", "x/b.Tif", "x/c.jpg")
    manifest = build_manifest(storage_root.base, storage_root.options, suffixes=(".tif", ".png"))
    assert manifest.ids == ("x/a.png", "x/b.Tif")


@pytest.mark.parametrize(
    ("pattern", "ids"),
    [
        ("cams/*/ok/*.png", ("cam1/ok/1.png", "cam2/ok/4.png")),
        ("cams/**/*.png", ("cam1/bad/3.png", "cam1/ok/1.png", "cam2/ok/4.png", "cam2/ok/deep/5.png")),
        ("cams/cam[12]/ok/?.jpg", ("cam1/ok/2.jpg",)),
    ],
)
def test_glob_root_is_the_part_before_the_first_wildcard(
    storage_root: StorageRoot, pattern: str, ids: tuple[str, ...]
) -> None:
    put(
        storage_root,
        "cams/cam1/ok/1.png",
        "cams/cam1/ok/2.jpg",
        "cams/cam1/bad/3.png",
        "cams/cam2/ok/4.png",
        "cams/cam2/ok/deep/5.png",
        "cams/cam2/ok/6.txt",
    )
    root = storage.join(storage_root.base, "cams")

    manifest = build_manifest(storage.join(storage_root.base, pattern), storage_root.options)

    assert manifest.root == root
    assert manifest.ids == ids
    assert manifest.uris == under(root, *ids)


def test_txt_manifest_skips_comments_and_resolves_relative_entries(storage_root: StorageRoot) -> None:
    base = storage_root.base
    text = "\n".join(
        [
            "# normal images, day 1",
            f"{base}/imgs/c.png",
            "",
            "  ../imgs/a.png  ",
            "imgs2/b.png",
        ]
    )
    source = storage.join(base, "lists", "normal.txt")
    storage.write_text(source, text, storage_root.options)

    manifest = build_manifest(source, storage_root.options)

    assert manifest.root == base
    assert manifest.ids == ("imgs/a.png", "imgs/c.png", "lists/imgs2/b.png")
    assert manifest.uris == under(base, "imgs/a.png", "imgs/c.png", "lists/imgs2/b.png")


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
def test_table_manifest_reads_the_uri_column(storage_root: StorageRoot, kind: str) -> None:
    base = storage_root.base
    source = storage.join(base, f"manifest.{kind}")
    uris = [f"{base}/run/b/2.png", f"{base}/run/a/1.png", "run/b/3.png"]
    write_table(kind, source, {"label": [0, 1, 0], "uri": uris}, storage_root.options)

    manifest = build_manifest(source, storage_root.options)

    assert manifest.root == storage.join(base, "run")
    assert manifest.ids == ("a/1.png", "b/2.png", "b/3.png")
    assert manifest.uris == under(base, "run/a/1.png", "run/b/2.png", "run/b/3.png")


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


def test_empty_folder_is_an_error_naming_source_and_suffixes(storage_root: StorageRoot) -> None:
    put(storage_root, "x/readme.txt")
    source = storage.join(storage_root.base, "x") + "/"
    with pytest.raises(ValueError, match="no image files") as info:
        build_manifest(source, storage_root.options)
    assert source in str(info.value)
    assert ".png, .jpg, .jpeg" in str(info.value)


def test_missing_prefix_and_unmatched_glob_are_errors(storage_root: StorageRoot) -> None:
    with pytest.raises(ValueError, match="found under .*nothing-here"):
        build_manifest(storage.join(storage_root.base, "nothing-here"), storage_root.options)
    put(storage_root, "x/a.png")
    with pytest.raises(ValueError, match=r"match .*x/\*\.jpg"):
        build_manifest(storage.join(storage_root.base, "x/*.jpg"), storage_root.options)


def test_empty_manifest_file_is_an_error(tmp_path) -> None:
    source = tmp_path / "empty.txt"
    source.write_text("# nothing yet\n\n")
    with pytest.raises(ValueError, match="empty.txt lists no images"):
        build_manifest(str(source))


def test_missing_manifest_file_is_an_error_naming_it(tmp_path) -> None:
    with pytest.raises(FileNotFoundError, match="missing.txt"):
        build_manifest(str(tmp_path / "missing.txt"))


def test_duplicate_entries_are_an_error(tmp_path) -> None:
    source = tmp_path / "dups.txt"
    source.write_text(f"{tmp_path}/a.png\n{tmp_path}/b.png\na.png\n")
    with pytest.raises(ValueError, match="'a.png' appears twice"):
        build_manifest(str(source))


def test_local_entries_are_normalized_before_the_duplicate_check(tmp_path) -> None:
    source = tmp_path / "dups.txt"
    source.write_text(f"{tmp_path}/x/a.png\n{tmp_path}/x/sub/../a.png\n")
    with pytest.raises(ValueError, match="'a.png' appears twice"):
        build_manifest(str(source))


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


def test_sha256_is_stable_and_sensitive_to_order_and_content(storage_root: StorageRoot) -> None:
    put(storage_root, "d/a.png", "d/b.png", "d/c/c.png")
    source = storage.join(storage_root.base, "d")
    first = build_manifest(source, storage_root.options)
    again = build_manifest(source, storage_root.options)
    assert again == first
    assert again.sha256() == first.sha256()
    assert len(first.sha256()) == 64 and int(first.sha256(), 16) >= 0

    reordered = Manifest(first.root, first.ids[::-1], first.uris[::-1])
    other_uri = Manifest(first.root, first.ids, first.uris[:-1] + (first.uris[-1] + "x",))
    other_id = Manifest(first.root, first.ids[:-1] + ("z.png",), first.uris)
    hashes = {m.sha256() for m in (first, reordered, other_uri, other_id)}
    assert len(hashes) == 4

    put(storage_root, "d/e.png")
    assert build_manifest(source, storage_root.options).sha256() != first.sha256()


def test_manifest_rejects_mismatched_lengths() -> None:
    with pytest.raises(ValueError, match="2 ids but 1 uris"):
        Manifest("r", ("a", "b"), ("r/a",))
