"""Read a manifest of labelled samples: CSV with a header, or JSON Lines."""

from __future__ import annotations

import csv
import json
from pathlib import Path

SPLITS = ("train", "val", "test")  # test rows are read and not used


def read_manifest(path: Path) -> list[tuple[Path, object, str | None]]:
    """Rows of ``path`` as (sample path, label, split or None).

    CSV (``.csv``, a header with ``path`` and ``label`` and optionally ``split``) or JSON Lines
    (``.jsonl``, one object per line with the same keys). A label is a class name or an
    integer index into the model's classes. Relative sample paths are taken from the
    manifest's folder.

    Raises
    ------
    ValueError
        Unknown format, a missing column or key, an unknown split; the message names the line.
    """
    if not path.is_file():
        raise ValueError(f"--data manifest:{path}: no such file")
    suffix = path.suffix.lower()
    if suffix == ".csv":
        with open(path, newline="") as handle:
            records = list(enumerate(csv.DictReader(handle), start=2))
    elif suffix in (".jsonl", ".ndjson"):
        records = []
        for number, line in enumerate(path.read_text().splitlines(), start=1):
            if line.strip():
                try:
                    records.append((number, json.loads(line)))
                except ValueError as error:
                    raise ValueError(f"{path}:{number}: not a JSON object ({error})") from None
    else:
        raise ValueError(f"--data manifest:{path}: expected a .csv or .jsonl file")
    return [row(path, number, record) for number, record in records]


def row(manifest: Path, number: int, record) -> tuple[Path, object, str | None]:
    where = f"{manifest}:{number}"
    if not isinstance(record, dict) or not record.get("path") or record.get("label") in (None, ""):
        raise ValueError(f"{where}: each row needs a path and a label")
    split = record.get("split") or None
    if split is not None and split not in SPLITS:
        raise ValueError(f"{where}: split {split!r} is not one of {list(SPLITS)}")
    return manifest.parent / str(record["path"]), record["label"], split
