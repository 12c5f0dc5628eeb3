"""Part files: the Parquet tables a run writes one per batch (features, scores), written atomically with a CRC per
page, and read back checked: a damaged part is a DamagedPartError that says what to do."""

from __future__ import annotations

import io

import pyarrow as pa
import pyarrow.parquet as pq

from spade_batch.formats import storage
from spade_batch.formats.text import first_line, redact


class DamagedPartError(ValueError):
    """A part file (features or scores, one per batch) that cannot be read; the message names it and what to do."""


def damaged_part(uri: str, error: BaseException) -> DamagedPartError:
    return DamagedPartError(
        f"part file {redact(uri)} is damaged ({type(error).__name__}: {first_line(error, 'no message')}); "
        "delete it and re-run the same command: the images it held are processed again"
    )


def read_part(uri: str, options: storage.StorageOptions = None, columns: list[str] | None = None, schema: pa.Schema | None = None) -> pa.Table:
    """The Parquet table of a part file a run wrote: only `columns` when given, read as `schema` when given.

    Parts are written atomically, so a damaged one was damaged afterwards (a copy cut short, flipped
    bits, an edit by hand): that raises DamagedPartError. Pages are checked against the CRC the
    writers store with them, so damage that leaves the file readable Parquet is caught too.
    """
    data = storage.read_bytes(uri, options)
    try:
        # An Arrow buffer, not io.BytesIO: after a threaded read through a Python file object, pyarrow's thread pool
        # can abort the interpreter at exit ("terminate called without an active exception", apache/arrow#50482).
        return pq.read_table(pa.BufferReader(data), columns=columns, schema=schema, page_checksum_verification=True)
    except (pa.ArrowException, OSError, ValueError) as error:
        raise damaged_part(uri, error) from error


def write_part(uri: str, table: pa.Table, options: storage.StorageOptions = None) -> None:
    """Write a part file atomically (see :func:`storage.write_bytes`), its pages with the CRCs :func:`read_part` checks."""
    buffer = io.BytesIO()
    pq.write_table(table, buffer, write_page_checksum=True)
    storage.write_bytes(uri, buffer.getvalue(), options)
