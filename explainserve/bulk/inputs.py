"""The inputs of a bulk run: every picture and clip under a folder, or the rows of a manifest.

A manifest is a ``.txt`` file (one path per line), a ``.csv`` file with a ``path`` column, or a
``.jsonl`` file of objects with a ``path``; CSV and JSONL rows may carry a ``label`` (a class
index, scored for anomalies too). Relative paths resolve from the manifest's folder.
"""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from explainserve.inputs import decode_image

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
CLIP_SUFFIXES = (".npy",)
MANIFEST_SUFFIXES = (".txt", ".csv", ".jsonl")


@dataclass(frozen=True)
class BulkInput:
    """One input: ``id`` names it in results.jsonl (its path relative to the folder or manifest)."""

    id: str
    path: Path
    label: int | None = None


def is_bulk_source(path: Path) -> bool:
    """A folder or a manifest (as opposed to one picture or clip)."""
    return path.is_dir() or path.suffix.lower() in MANIFEST_SUFFIXES


def list_inputs(source: Path, exclude: Path | None = None) -> list[BulkInput]:
    """The inputs of a folder (recursively, sorted by path) or of a manifest (in its order).

    exclude : a folder whose files are never inputs (the output folder, if it lies inside ``source``)

    Raises ValueError for a source that is neither, or a manifest row without a path; a
    row whose label is not a class index becomes an input whose loading fails (an error line).
    """
    source = Path(source)
    if source.is_dir():
        skip = Path(exclude).resolve() if exclude is not None else None
        files = sorted(p for p in source.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES + CLIP_SUFFIXES
                       and not (skip and p.resolve().is_relative_to(skip)))
        return [BulkInput(p.relative_to(source).as_posix(), p) for p in files]
    suffix = source.suffix.lower()
    if suffix not in MANIFEST_SUFFIXES or not source.is_file():
        raise ValueError(f"input: expected a folder or a manifest file ({', '.join(MANIFEST_SUFFIXES)}), got {source}")
    text = source.read_text()
    if suffix == ".txt":
        rows = [{"path": line.strip()} for line in text.splitlines() if line.strip() and not line.startswith("#")]
    elif suffix == ".csv":
        rows = list(csv.DictReader(text.splitlines()))
    else:
        rows = [json.loads(line) for line in text.splitlines() if line.strip()]
    inputs = []
    for number, row in enumerate(rows, start=1):
        if not row.get("path"):
            raise ValueError(f"{source}: row {number} has no path")
        path = Path(row["path"])
        inputs.append(BulkInput(row["path"], path if path.is_absolute() else source.parent / path,
                                row.get("label") if row.get("label") not in ("", None) else None))
    return inputs


def load(item: BulkInput) -> np.ndarray:
    """The input's pixels: uint8 (H, W, 3) for a picture, (T, H, W, 3) for a .npy clip.

    Raises ValueError naming the input when it cannot be read, decoded or has the wrong shape.
    """
    try:
        if item.path.suffix.lower() not in CLIP_SUFFIXES:
            return decode_image(item.path.read_bytes(), what=item.id)
        clip = np.load(item.path, allow_pickle=False)
    except OSError as error:
        raise ValueError(f"{item.id}: cannot be read: {error.strerror or error}") from None
    except ValueError as error:
        if item.path.suffix.lower() not in CLIP_SUFFIXES:
            raise  # decode_image's message names the input already
        raise ValueError(f"{item.id}: not a .npy array: {error}") from None
    if clip.dtype != np.uint8 or clip.ndim != 4 or clip.shape[3] != 3:
        raise ValueError(f"{item.id}: expected a uint8 (T, H, W, 3) clip, got {clip.dtype} {clip.shape}")
    return clip


def label_index(item: BulkInput) -> int | None:
    """The input's label as a class index; ValueError when it is not a non-negative integer."""
    if item.label is None:
        return None
    try:
        value = int(item.label)
    except (TypeError, ValueError):
        value = -1
    if value < 0 or str(item.label).strip() != str(value):
        raise ValueError(f"{item.id}: label: expected a class index (an integer >= 0), got {item.label!r}")
    return value
