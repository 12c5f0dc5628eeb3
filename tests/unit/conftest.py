"""Helpers of the unit lane: pure in-process tests (no Ray, no S3 server, no subprocess, no browser)."""

from __future__ import annotations

import logging
import sys
from collections.abc import Iterator

import pytest

from spade_batch.logs import CHATTY_LOGGERS, QUIET_LOGGERS

SERVER_MODULES = ("ray", "moto", "boto3")
"""What the unit lane must not import: collecting tests/unit alone stays fast and needs no server."""


def pytest_collection_finish(session: pytest.Session) -> None:
    """Fails a run of the unit lane alone whose collection imported Ray, moto or boto3."""
    unit = str(session.config.rootpath / "tests" / "unit")
    if session.items and all(str(item.path).startswith(unit) for item in session.items):
        imported = [name for name in SERVER_MODULES if name in sys.modules]
        if imported:
            raise pytest.UsageError(f"the unit lane imported {', '.join(imported)} while collecting: move that test to tests/integration")


@pytest.fixture
def restore_logging() -> Iterator[None]:
    """Put the root logger and the quiet and chatty loggers back as they were."""
    root = logging.getLogger()
    saved = (list(root.handlers), root.level, {name: logging.getLogger(name).level for name in (*QUIET_LOGGERS, *CHATTY_LOGGERS)})
    yield
    root.handlers[:] = saved[0]
    root.setLevel(saved[1])
    for name, level in saved[2].items():
        logging.getLogger(name).setLevel(level)


def flip_data_bytes(path: str, column: str) -> None:
    """Invert 64 bytes near the end of a column's data pages in the Parquet file at path: damage that
    leaves the file readable Parquet (footer and page headers intact), as bit rot or a partly
    overwritten copy would."""
    import pyarrow.parquet as pq

    metadata = pq.ParquetFile(path).metadata.row_group(0)
    chunk = next(metadata.column(i) for i in range(metadata.num_columns) if metadata.column(i).path_in_schema == column)
    start = chunk.dictionary_page_offset if chunk.has_dictionary_page else chunk.data_page_offset
    end = start + chunk.total_compressed_size - 16  # inside the last page's values, past its header
    data = bytearray(open(path, "rb").read())
    data[end - 64:end] = bytes(b ^ 0xFF for b in data[end - 64:end])
    with open(path, "wb") as f:
        f.write(data)
