"""Transient storage faults and the retry policy every storage call runs under.

A call that fails for a transient reason (throttling, 5xx, connection reset, timeout; see :func:`is_transient`) is
retried with exponential backoff, :data:`RETRY` attempts in all (s3fs and botocore retry inside one attempt too). What
still fails transiently raises :class:`TransientStorageError`: a plain re-run retries it, and it never means that the
file is bad or missing.

The environment variable ``SPADE_BATCH_RETRY`` sets that policy, as comma-separated ``key=value`` pairs of
:class:`RetryPolicy`'s fields, e.g. ``SPADE_BATCH_RETRY="attempts=3,first_delay_s=0.01,max_delay_s=0.02"`` (a key
left out keeps its default; unset or empty: the defaults). Each process reads it once, when it imports this module,
and a malformed value is an error naming the variable. Ray workers started by a local ``ray.init`` inherit the
driver's environment; on a cluster, set it on every node or in the job's ``runtime_env={"env_vars": ...}``.
"""

from __future__ import annotations

import errno
import logging
import math
import os
import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import aiohttp
import botocore.exceptions
from fsspec.exceptions import FSTimeoutError

from spade_batch.formats.text import first_line, redact

T = TypeVar("T")

log = logging.getLogger(__name__)


class TransientStorageError(OSError):
    """A storage call that still failed for a transient reason after every retry.

    Throttling, a 5xx answer, a reset connection or a timeout: the object may
    be fine, the store was not. Re-running the same command retries it. The
    ``filename`` is the URI (passwords masked) and ``__cause__`` the last error.
    """


@dataclass(frozen=True)
class RetryPolicy:
    """Attempts per storage call, and the exponential backoff between them.

    The n-th wait (n = 1, 2, ...) is ``first_delay_s * 2 ** (n - 1)``, capped at
    ``max_delay_s``, times a random factor in [0.5, 1] so that workers
    throttled together do not retry together.
    """

    attempts: int = 4
    first_delay_s: float = 0.5
    max_delay_s: float = 8.0

    def __post_init__(self) -> None:
        if self.attempts < 1 or not 0 <= self.first_delay_s <= self.max_delay_s:
            raise ValueError(f"retry policy needs attempts >= 1 and 0 <= first_delay_s <= max_delay_s, got {self}")

    def delay(self, failed_attempts: int) -> float:
        """Seconds to wait after ``failed_attempts`` failures in a row."""
        return min(self.first_delay_s * 2 ** (failed_attempts - 1), self.max_delay_s) * random.uniform(0.5, 1.0)


RETRY_ENV = "SPADE_BATCH_RETRY"


def retry_policy_from(text: str | None) -> RetryPolicy:
    """The policy ``text`` (a ``SPADE_BATCH_RETRY`` value) asks for: ``key=value`` pairs, comma-separated,
    of ``attempts`` (an integer), ``first_delay_s`` and ``max_delay_s`` (finite seconds); ``None`` or
    blank: the defaults. ValueError naming the variable for anything else."""
    if text is None or not text.strip():
        return RetryPolicy()
    types = {"attempts": int, "first_delay_s": float, "max_delay_s": float}
    values: dict[str, Any] = {}
    for item in text.split(","):
        key, equals, value = (part.strip() for part in item.partition("="))
        if not equals or key not in types:
            raise ValueError(f"{RETRY_ENV}={text!r}: {item.strip()!r} is not attempts=N, first_delay_s=S or max_delay_s=S")
        if key in values:
            raise ValueError(f"{RETRY_ENV}={text!r}: {key} is given twice")
        try:
            values[key] = types[key](value)
        except ValueError:
            raise ValueError(f"{RETRY_ENV}={text!r}: {key} must be {'an integer' if key == 'attempts' else 'a number of seconds'}, "
                             f"got {value!r}") from None
        if not math.isfinite(values[key]):
            raise ValueError(f"{RETRY_ENV}={text!r}: {key} must be finite, got {value!r}")
    try:
        return RetryPolicy(**values)
    except ValueError as error:
        raise ValueError(f"{RETRY_ENV}={text!r}: {error}") from None


