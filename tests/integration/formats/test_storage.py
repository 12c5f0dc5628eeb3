"""storage.py on a local folder and on a real S3-compatible server (moto); faults through a fault-injecting proxy.

What needs no server is in tests/unit/formats/test_storage.py.
"""

from __future__ import annotations

import io
import os
import threading
import time
from typing import TYPE_CHECKING

import boto3
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from spade_batch.formats import listing, parquet_parts, retry, storage

if TYPE_CHECKING:
    from tests.integration.conftest import FaultyS3, StorageRoot


def test_bytes_and_text_round_trip(storage_root: StorageRoot) -> None:
    data = bytes(range(256)) * 5
    uri = storage.join(storage_root.base, "deep", "er", "blob.bin")
    storage.write_bytes(uri, data, storage_root.options)
    assert storage.read_bytes(uri, storage_root.options) == data

    text = "défaut ▲ 缺陷\nline 2\n"
    text_uri = storage.join(storage_root.base, "notes.txt")
    storage.write_text(text_uri, text, storage_root.options)
    assert storage.read_text(text_uri, storage_root.options) == text
    assert storage.read_bytes(text_uri, storage_root.options) == text.encode("utf-8")


def test_write_replaces_existing_file_and_leaves_no_temp_file(storage_root: StorageRoot) -> None:
    uri = storage.join(storage_root.base, "run.json")
    storage.write_text(uri, "old content that is longer than the new one", storage_root.options)
    storage.write_text(uri, "new", storage_root.options)
    assert storage.read_text(uri, storage_root.options) == "new"
    # list_files shows hidden files too, so a leftover ".run.json.*.tmp" would appear here.
    assert listing.list_files(storage_root.base, options=storage_root.options) == [uri]


def test_reader_never_sees_a_partial_file(storage_root: StorageRoot) -> None:
    uri = storage.join(storage_root.base, "part-00000.parquet")
    versions = [bytes([i]) * 200_000 for i in range(2)]
    storage.write_bytes(uri, versions[0], storage_root.options)
    reads_ok: list[bool] = []
    done = threading.Event()

    def read_until_done() -> None:
        while not done.is_set():
            reads_ok.append(storage.read_bytes(uri, storage_root.options) in versions)

    reader = threading.Thread(target=read_until_done)
    reader.start()
    try:
        for i in range(20):
            storage.write_bytes(uri, versions[i % 2], storage_root.options)
    finally:
        done.set()
        reader.join()
    assert reads_ok
    assert all(reads_ok)


def test_list_files_is_recursive_sorted_and_filters_suffixes(storage_root: StorageRoot) -> None:
    names = ["z.png", "a/b/2.png", "a/1.PNG", "3.jpg", "notes.txt", "a/b/c/4.Jpeg"]
    for name in names:
        storage.write_bytes(storage.join(storage_root.base, "imgs", name), b"x", storage_root.options)
    # A sibling whose name extends the prefix is not under it.
    storage.write_bytes(storage.join(storage_root.base, "imgs2", "0.png"), b"x", storage_root.options)

    def uris(*rel: str) -> list[str]:
        return [storage.join(storage_root.base, "imgs", r) for r in rel]

    root = storage.join(storage_root.base, "imgs")
    opts = storage_root.options
    assert listing.list_files(root, options=opts) == uris(
        "3.jpg", "a/1.PNG", "a/b/2.png", "a/b/c/4.Jpeg", "notes.txt", "z.png"
    )
    assert listing.list_files(root + "/", (".png",), options=opts) == uris("a/1.PNG", "a/b/2.png", "z.png")
    assert listing.list_files(root, (".JPG", ".jpeg"), options=opts) == uris("3.jpg", "a/b/c/4.Jpeg")
    assert listing.list_files(storage.join(root, "a", "b"), options=opts) == uris("a/b/2.png", "a/b/c/4.Jpeg")
    assert listing.list_files(storage.join(storage_root.base, "missing"), options=storage_root.options) == []


def test_exists_and_remove(storage_root: StorageRoot) -> None:
    uri = storage.join(storage_root.base, "d", "e", "f.txt")
    other = storage.join(storage_root.base, "d", "g.txt")
    assert not storage.exists(uri, storage_root.options)
    storage.write_text(uri, "x", storage_root.options)
    storage.write_text(other, "y", storage_root.options)
    assert storage.exists(uri, storage_root.options)
    assert storage.exists(storage.join(storage_root.base, "d"), storage_root.options)

    storage.remove(uri, storage_root.options)
    assert not storage.exists(uri, storage_root.options)
    assert storage.exists(other, storage_root.options)
    storage.remove(uri, storage_root.options)  # already gone: no error

    storage.remove(storage.join(storage_root.base, "d"), storage_root.options, recursive=True)
    assert not storage.exists(other, storage_root.options)
    assert listing.list_files(storage_root.base, options=storage_root.options) == []


