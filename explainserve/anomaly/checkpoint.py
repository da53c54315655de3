"""Finished classes of a build kept on disk, so that a build restarted after a crash skips them."""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import fields
from pathlib import Path

import numpy as np

from explainserve.anomaly.summary import ClassSummary

FINGERPRINT = "fingerprint.json"


class ClassCheckpoint:
    """One summary file and one record per finished class, in a folder beside the store.

    Each class is written to a temporary name and renamed into place, so a class is either
    finished whole or absent, whatever kills the build. A folder left by a build with another
    fingerprint (other arguments, model or data) is emptied first.

    Parameters
    ----------
    directory : Path
        The checkpoint folder (created).
    fingerprint : dict
        JSON-serialisable description of everything the summaries depend on.
    """

    def __init__(self, directory: Path, fingerprint: dict):
        self.directory = Path(directory)
        stamp = json.dumps(fingerprint, sort_keys=True)
        marker = self.directory / FINGERPRINT
        if self.directory.exists() and (not marker.is_file() or marker.read_text() != stamp):
            shutil.rmtree(self.directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        if not marker.is_file():
            atomic_write(marker, stamp.encode())

    def finished(self) -> dict[int, dict]:
        """Class id -> its record, for every finished class."""
        return {int(path.stem): json.loads(path.read_text()) for path in self.directory.glob("*.json")
                if path.name != FINGERPRINT}

    def save(self, class_id: int, summary: ClassSummary | None, record: dict) -> None:
        """Keep a finished class: its summary (None without training samples), then its record
        (the record's presence marks the class finished)."""
        if summary is not None:
            temporary = self.directory / f"{class_id}.tmp.npz"
            np.savez(temporary, **{item.name: getattr(summary, item.name) for item in fields(ClassSummary)})
            os.replace(temporary, self.directory / f"{class_id}.npz")
        atomic_write(self.directory / f"{class_id}.json", json.dumps(record, sort_keys=True).encode())

    def summary(self, class_id: int) -> ClassSummary | None:
        path = self.directory / f"{class_id}.npz"
        if not path.is_file():
            return None
        with np.load(path) as arrays:
            return ClassSummary(**{item.name: arrays[item.name] for item in fields(ClassSummary)})


def atomic_write(path: Path, data: bytes) -> None:
    temporary = path.with_name(path.name + ".tmp")
    with open(temporary, "wb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(temporary, path)
