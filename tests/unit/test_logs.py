"""logs.py: no credential reaches a log line, whatever the level."""

from __future__ import annotations

import logging

import pytest

from spade_batch.formats.text import MASK, redact
from spade_batch.logs import CHATTY_LOGGERS, add_secrets, configure_logging, logging_at, secret_values


def test_secret_values_come_from_credential_keys_at_any_depth_and_from_the_environment():
    options = {"key": "AKIDVALUE1", "anon": False, "client_kwargs": {"aws_session_token": "tok-123", "region_name": "eu-west-1"}}
    environ = {"AWS_SECRET_ACCESS_KEY": "env-secret", "HOME": "/root", "GITHUB_TOKEN": "ab"}
    assert secret_values(options, environ) == {"AKIDVALUE1", "tok-123", "env-secret"}


@pytest.mark.parametrize(
    ("text", "hidden"),
    [
        ("key hunter22 used", "hunter22"),
        ("Credential=AKIAIOSFODNN7EXAMPLE/20260101/us-west-2/s3/aws4_request", "AKIAIOSFODNN7EXAMPLE"),
        ("{'X-Amz-Security-Token': 'FwoGZXIvYXdzEJr//////////wEaDNs'}", "FwoGZXIvYXdzEJr"),
        ("Authorization: AWS4-HMAC-SHA256", "AWS4-HMAC-SHA256"),
        ("Signature=0123456789abcdef0123", "0123456789abcdef0123"),
        ("ASIAXXXXXXXXXXXXXXXX in a message", "ASIAXXXXXXXXXXXXXXXX"),
    ],
)
def test_redact_masks_known_values_and_credential_shapes(text, hidden):
    out = redact(text, {"hunter22"})
    assert hidden not in out and MASK in out


def test_debug_logging_keeps_libraries_quiet_and_redacts_tracebacks(restore_logging, capfd):
    configure_logging("DEBUG", {"s3cr3t-value"})
    logging.getLogger("botocore.endpoint").debug("Sending http request: headers X-Amz-Security-Token: s3cr3t-value")
    logging.getLogger("spade_batch.test").debug("own debug line")
    try:
        raise OSError("failed with s3cr3t-value")
    except OSError:
        logging.getLogger("spade_batch.test").debug("traceback", exc_info=True)
    err = capfd.readouterr().err
    assert "own debug line" in err and "OSError: failed with ***" in err
    assert "Sending http request" not in err
    assert "s3cr3t-value" not in err


def test_configure_logging_twice_does_not_duplicate_lines(restore_logging, capfd):
    configure_logging("INFO")
    configure_logging("INFO")
    logging.getLogger("spade_batch.test").info("once")
    assert capfd.readouterr().err.count("once") == 1


def test_secrets_added_later_are_masked_and_a_level_holds_only_inside_its_block(restore_logging, capfd):
    configure_logging("INFO", {"first-secret"})
    add_secrets({"later-secret"})
    log = logging.getLogger("spade_batch.test")
    with logging_at("DEBUG"):
        log.debug("inside: later-secret and first-secret")
    log.debug("after the block")
    err = capfd.readouterr().err
    assert "inside: *** and ***" in err and "secret" not in err
    assert "after the block" not in err and logging.getLogger().level == logging.INFO


def test_faiss_loaders_info_lines_are_silent_except_at_debug(restore_logging, capfd):
    """Every command printed four faiss.loader INFO lines (one a ModuleNotFoundError), even on a usage error."""
    assert "faiss.loader" in CHATTY_LOGGERS
    configure_logging("INFO")
    logging.getLogger("faiss.loader").info("Loading faiss with AVX2 support.")
    logging.getLogger("faiss.loader").warning("a warning still shows")
    logging.getLogger("spade_batch.test").info("own info line")
    with logging_at("DEBUG"):
        logging.getLogger("faiss.loader").info("shown at DEBUG")
    logging.getLogger("faiss.loader").info("quiet again")
    err = capfd.readouterr().err
    assert "Loading faiss" not in err and "quiet again" not in err
    assert "a warning still shows" in err and "own info line" in err and "shown at DEBUG" in err
