"""Logging setup: levels, and no credential in any line, at any level.

:func:`configure_logging` is called once per process (the CLI; the pipeline
should call it in each Ray worker too). Libraries that log request headers or
signing details at DEBUG (botocore, aiobotocore, s3fs, urllib3, ...) are kept
at WARNING or above whatever the level, and every formatted line, tracebacks
included, passes through :func:`redact`, which masks the known secret values
and anything shaped like an AWS key id, session token or signature.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
from collections.abc import Iterable, Iterator, Mapping
from typing import Any

from spade_batch.formats.text import redact

QUIET_LOGGERS = ("botocore", "boto3", "aiobotocore", "s3fs", "fsspec", "s3transfer", "urllib3", "aiohttp", "asyncio")
"""Loggers kept at WARNING or above: at DEBUG they print request headers (key ids, session tokens)."""
CHATTY_LOGGERS = ("faiss.loader",)
"""Loggers kept at WARNING or above except at DEBUG: their INFO lines say nothing an operator acts on (faiss's loader
tries its AVX builds in turn, and says so in four lines per process, one of them a ModuleNotFoundError)."""

_SECRET_NAME = re.compile(r"key|secret|token|password|passwd|credential|auth", re.IGNORECASE)
_MIN_SECRET_LEN = 4  # shorter values would mask ordinary words and digits


def secret_values(options: Mapping[str, Any] | None = None, environ: Mapping[str, str] | None = None) -> frozenset[str]:
    """Values to mask: string values under credential-like keys of ``options`` (at any depth), and of
    credential-like environment variables (``AWS_SECRET_ACCESS_KEY``, ``AWS_SESSION_TOKEN``, ...)."""
    found: set[str] = set()
    _collect(options or {}, found)
    for name, value in (os.environ if environ is None else environ).items():
        if _SECRET_NAME.search(name) and len(value) >= _MIN_SECRET_LEN:
            found.add(value)
    return frozenset(found)


def _collect(options: Mapping[str, Any], found: set[str]) -> None:
    for key, value in options.items():
        if isinstance(value, Mapping):
            _collect(value, found)
        elif isinstance(value, str) and _SECRET_NAME.search(str(key)) and len(value) >= _MIN_SECRET_LEN:
            found.add(value)


class RedactingFormatter(logging.Formatter):
    """A Formatter whose output (message, arguments and traceback) is passed through :func:`redact`."""

    def __init__(self, fmt: str, secrets: Iterable[str]) -> None:
        super().__init__(fmt)
        self.secrets = frozenset(secrets)

    def format(self, record: logging.LogRecord) -> str:
        return redact(super().format(record), self.secrets)


def configure_logging(level: str, secrets: Iterable[str] = ()) -> None:
    """One stderr handler on the root logger at ``level``, redacting ``secrets``; QUIET_LOGGERS at WARNING+.

    Replaces the root logger's handlers, so calling it again (another level,
    new secrets) does not duplicate lines.
    """
    handler = logging.StreamHandler()
    handler.setFormatter(RedactingFormatter("%(asctime)s %(levelname)s %(name)s: %(message)s", secrets))
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    set_level(level)


def set_level(level: str) -> None:
    """The root logger at ``level``, QUIET_LOGGERS at WARNING or above, CHATTY_LOGGERS too except at DEBUG."""
    logging.getLogger().setLevel(level)
    quiet = max(logging.WARNING, logging.getLevelName(level))
    for name in QUIET_LOGGERS:
        logging.getLogger(name).setLevel(quiet)
    for name in CHATTY_LOGGERS:
        logging.getLogger(name).setLevel(level if level == "DEBUG" else quiet)


@contextlib.contextmanager
def logging_at(level: str) -> Iterator[None]:
    """Inside the block, log at ``level`` (as :func:`set_level` sets it); after it, at the level before."""
    before = logging.getLevelName(logging.getLogger().level)
    set_level(level)
    try:
        yield
    finally:
        set_level(before)


def add_secrets(secrets: Iterable[str]) -> None:
    """Mask ``secrets`` too in every line that :func:`configure_logging`'s handler formats from now on
    (credentials known only once the process has started, such as a plan's lines' own)."""
    for handler in logging.getLogger().handlers:
        if isinstance(handler.formatter, RedactingFormatter):
            handler.formatter.secrets |= frozenset(secrets)
