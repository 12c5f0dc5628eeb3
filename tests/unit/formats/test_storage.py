"""storage.py in process: local writes, URIs and names, local files that are not regular files.

The same calls on a local folder and on a real S3-compatible server (moto), and faults through a
fault-injecting proxy, are in tests/integration/formats/test_storage.py.
"""

from __future__ import annotations

import os
import threading

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from spade_batch.formats import listing, parquet_parts, retry, storage


def test_failed_local_write_keeps_old_file_and_removes_temp_file(tmp_path) -> None:
    uri = str(tmp_path / "scores.parquet")
    storage.write_bytes(uri, b"complete", None)
    with pytest.raises(TypeError):
        storage.write_bytes(uri, "not bytes", None)  # type: ignore[arg-type]  # fails after the temp file exists
    assert storage.read_bytes(uri) == b"complete"
    assert os.listdir(tmp_path) == ["scores.parquet"]


def test_local_write_gives_the_mode_a_plain_open_gives(tmp_path) -> None:
    reference = tmp_path / "reference"
    reference.write_bytes(b"x")
    storage.write_bytes(str(tmp_path / "written"), b"x")
    assert os.stat(tmp_path / "written").st_mode == os.stat(reference).st_mode


def test_local_write_accepts_file_urls_and_relative_paths(tmp_path, monkeypatch) -> None:
    storage.write_text(f"file://{tmp_path}/a/b.txt", "via url")
    assert (tmp_path / "a" / "b.txt").read_text() == "via url"
    monkeypatch.chdir(tmp_path)
    storage.write_text("rel/c.txt", "relative")
    assert (tmp_path / "rel" / "c.txt").read_text() == "relative"
    assert listing.list_files("rel") == [str(tmp_path / "rel" / "c.txt")]


@pytest.mark.parametrize(
    ("base", "parts", "expected"),
    [
        ("s3://b/model", ("features", "part-00001.parquet"), "s3://b/model/features/part-00001.parquet"),
        ("s3://b/model/", ("/features/", "x.png"), "s3://b/model/features/x.png"),
        ("s3://b", ("a/b", "", "c"), "s3://b/a/b/c"),
        ("s3://", ("bucket", "key"), "s3://bucket/key"),
        ("file:///data", ("x.png",), "file:///data/x.png"),
        ("/data/run", ("masks", "a/b.png"), "/data/run/masks/a/b.png"),
        ("/", ("data",), "/data"),
        ("rel/dir/", ("x",), "rel/dir/x"),
        ("", ("x", "y"), "x/y"),
        ("/data", (), "/data"),
    ],
)
def test_join(base: str, parts: tuple[str, ...], expected: str) -> None:
    assert storage.join(base, *parts) == expected


@pytest.mark.parametrize(
    ("uri", "local"),
    [("/a/b", True), ("rel/b", True), ("file:///a", True), ("s3://b/k", False), ("memory://x", False)],
)
def test_is_local(uri: str, local: bool) -> None:
    assert storage.is_local(uri) is local


def test_normalize(tmp_path, monkeypatch) -> None:
    assert storage.normalize("s3://b/x/") == "s3://b/x"
    assert storage.normalize(f"{tmp_path}/x/") == f"{tmp_path}/x"
    monkeypatch.chdir(tmp_path)
    assert storage.normalize("rel/") == f"{tmp_path}/rel"


def test_location_spells_every_spelling_of_a_place_one_way(tmp_path, monkeypatch) -> None:
    (tmp_path / "link").symlink_to(tmp_path)
    monkeypatch.chdir(tmp_path)
    spellings = ["out", "out/", f"{tmp_path}/x/../out", f"file://{tmp_path}/out", f"{tmp_path}/link/out"]
    assert {storage.location(uri) for uri in spellings} == {f"{tmp_path}/out"}
    assert {storage.location(uri) for uri in ("s3://b/out/", "s3a://b/out")} == {"s3://b/out"}
    assert storage.location("s3://b/x/../out") == "s3://b/x/../out"  # a key is taken literally


