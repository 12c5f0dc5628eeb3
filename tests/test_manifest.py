"""manifest.py on a local folder and on a real S3-compatible server (moto)."""

from __future__ import annotations

import io

import pyarrow as pa
import pyarrow.csv as pa_csv
import pyarrow.parquet as pq
import pytest
from conftest import StorageRoot

from spade_batch.formats import storage
from spade_batch.formats.manifest import Manifest, build_manifest, output_stem


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


def test_an_entry_listed_twice_is_one_image(tmp_path) -> None:
    source = tmp_path / "dups.txt"
    source.write_text(f"{tmp_path}/a.png\n{tmp_path}/b.png\na.png\n{tmp_path}/sub/../a.png\n")
    manifest = build_manifest(str(source))
    assert manifest.ids == ("a.png", "b.png")
    assert manifest.rejected == ()


def test_ids_are_normalised_and_a_colliding_key_is_rejected_alone(s3, s3_bucket: str) -> None:
    root = StorageRoot(s3_bucket, s3.storage_options)
    put(root, "imgs/a//b.png", "imgs/a/./b.png", "imgs/a/b.png", "imgs/./c.png", "imgs/d.png")
    source = storage.join(s3_bucket, "imgs")

    manifest = build_manifest(source, s3.storage_options)

    assert manifest.ids == ("a/b.png", "c.png", "d.png")
    # The key written canonically keeps the id; the other spellings are rejected, one error each.
    assert manifest.uris == (f"{source}/a/b.png", f"{source}/./c.png", f"{source}/d.png")
    assert [uri for uri, _ in manifest.rejected] == [f"{source}/a/./b.png", f"{source}/a//b.png"]
    assert all(f"would overwrite those of {source}/a/b.png" in reason for _, reason in manifest.rejected)


def test_file_and_folder_wanting_the_same_output_path_reject_only_the_second(storage_root: StorageRoot) -> None:
    put(storage_root, "imgs/x.jpg", "imgs/x.png/y.png", "imgs/z.png")
    source = storage.join(storage_root.base, "imgs")

    manifest = build_manifest(source, storage_root.options)

    assert manifest.ids == ("x.jpg", "z.png")
    ((uri, reason),) = manifest.rejected
    assert uri == f"{source}/x.png/y.png"
    assert f"masks/x.png to be a folder, but {source}/x.jpg writes a file there" in reason


def test_images_differing_only_by_extension_keep_the_first(tmp_path) -> None:
    for name in ("a.png", "a.jpg", "b.png"):
        (tmp_path / name).write_bytes(b"x")
    manifest = build_manifest(str(tmp_path))
    assert manifest.ids == ("a.jpg", "b.png")
    assert manifest.rejected == ((f"{tmp_path}/a.png", f"its outputs (masks/a.png) would overwrite those of {tmp_path}/a.jpg; rename one of them"),)


def test_dot_dot_keys_are_rejected_without_refusing_the_run(s3, s3_bucket: str) -> None:
    root = StorageRoot(s3_bucket, s3.storage_options)
    put(root, "imgs/ok.png", "imgs/x/../evil.png")
    manifest = build_manifest(storage.join(s3_bucket, "imgs"), s3.storage_options)
    assert manifest.ids == ("ok.png",)
    ((uri, reason),) = manifest.rejected
    assert uri == f"{s3_bucket}/imgs/x/../evil.png" and "'..' segment" in reason


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


def test_names_with_chaining_characters_are_plain_names(storage_root: StorageRoot) -> None:
    put(storage_root, "imgs/a::b.png", "imgs/b.png")
    manifest = build_manifest(storage.join(storage_root.base, "imgs"), storage_root.options)
    assert manifest.ids == ("a::b.png", "b.png") and manifest.rejected == ()


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