def test_exists_sees_changes_made_by_another_client(s3, s3_bucket: str) -> None:
    uri = storage.join(s3_bucket, "shard", "part-00003.parquet")
    storage.write_bytes(uri, b"x", s3.storage_options)
    assert listing.list_files(s3_bucket, options=s3.storage_options) == [uri]  # fills s3fs's listing cache
    client = boto3.client(
        "s3",
        endpoint_url=s3.endpoint_url,
        region_name="us-west-2",
        aws_access_key_id="testing",
        aws_secret_access_key="testing",
    )
    client.delete_object(Bucket=s3_bucket.removeprefix("s3://"), Key="shard/part-00003.parquet")
    assert not storage.exists(uri, s3.storage_options)


def test_missing_file_error_names_the_uri(storage_root: StorageRoot) -> None:
    uri = storage.join(storage_root.base, "no", "such.png")
    with pytest.raises(FileNotFoundError, match="such.png") as info:
        storage.read_bytes(uri, storage_root.options)
    assert uri in str(info.value)
    assert info.value.filename == uri
    if storage_root.options:
        assert storage_root.options["secret"] not in str(info.value).replace(uri, "")


def test_missing_bucket_errors_name_the_uri(s3) -> None:
    uri = "s3://no-such-bucket/x/part-00000.parquet"
    with pytest.raises(FileNotFoundError, match="bucket does not exist") as listed:
        listing.list_files("s3://no-such-bucket/x", options=s3.storage_options)
    assert listed.value.filename == "s3://no-such-bucket/x"
    with pytest.raises(FileNotFoundError, match="bucket does not exist") as writing:
        storage.write_bytes(uri, b"x", s3.storage_options)
    assert writing.value.filename == uri


def test_invalid_utf8_text_error_names_the_uri(storage_root: StorageRoot) -> None:
    uri = storage.join(storage_root.base, "latin1.txt")
    storage.write_bytes(uri, "café".encode("latin-1"), storage_root.options)
    with pytest.raises(ValueError, match="latin1.txt is not UTF-8"):
        storage.read_text(uri, storage_root.options)


def test_a_damaged_part_file_is_named_with_what_to_do(storage_root: StorageRoot) -> None:
    good = storage.join(storage_root.base, "part-good.parquet")
    buffer = io.BytesIO()
    pq.write_table(pa.table({"id": ["a", "b"], "x": [1, 2]}), buffer)
    storage.write_bytes(good, buffer.getvalue(), storage_root.options)
    assert parquet_parts.read_part(good, storage_root.options, columns=["id"]).column("id").to_pylist() == ["a", "b"]
    for name, data in (("cut", buffer.getvalue()[:-20]), ("text", b"not parquet at all"), ("empty", b"")):
        uri = storage.join(storage_root.base, f"part-{name}.parquet")
        storage.write_bytes(uri, data, storage_root.options)
        with pytest.raises(parquet_parts.DamagedPartError, match=rf"part file .*part-{name}.parquet is damaged .*delete it and re-run"):
            parquet_parts.read_part(uri, storage_root.options)


# --- names are names ----------------------------------------------------------


@pytest.mark.parametrize("name", ["a::b.png", "memory::x.png", "q?x=1.png", "h#1.png", "s3::y.png"])
def test_names_are_never_chained_urls(storage_root: StorageRoot, name: str) -> None:
    # A file whose name looks like a chained URL next to the file the chain would point at.
    decoy = storage.join(storage_root.base, "b.png")
    storage.write_bytes(decoy, b"the wrong file", storage_root.options)
    uri = storage.join(storage_root.base, "dir", name)
    storage.write_bytes(uri, b"the right file", storage_root.options)
    assert storage.read_bytes(uri, storage_root.options) == b"the right file"
    assert uri in listing.list_files(storage_root.base, options=storage_root.options)
    assert storage.exists(uri, storage_root.options)


def test_s3_keys_that_s3fs_would_read_as_a_version_are_refused(s3, s3_bucket: str) -> None:
    uri = storage.join(s3_bucket, "q?versionId=1.png")
    with pytest.raises(ValueError, match="reads as an object version"):
        storage.read_bytes(uri, s3.storage_options)


