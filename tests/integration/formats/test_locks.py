"""locks.py on a local folder and on a real S3-compatible server (moto): one run per output location."""

from __future__ import annotations

import json
import threading
from typing import TYPE_CHECKING

import pytest

from spade_batch.formats import storage
from spade_batch.formats.locks import LOCK_NAME, LockHeldError, acquire_lock, holding_lock, release_lock

if TYPE_CHECKING:
    from tests.integration.conftest import StorageRoot


def test_second_acquirer_is_told_who_holds_the_lock_since_when_and_how_to_break_it(storage_root: StorageRoot) -> None:
    uri = storage.join(storage_root.base, "out", LOCK_NAME)
    lock = acquire_lock(uri, "spade-batch score (job A)", storage_root.options)

    with pytest.raises(LockHeldError) as info:
        acquire_lock(uri, "spade-batch score (job B)", storage_root.options)

    message = str(info.value)
    assert uri in message and "job A" in message and lock.since in message and lock.host in message
    assert f"delete {uri}" in message
    assert info.value.holder is not None and info.value.holder["token"] == lock.token
    release_lock(lock, storage_root.options)
    assert not storage.exists(uri, storage_root.options)
    release_lock(acquire_lock(uri, "job B", storage_root.options), storage_root.options)


def test_concurrent_acquirers_have_exactly_one_winner(storage_root: StorageRoot) -> None:
    uri = storage.join(storage_root.base, LOCK_NAME)
    contenders = 8
    barrier = threading.Barrier(contenders)
    outcomes: list[str] = []

    def contend(i: int) -> None:
        barrier.wait()
        try:
            acquire_lock(uri, f"run {i}", storage_root.options)
            outcomes.append("won")
        except LockHeldError:
            outcomes.append("held")

    threads = [threading.Thread(target=contend, args=(i,)) for i in range(contenders)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sorted(outcomes) == ["held"] * (contenders - 1) + ["won"]


def test_a_broken_and_retaken_lock_is_not_released_by_its_old_holder(storage_root: StorageRoot) -> None:
    uri = storage.join(storage_root.base, LOCK_NAME)
    stale = acquire_lock(uri, "killed run", storage_root.options)
    storage.remove(uri, storage_root.options)  # the documented way to break a stale lock
    current = acquire_lock(uri, "new run", storage_root.options)

    release_lock(stale, storage_root.options)

    assert json.loads(storage.read_text(uri, storage_root.options))["token"] == current.token


def test_holding_lock_releases_when_the_body_fails(storage_root: StorageRoot) -> None:
    uri = storage.join(storage_root.base, LOCK_NAME)
    with pytest.raises(KeyError), holding_lock(uri, "run", storage_root.options):
        assert storage.exists(uri, storage_root.options)
        raise KeyError("the run failed")
    assert not storage.exists(uri, storage_root.options)


