"""A deterministic per-class validation holdout, for data without a val split."""

from __future__ import annotations

import hashlib
import math
from collections import defaultdict
from pathlib import Path

from explainserve.data.files import SampleFile

HOLDOUT_RULE = ("per class, the floor(fraction x n + 0.5) samples whose sha256 of the path relative "
                "to the data root sorts first")


def check_fraction(fraction: float) -> float:
    if not 0 < fraction < 1:
        raise ValueError(f"--val-fraction: must be in (0, 1), got {fraction}")
    return fraction


def hold_out(samples: list[SampleFile], fraction: float, root: Path) -> tuple[list[SampleFile], list[SampleFile]]:
    """Split samples into (train, val), holding out ``fraction`` of each class.

    The choice depends only on each sample's path relative to ``root`` (its sha256), so it
    is the same on every machine and shard, whatever the listing order, and adding files to
    one class never moves another class's samples.

    Parameters
    ----------
    samples : list of SampleFile
    fraction : float
        In (0, 1).
    root : Path
        The data root the paths are made relative to.

    Returns
    -------
    (list of SampleFile, list of SampleFile)
        Train and val, each in the order of ``samples``.
    """
    check_fraction(fraction)
    by_class: dict[int, list[SampleFile]] = defaultdict(list)
    for sample in samples:
        by_class[sample.label].append(sample)
    held: set[Path] = set()
    for members in by_class.values():
        ranked = sorted(members, key=lambda s: path_key(s.path, root))
        held.update(s.path for s in ranked[:math.floor(fraction * len(members) + 0.5)])
    return [s for s in samples if s.path not in held], [s for s in samples if s.path in held]


def path_key(path: Path, root: Path) -> str:
    """The sha256 of ``path`` relative to ``root``: a sample's place in a deterministic choice."""
    return hashlib.sha256(relative(path, root).encode()).hexdigest()


def relative(path: Path, root: Path) -> str:
    try:
        return path.relative_to(root).as_posix()
    except ValueError:
        return path.as_posix()
