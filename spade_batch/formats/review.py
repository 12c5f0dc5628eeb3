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
one image with different verdicts.
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


def sheet_csv(rows: Iterable[dict[str, Any]]) -> str:
    """The sheet of these scores rows (id, uri, image_score, mask_uri), verdicts empty."""
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(COLUMNS)
    for row in rows:
        writer.writerow([row["id"], row["uri"], repr(float(row["image_score"])), row["mask_uri"], ""])
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
    judged: dict[str, Verdict] = {}
    for line, row in enumerate(reader, start=2):
        if not any(isinstance(value, str) and value.strip() for value in row.values()):
            continue  # a blank row a spreadsheet left
        verdict = (row["verdict"] or "").strip().lower()
        if verdict and verdict not in VERDICTS:
            raise ValueError(f"review sheet {uri} line {line} (id {row['id']}): verdict {row['verdict']!r} is not "
                             f"{' or '.join(VERDICTS)} (or empty: not reviewed)")
        earlier = judged.setdefault(row["id"], Verdict(line, row["id"], row["uri"], verdict)) if verdict else None
        if earlier is not None and earlier.verdict != verdict:
            raise ValueError(f"review sheet {uri} lines {earlier.line} and {line} (id {row['id']}): verdicts {earlier.verdict!r} and "
                             f"{verdict!r} disagree; keep one")
        verdicts.append(Verdict(line, row["id"], row["uri"], verdict))
    return verdicts


def normal_images(verdicts: Iterable[Verdict]) -> Manifest:
    """The images marked normal, as a manifest to add. Each is named by its URI's path (a bucket's name included,
    the scheme left out): nights that reuse a file name under other folders add distinct images, and the same
    sheet added again adds nothing."""
    uris = {row.uri: normalize_id(storage.split_uri(row.uri)[1]) for row in verdicts if row.verdict == "normal"}
    ordered = sorted(uris.items(), key=lambda item: item[1])
    return Manifest("", tuple(image_id for _, image_id in ordered), tuple(uri for uri, _ in ordered))
