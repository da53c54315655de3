"""``--data`` sources of a user's samples: image folders, clip folders and manifests.

Spellings::

    imagefolder:DIR   DIR/train/<class>/<file>, DIR/val/<class>/<file>; files are images, or
                      video files for a video model. DIR/<class>/<file> (no split folders):
                      training samples only
    clipfolder:DIR    DIR/<split>/<class>/<clip>/<frame files, sorted by name>
    manifest:FILE     CSV or JSON Lines rows with path, label (class name or index), split

Without a val split, ``val_fraction`` holds out a deterministic part of each class
(:func:`explainserve.data.holdout.hold_out`); ``limit`` and ``val_limit`` keep a deterministic,
per-class stratified subset (:mod:`explainserve.data.stratified`). The rules are recorded in the
store's manifest.
Sample ids (the store's exemplar ids) are positions in the training list, which is sorted by
class index, then by path (folders) or row (manifests), identically in every shard.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from explainserve.data.classes import class_index, label_index
from explainserve.data.files import SampleFile, visible
from explainserve.data.holdout import HOLDOUT_RULE, hold_out
from explainserve.data.manifest import read_manifest
from explainserve.data.stratified import STRATIFIED_RULE, stratified_subset

SOURCE_KINDS = ("imagefolder", "clipfolder", "manifest")


@dataclass
class DataSplits:
    """The training and validation samples of a --data source.

    Attributes
    ----------
    train, val : list of SampleFile
        Training samples sorted by class (ids are positions in ``train``); val in source order.
    record : dict
        Where the samples came from and how val was chosen; kept in the store's manifest.
    """

    train: list[SampleFile]
    val: list[SampleFile]
    record: dict = field(default_factory=dict)


def is_file_source(spec: str) -> bool:
    return spec.partition(":")[0] in SOURCE_KINDS and ":" in spec


def open_source(spec: str, class_names: list[str], *, val_fraction: float | None = None,
                limit: int | None = None, val_limit: int | None = None, root: Path | None = None) -> DataSplits:
    """List the samples of ``spec`` and map their classes onto the model's.

    Parameters
    ----------
    spec : str
        ``imagefolder:DIR``, ``clipfolder:DIR`` or ``manifest:FILE``.
    class_names : list of str
        The model's classes.
    val_fraction : float, optional
        Holdout per class when the source has no val samples; in (0, 1).
    limit, val_limit : int, optional
        Keep at most this many training (validation) samples, a per-class stratified choice
        (:func:`explainserve.data.stratified.stratified_subset`, after the holdout); recorded.
    root : Path, optional
        Relative DIR or FILE are taken from here (the current folder by default).

    Raises
    ------
    ValueError
        Unknown spelling, missing folder or file, class names the model lacks, no val split
        and no ``val_fraction``, or both a val split and ``val_fraction``.
    """
    kind, _, location = spec.partition(":")
    if kind not in SOURCE_KINDS or not location:
        raise ValueError(f"--data: expected one of {[k + ':PATH' for k in SOURCE_KINDS]} or a demo dataset, got {spec!r}")
    path = (root or Path.cwd()) / location
    if kind == "manifest":
        train, val = manifest_samples(path, class_names, spec)
        data_root = path.parent
    else:
        train, val = folder_samples(path, class_names, spec)
        data_root = path
    record = {"source": spec}
    if val and val_fraction is not None:
        raise ValueError(f"--val-fraction: {spec} has a val split already; drop --val-fraction")
    if not val:
        if val_fraction is None:
            raise ValueError(f"--data {spec}: no val samples to calibrate on; add a val split or pass --val-fraction F")
        train, val = hold_out(train, val_fraction, data_root)
        record["val_holdout"] = {"fraction": val_fraction, "rule": HOLDOUT_RULE}
    if limit is not None:
        train = stratified_subset(train, limit, data_root)
        record["limit"] = {"train": limit, "rule": STRATIFIED_RULE}
    if val_limit is not None:
        val = stratified_subset(val, val_limit, data_root)
        record["val_limit"] = {"val": val_limit, "rule": STRATIFIED_RULE}
    train.sort(key=lambda sample: sample.label)  # stable: paths (folders) or rows (manifests) within a class
    return DataSplits(train, val, record)


def folder_samples(root: Path, class_names: list[str], spec: str) -> tuple[list[SampleFile], list[SampleFile]]:
    """(train, val) of ``root/<split>/<class>/<entry>``; an entry is a file or a clip folder.

    A ``root`` without ``train/`` or ``val/`` whose folders include a class of the model is
    read as ``root/<class>/<entry>`` (torchvision's ImageFolder layout): training samples only.
    """
    splits = {split: root / split for split in ("train", "val") if (root / split).is_dir()}
    if not splits:
        folders = {folder.name for folder in class_folders(root)} if root.is_dir() else set()
        if not folders & set(class_names):
            raise ValueError(f"--data {spec}: {root / 'train'} is not a folder (expected <split>/<class>/<sample>, "
                             f"or <class>/<sample> for training samples only, with folders named as the archive's "
                             f"classes)")
        splits = {"train": root}
    if "train" not in splits:
        raise ValueError(f"--data {spec}: {root / 'train'} is not a folder (expected <split>/<class>/<sample>)")
    samples = {"train": [], "val": []}
    for split, location in splits.items():
        folders = class_folders(location)
        index = class_index((folder.name for folder in folders), class_names, f"--data {spec} ({split})")
        samples[split] = [SampleFile(entry, index[folder.name]) for folder in folders
                          for entry in sorted(folder.iterdir()) if visible(entry)]
    return samples["train"], samples["val"]


def class_folders(location: Path) -> list[Path]:
    """The visible sub-folders of ``location``, sorted by name."""
    return sorted(p for p in location.iterdir() if visible(p) and p.is_dir())


def manifest_samples(path: Path, class_names: list[str], spec: str) -> tuple[list[SampleFile], list[SampleFile]]:
    """(train, val) rows of a manifest; rows without a split are training rows."""
    rows = read_manifest(path)
    names = {label for _, label, _ in rows if isinstance(label, str) and not label.strip().isdigit()}
    class_index(names, class_names, f"--data {spec}")  # every unknown name at once
    train, val = [], []
    for number, (sample, label, split) in enumerate(rows):
        chosen = {"train": train, None: train, "val": val}.get(split)
        if chosen is not None:
            chosen.append(SampleFile(sample, label_index(label, class_names, f"{path} row {number + 1}")))
    return train, val