RETRY = retry_policy_from(os.environ.get(RETRY_ENV))
"""The policy every storage call uses: by default about 7 s of waiting in all, on top of s3fs's
own retries; ``SPADE_BATCH_RETRY`` in the environment changes it (:func:`retry_policy_from`)."""

_TRANSIENT_ERRNOS = frozenset(
    {errno.EBUSY, errno.EAGAIN, errno.ETIMEDOUT, errno.ECONNRESET, errno.ECONNABORTED, errno.EPIPE, errno.EREMOTEIO}
)
_TRANSIENT_CODES = frozenset(
    {
        "SlowDown", "Throttling", "ThrottlingException", "ThrottledException", "RequestLimitExceeded",
        "TooManyRequestsException", "RequestThrottled", "RequestTimeout", "InternalError", "ServiceUnavailable",
    }
)
_PERMANENT = (FileNotFoundError, FileExistsError, PermissionError, IsADirectoryError, NotADirectoryError)
_TRANSIENT_TYPES = (
    TimeoutError,  # socket.timeout and asyncio.TimeoutError too
    ConnectionError,  # reset, aborted, refused, broken pipe
    FSTimeoutError,
    botocore.exceptions.HTTPClientError,  # connection closed, read timeout
    botocore.exceptions.ConnectionError,  # endpoint unreachable, connect timeout
    botocore.exceptions.IncompleteReadError,
    botocore.exceptions.ResponseStreamingError,
    aiohttp.ClientConnectionError,
    aiohttp.ClientPayloadError,
)


def is_transient(error: BaseException) -> bool:
    """True if ``error`` is a failure that a later retry may not meet: throttling, 5xx, reset, timeout.

    Looks through the chain of causes (s3fs turns a botocore error into an
    OSError caused by it). A missing file, a refused permission, a file that
    already exists, or bad content are never transient.
    """
    seen: set[int] = set()
    current: BaseException | None = error
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, TransientStorageError):
            return True
        if isinstance(current, _PERMANENT):
            return False
        if isinstance(current, _TRANSIENT_TYPES):
            return True
        if isinstance(current, botocore.exceptions.ClientError):
            response = current.response or {}
            status = response.get("ResponseMetadata", {}).get("HTTPStatusCode") or 0
            return response.get("Error", {}).get("Code") in _TRANSIENT_CODES or status >= 500 or status == 429
        if isinstance(current, OSError) and current.errno in _TRANSIENT_ERRNOS:
            return True
        current = current.__cause__ or current.__context__
    return False


def retrying(action: Callable[[], T], uri: str, what: str) -> T:
    """``action()`` (a call on the store at ``uri``), retried under :data:`RETRY` while it fails transiently; then
    TransientStorageError naming ``uri`` (passwords masked) and ``what`` the call did ("read", "write", ...)."""
    policy = RETRY
    for attempt in range(1, policy.attempts + 1):
        try:
            return action()
        except Exception as error:
            if not is_transient(error):
                raise
            reason = f"{type(error).__name__}: {first_line(error, 'no message')}"
            if attempt == policy.attempts:
                raise TransientStorageError(
                    errno.EAGAIN,
                    f"Cannot {what}: still failing for a transient reason after {attempt} attempts ({reason}); "
                    "the store is throttling, overloaded or unreachable. Re-run the same command to retry",
                    redact(uri),
                ) from error
            delay = policy.delay(attempt)
            log.warning("%s %s: transient failure (%s); attempt %d of %d in %.1f s", what, redact(uri), reason, attempt + 1, policy.attempts, delay)
            time.sleep(delay)
    raise AssertionError("unreachable: RetryPolicy.attempts >= 1")