def test_error_messages_mask_passwords_in_uris() -> None:
    with pytest.raises(FileNotFoundError) as info:
        storage.read_bytes("memory://user:hunter2@host/x.png")
    assert "hunter2" not in str(info.value)
    assert info.value.filename == "memory://***@host/x.png"


def test_local_fifo_is_refused_without_blocking(tmp_path) -> None:
    fifo = tmp_path / "stuck.png"
    os.mkfifo(fifo)
    result: list[BaseException] = []
    reader = threading.Thread(target=lambda: result.append(pytest.raises(OSError, storage.read_bytes, str(fifo)).value))
    reader.start()
    reader.join(timeout=10)
    assert not reader.is_alive(), "reading a FIFO blocked"
    error = result[0]
    assert "Not a regular file" in str(error) and error.filename == str(fifo)
    assert not retry.is_transient(error)


def test_local_folder_is_not_a_file(tmp_path) -> None:
    with pytest.raises(IsADirectoryError, match="Is a folder") as info:
        storage.read_bytes(str(tmp_path))
    assert info.value.filename == str(tmp_path)


# --- the retry policy from the environment ---------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (None, retry.RetryPolicy()),
        ("", retry.RetryPolicy()),
        ("  ", retry.RetryPolicy()),
        ("attempts=3,first_delay_s=0.01,max_delay_s=0.02", retry.RetryPolicy(attempts=3, first_delay_s=0.01, max_delay_s=0.02)),
        (" max_delay_s = 20 , attempts=6 ", retry.RetryPolicy(attempts=6, first_delay_s=0.5, max_delay_s=20.0)),
        ("attempts=1", retry.RetryPolicy(attempts=1, first_delay_s=0.5, max_delay_s=8.0)),
        ("first_delay_s=0,max_delay_s=0", retry.RetryPolicy(attempts=4, first_delay_s=0.0, max_delay_s=0.0)),
    ],
)
def test_the_retry_policy_is_read_from_key_value_pairs_and_keys_left_out_keep_their_defaults(
    text: str | None, expected: retry.RetryPolicy
) -> None:
    assert retry.retry_policy_from(text) == expected


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("attempts", r"'attempts' is not attempts=N, first_delay_s=S or max_delay_s=S"),
        ("tries=3", r"'tries=3' is not attempts=N"),
        ("attempts=3;first_delay_s=1", r"attempts must be an integer, got '3;first_delay_s=1'"),
        ("attempts=3,", r"'' is not attempts=N"),
        ("attempts=three", r"attempts must be an integer, got 'three'"),
        ("attempts=2.5", r"attempts must be an integer, got '2.5'"),
        ("first_delay_s=soon", r"first_delay_s must be a number of seconds, got 'soon'"),
        ("max_delay_s=inf", r"max_delay_s must be finite, got 'inf'"),
        ("first_delay_s=nan", r"first_delay_s must be finite, got 'nan'"),
        ("attempts=2,attempts=3", r"attempts is given twice"),
        ("attempts=0", r"needs attempts >= 1"),
        ("first_delay_s=-1", r"0 <= first_delay_s <= max_delay_s"),
        ("first_delay_s=10,max_delay_s=1", r"0 <= first_delay_s <= max_delay_s"),
    ],
)
def test_a_malformed_retry_policy_is_an_error_naming_the_variable_and_its_value(text: str, message: str) -> None:
    with pytest.raises(ValueError, match=message) as error:
        retry.retry_policy_from(text)
    assert str(error.value).startswith(f"SPADE_BATCH_RETRY={text!r}: ")


