"""manifest.py on a local folder and on a real S3-compatible server (moto).

What needs no S3 server (local manifest files, ids, shards) is in tests/unit/formats/test_manifest.py.
"""

from __future__ import annotations

import pytest

from spade_batch.formats import storage
from spade_batch.formats.manifest import Manifest, build_manifest
from tests.integration.conftest import StorageRoot
from tests.unit.formats.test_manifest import write_table


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


def test_dot_dot_keys_are_rejected_without_refusing_the_run(s3, s3_bucket: str) -> None:
    root = StorageRoot(s3_bucket, s3.storage_options)
    put(root, "imgs/ok.png", "imgs/x/../evil.png")
    manifest = build_manifest(storage.join(s3_bucket, "imgs"), s3.storage_options)
    assert manifest.ids == ("ok.png",)
    ((uri, reason),) = manifest.rejected
    assert uri == f"{s3_bucket}/imgs/x/../evil.png" and "'..' segment" in reason


def test_names_with_chaining_characters_are_plain_names(storage_root: StorageRoot) -> None:
    put(storage_root, "imgs/a::b.png", "imgs/b.png")
    manifest = build_manifest(storage.join(storage_root.base, "imgs"), storage_root.options)
    assert manifest.ids == ("a::b.png", "b.png") and manifest.rejected == ()


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