# --- transient faults, through a real fault-injecting proxy --------------------


@pytest.mark.parametrize("kind", ["slowdown", "reset", "delay"])
def test_read_succeeds_after_transient_faults(faulty_s3: FaultyS3, kind: str) -> None:
    uri = storage.join(faulty_s3.bucket, "imgs", "a.png")
    storage.write_bytes(uri, b"image bytes", faulty_s3.options)
    # s3fs retries a SlowDown 5 times inside one call, so 7 of them need storage's own retries too;
    # a reset is not retried by s3fs, so 2 of them need storage's own retries.
    faults = 7 if kind == "slowdown" else 2
    faulty_s3.proxy.inject("imgs/a.png", kind, times=faults, delay_s=2.0)
    start = time.monotonic()

    assert storage.read_bytes(uri, faulty_s3.options) == b"image bytes"

    assert faulty_s3.proxy.faults_served["imgs/a.png"] == faults
    assert faulty_s3.proxy.requests["imgs/a.png"] == faults + 1
    assert time.monotonic() - start < 30


def test_persistent_fault_is_transient_not_missing_or_bad(faulty_s3: FaultyS3) -> None:
    uri = storage.join(faulty_s3.bucket, "imgs", "b.png")
    storage.write_bytes(uri, b"image bytes", faulty_s3.options)
    faulty_s3.proxy.inject("imgs/b.png", "slowdown", times=None)

    with pytest.raises(retry.TransientStorageError) as info:
        storage.read_bytes(uri, faulty_s3.options)

    error = info.value
    assert not isinstance(error, FileNotFoundError)
    assert retry.is_transient(error)
    assert error.filename == uri
    assert "after 3 attempts" in str(error) and "Re-run the same command" in str(error)
    assert faulty_s3.proxy.requests["imgs/b.png"] >= 3


def test_missing_key_through_the_proxy_is_not_transient(faulty_s3: FaultyS3) -> None:
    uri = storage.join(faulty_s3.bucket, "imgs", "missing.png")
    with pytest.raises(FileNotFoundError) as info:
        storage.read_bytes(uri, faulty_s3.options)
    assert not retry.is_transient(info.value)


def test_writes_are_retried_too(faulty_s3: FaultyS3) -> None:
    uri = storage.join(faulty_s3.bucket, "out", "run.json")
    faulty_s3.proxy.inject("out/run.json", "slowdown", times=6, method="PUT")
    storage.write_text(uri, "{}", faulty_s3.options)
    assert faulty_s3.proxy.faults_served["out/run.json"] == 6
    assert storage.read_text(uri, faulty_s3.direct_options) == "{}"


# --- exclusive create ----------------------------------------------------------


def test_create_exclusive_creates_once_and_keeps_the_first_content(storage_root: StorageRoot) -> None:
    uri = storage.join(storage_root.base, "out", "lock")
    assert storage.create_exclusive(uri, b"first", storage_root.options)
    assert not storage.create_exclusive(uri, b"second", storage_root.options)
    assert storage.read_bytes(uri, storage_root.options) == b"first"
    assert listing.list_files(storage_root.base, options=storage_root.options) == [uri]


def test_concurrent_exclusive_creates_have_exactly_one_winner(storage_root: StorageRoot) -> None:
    uri = storage.join(storage_root.base, "race")
    contenders = 8
    barrier = threading.Barrier(contenders)
    wins: list[int] = []

    def contend(i: int) -> None:
        barrier.wait()
        if storage.create_exclusive(uri, str(i).encode(), storage_root.options):
            wins.append(i)

    threads = [threading.Thread(target=contend, args=(i,)) for i in range(contenders)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(wins) == 1
    assert storage.read_bytes(uri, storage_root.options) == str(wins[0]).encode()


def test_copy_file_copies_on_the_store_and_links_on_a_local_disk(storage_root: StorageRoot) -> None:
    source = storage.join(storage_root.base, "v1", "pyramid", "layer1.npy")
    target = storage.join(storage_root.base, "versions", "2", "pyramid", "layer1.npy")
    storage.write_bytes(source, b"gallery rows", storage_root.options)
    storage.write_bytes(target, b"left by a killed run", storage_root.options)
    storage.copy_file(source, target, storage_root.options)
    assert storage.read_bytes(target, storage_root.options) == b"gallery rows"
    if storage.is_local(target):
        assert os.path.samefile(source, target)
        assert sorted(os.listdir(os.path.dirname(target))) == ["layer1.npy"]  # no temp file left