@pytest.mark.parametrize(("info", "expected"), [
    ({"name": "b/k.png", "size": 10, "ETag": '"9e107d9d372bb6826bd81d3542a419d6"', "LastModified": "2026-11-29"},
     "etag 9e107d9d372bb6826bd81d3542a419d6"),  # S3 (s3fs): the ETag, without its quotes
    ({"name": "b/k.png", "size": 10, "etag": "CJ6TqLrA", "updated": "2026-11-29T01:02:03Z"}, "etag CJ6TqLrA"),  # GCS
    ({"name": "/d/k.png", "size": 10, "mtime": 1764378123.25}, "size 10 modified 1764378123.25"),  # local
    ({"name": "c/k.png", "size": 10, "last_modified": "2026-11-29 01:02:03"}, "size 10 modified 2026-11-29 01:02:03"),  # Azure
    ({"name": "k.png", "size": 10}, ""),  # nothing that tells contents apart: unknown
])
def test_a_fingerprint_is_what_the_listing_says_of_the_content(info: dict, expected: str) -> None:
    assert listing.fingerprint(info) == expected


def test_a_local_file_rewritten_with_other_content_lists_with_another_fingerprint(tmp_path) -> None:
    path = tmp_path / "imgs" / "001.png"
    path.parent.mkdir()
    path.write_bytes(b"first upload")
    (uri, before), = listing.list_entries(str(tmp_path / "imgs")).items()
    assert uri == str(path) and before == listing.fingerprint(listing.info(uri)) != ""
    os.utime(path, ns=(path.stat().st_atime_ns, path.stat().st_mtime_ns))  # the same file, touched to its own time
    assert listing.list_entries(str(tmp_path / "imgs")) == {uri: before}
    path.write_bytes(b"second upload")
    assert listing.list_entries(str(tmp_path / "imgs"))[uri] != before


@pytest.mark.parametrize(("options", "name"), [
    ({"secrt": "x"}, "secrt"),
    ({"client_kwargs": {"endpont_url": "http://127.0.0.1:1"}}, "endpont_url"),
    ({"config_kwargs": {"read_timeot": 5}}, "read_timeot"),
])
def test_a_misspelt_storage_option_is_named_as_a_storage_option(options: dict, name: str) -> None:
    """s3fs takes any key and fails when it connects (before any request): the error names the key, never a file."""
    with pytest.raises(storage.StorageOptionError, match=rf"storage option '{name}' is not one that s3:// storage takes .*storage_options"):
        storage.exists("s3://bucket/model/spade.json", {"key": "k", "secret": "s", **options})


def test_parquet_is_read_from_an_arrow_buffer_not_a_python_file_object(tmp_path, monkeypatch) -> None:
    """After a threaded pyarrow read through a Python file object (io.BytesIO), pyarrow's thread pool can abort the
    interpreter at exit ("terminate called without an active exception", status 134; apache/arrow#50482): `show`
    printed its table, then exited 134 in 2 of 6 runs of a hostile-user pass, and 5 of 48 loaded runs read a scores
    part that way here (0 of 48 from an Arrow buffer). Both Parquet readers hand pyarrow a native Arrow buffer."""
    from spade_batch.formats.manifest import build_manifest

    part, manifest = str(tmp_path / "part.parquet"), str(tmp_path / "manifest.parquet")
    parquet_parts.write_part(part, pa.table({"id": ["a.png", "b.png"], "score": [1.0, 2.0]}))
    parquet_parts.write_part(manifest, pa.table({"uri": [str(tmp_path / "a.png"), str(tmp_path / "b.png")]}))
    sources = []
    read_table, parquet_file = pq.read_table, pq.ParquetFile
    monkeypatch.setattr(pq, "read_table", lambda source, *args, **kwargs: sources.append(source) or read_table(source, *args, **kwargs))
    monkeypatch.setattr(pq, "ParquetFile", lambda source, *args, **kwargs: sources.append(source) or parquet_file(source, *args, **kwargs))

    assert parquet_parts.read_part(part, columns=["id"]).column("id").to_pylist() == ["a.png", "b.png"]
    assert len(build_manifest(manifest)) == 2
    assert len(sources) == 2 and all(isinstance(source, pa.NativeFile) for source in sources), sources
