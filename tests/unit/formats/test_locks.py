"""locks.py: a lock file that cannot be read. Taking, refusing and breaking locks on a local folder and on the S3
test server is in tests/integration/formats/test_locks.py."""

from __future__ import annotations

import pytest

from spade_batch.formats import storage
from spade_batch.formats.locks import LOCK_NAME, LockHeldError, acquire_lock


def test_an_unreadable_lock_file_still_counts_as_held(tmp_path) -> None:
    uri = str(tmp_path / LOCK_NAME)
    storage.write_text(uri, "not json")
    with pytest.raises(LockHeldError, match="unknown holder"):
        acquire_lock(uri, "run")
