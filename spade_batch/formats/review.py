"""The review sheet: a CSV of a night's flagged images that reviewers fill in, one verdict per row.

| column      | meaning                                                                       |
|-------------|-------------------------------------------------------------------------------|
| id          | the image's id in the run (scores table)                                      |
| uri         | where the image was read                                                      |
| image_score | its image score                                                               |
| mask_uri    | its mask                                                                      |
| verdict     | empty when written; the reviewer's `normal` (a false alarm) or `defect`, or left empty (not reviewed) |

`spade-batch show OUT --top N --format csv` writes it (sheet_csv); `add --verdicts` adds the images
marked normal (normal_images) and `show OUT --verdicts` counts the verdicts. Verdicts are read
case-insensitively, spaces trimmed; any other verdict is an error naming its row, and so are two rows of
one image (one id, or one uri) with different verdicts, and a row whose id is not the path of its uri.

A text cell that a spreadsheet would take for a formula (it begins with ``=``, ``+``, ``-``, ``@``, a tab or a
carriage return) is written with a single quote before it, as OWASP recommends against CSV injection; so is one
that begins with the quote itself, so that reading a cell back (one leading quote dropped before those) gives
exactly the name written, whether or not a spreadsheet kept the quote.
"""

from __future__ import annotations

import csv
import io
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from spade_batch.formats import storage
from spade_batch.formats.manifest import Manifest, normalize_id

COLUMNS = ("id", "uri", "image_score", "mask_uri", "verdict")
VERDICTS = ("normal", "defect")


@dataclass(frozen=True)
class Verdict:
    """One row of a filled-in sheet: its line number in the file (the header is line 1), image and verdict ("": not reviewed)."""

    line: int
    id: str
    uri: str
    verdict: str


FORMULA_STARTS = ("=", "+", "-", "@", "\t", "\r")
"""What a spreadsheet takes a cell beginning with for a formula (OWASP, CSV injection)."""
_QUOTED = (*FORMULA_STARTS, "'")


def safe_cell(text: str) -> str:
    """text as a cell no spreadsheet evaluates: a single quote before one that begins with FORMULA_STARTS or a quote."""
    return "'" + text if text.startswith(_QUOTED) else text


def read_cell(cell: str) -> str:
    """The text safe_cell wrote: one leading quote dropped before FORMULA_STARTS or a quote; any other cell as it is."""
    return cell[1:] if cell.startswith("'") and cell[1:].startswith(_QUOTED) else cell


def sheet_csv(rows: Iterable[dict[str, Any]]) -> str:
    """The sheet of these scores rows (id, uri, image_score, mask_uri), verdicts empty, text cells made safe (safe_cell)."""
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(COLUMNS)
    for row in rows:
        writer.writerow([safe_cell(row["id"]), safe_cell(row["uri"]), repr(float(row["image_score"])), safe_cell(row["mask_uri"]), ""])
    return out.getvalue()


def read_sheet(uri: str, options: storage.StorageOptions = None) -> list[Verdict]:
    """The rows of a filled-in sheet; a missing column or an unknown verdict is a ValueError naming the sheet and row."""
    reader = csv.DictReader(io.StringIO(storage.read_text(uri, options).removeprefix("\ufeff")))  # spreadsheets add a BOM
    missing = [column for column in ("id", "uri", "verdict") if column not in (reader.fieldnames or [])]
    if missing:
        semicolons = " It looks separated by semicolons: save it as comma-separated CSV." if ";" in "".join(reader.fieldnames or []) else ""
        raise ValueError(f"review sheet {uri} has no {', '.join(missing)} column (a sheet is what `spade-batch show OUT --format csv` "
                         f"writes).{semicolons}")
    verdicts: list[Verdict] = []
    judged: dict[tuple[str, str], Verdict] = {}  # ("id", id) and ("uri", uri) -> the first row that judged it
    for line, row in enumerate(reader, start=2):
        if not any(isinstance(value, str) and value.strip() for value in row.values()):
            continue  # a blank row a spreadsheet left
        here = Verdict(line, read_cell(row["id"] or ""), read_cell(row["uri"] or ""), (row["verdict"] or "").strip().lower())
        if here.verdict and here.verdict not in VERDICTS:
            raise ValueError(f"review sheet {uri} line {line} (id {here.id}): verdict {row['verdict']!r} is not "
                             f"{' or '.join(VERDICTS)} (or empty: not reviewed)")
        if not names(here.id, here.uri):
            raise ValueError(f"review sheet {uri} line {line}: id {here.id!r} is not the path of its uri {here.uri!r} "
                             "(a row's id is its image's path below the run's images); the row was edited or mixed with another: "
                             "write the sheet again (`spade-batch show OUT --format csv`) and copy the verdicts over")
        for key in (("id", here.id), ("uri", here.uri)) if here.verdict else ():
            earlier = judged.setdefault(key, here)
            if earlier.verdict != here.verdict:
                raise ValueError(f"review sheet {uri} lines {earlier.line} and {line} ({key[0]} {key[1]}): verdicts {earlier.verdict!r} "
                                 f"and {here.verdict!r} disagree; keep one")
        verdicts.append(here)
    return verdicts


def names(image_id: str, uri: str) -> bool:
    """Whether image_id is the path of uri below some root: its last segments, once both are normalised."""
    path = normalize_id(storage.split_uri(uri)[1])
    image_id = normalize_id(image_id)
    return bool(image_id) and (path == image_id or path.endswith("/" + image_id))


def normal_images(verdicts: Iterable[Verdict]) -> Manifest:
    """The images marked normal, as a manifest to add. Each is named by its URI's path (a bucket's name included,
    the scheme left out): nights that reuse a file name under other folders add distinct images, and the same
    sheet added again adds nothing."""
    uris = {row.uri: normalize_id(storage.split_uri(row.uri)[1]) for row in verdicts if row.verdict == "normal"}
    ordered = sorted(uris.items(), key=lambda item: item[1])
    return Manifest("", tuple(image_id for _, image_id in ordered), tuple(uri for uri, _ in ordered))
