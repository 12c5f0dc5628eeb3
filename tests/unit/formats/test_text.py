"""The one text helper: an error's first line, a number or its blank, credentials masked."""

from spade_batch.formats.text import BLANK, MASK, first_line, format_number, format_share, redact


def test_first_line_drops_colour_codes_and_later_lines_and_names_a_blank_error():
    assert first_line(ValueError("\x1b[31mbad value\x1b[0m\n  detail")) == "bad value"
    assert first_line(KeyError()) == "KeyError"
    assert first_line(OSError(""), "no message") == "no message"


def test_a_number_or_the_one_blank_every_table_and_page_prints():
    assert format_number(0.123456) == "0.1235"
    assert format_number(0.5, ".4f") == "0.5000"
    assert format_number(None) == format_number(None, ".4f") == BLANK == "n/a"


def test_a_share_with_its_count_or_the_blank():
    flagged = {"fpr": 0.125, "flagged_normal": 1, "normal": 8}
    assert format_share(flagged, "fpr", "flagged_normal", "normal") == "0.125 (1 of 8)"
    assert format_share(flagged, "fpr", "flagged_normal", "normal", ".4f") == "0.1250 (1 of 8)"
    assert format_share(None, "fpr", "flagged_normal", "normal") == format_share({**flagged, "fpr": None}, "fpr", "flagged_normal", "normal") == BLANK


def test_redact_masks_secrets_url_passwords_and_key_ids_and_nothing_else():
    text = "s3://user:hunter22@bucket/x failed with AKIAABCDEFGHIJKLMNOP; see /data/a@b.png and token hunter22"
    masked = redact(text, {"hunter22"})
    assert "hunter22" not in masked and "AKIA" not in masked
    assert masked.startswith(f"s3://{MASK}@bucket/x") and "/data/a@b.png" in masked
