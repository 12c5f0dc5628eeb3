"""What people read of an error or a number: an error's first line, a number or the blank that stands for none, and
text with its credentials masked. The standard library only; every layer and the operator's surface use it."""

from __future__ import annotations

import re
from collections.abc import Iterable

MASK = "***"
_ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")
_USERINFO = re.compile(r"\b([A-Za-z][\w+.-]*://)[^/@\s]*@")
_PATTERNS = (
    re.compile(r"\b(?:AKIA|ASIA|AROA|AIDA)[A-Z0-9]{12,}\b"),  # AWS access key ids
    re.compile(r"(?i)(x-amz-security-token|authorization|x-amz-credential|credential|signature)([\"']?\s*[:=]\s*[\"']?)[^\s,;\"'&]+"),
)


def first_line(error: BaseException, if_empty: str | None = None) -> str:
    """The first line of the error's message, without colour codes; if_empty (default: the error type's name) when the
    message is blank."""
    text = _ANSI.sub("", str(error)).strip()
    return text.splitlines()[0] if text else if_empty or type(error).__name__


BLANK = "n/a"
"""What every table and page prints for a number that is not there (no threshold, a metric with one class)."""


def format_number(value: float | None, spec: str = ".4g") -> str:
    """`value` formatted by `spec` (a format spec: ".4g", ".4f"), or BLANK for None."""
    return BLANK if value is None else format(value, spec)


def format_share(values: dict | None, ratio: str, count: str, total: str, spec: str = ".3f") -> str:
    """'0.125 (1 of 8)': values[ratio] formatted by `spec`, with values[count] of values[total]; BLANK when either is None."""
    if values is None or values[ratio] is None:
        return BLANK
    return f"{format(values[ratio], spec)} ({values[count]} of {values[total]})"


def redact(text: str, secrets: Iterable[str] = ()) -> str:
    """`text` with every value of `secrets`, the user:password part of any URL, and every credential-shaped string (an
    AWS key id, a session token, a signature) replaced by ``***``."""
    for secret in sorted(secrets, key=len, reverse=True):  # longest first: one secret may contain another
        text = text.replace(secret, MASK)
    text = _USERINFO.sub(rf"\1{MASK}@", text)
    text = _PATTERNS[0].sub(MASK, text)
    return _PATTERNS[1].sub(lambda m: m.group(1) + m.group(2) + MASK, text)
