"""Build a distribution store (or one shard of it) from a stream of training alpha vectors."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterable
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
from numpy.lib.format import open_memmap
from tqdm import tqdm

from explainserve.anomaly.spill import ClassSpill
from explainserve.anomaly.store import (ARRAY_SPECS, BUILD_TIME_FORMAT, MANIFEST, StoreMeta,
                                        array_shape, finalise_store)
from explainserve.anomaly.summary import NO_EXEMPLAR, PERCENTILE_LEVELS, ClassSummary, summarise_class

DEFAULT_TOP_K = 4  # the thesis shows the top four training images per filter (fig. 6.11)
MAX_IMAGE_ID = np.iinfo(np.int32).max


def default_build_time() -> str:
    """ISO 8601 UTC build time: ``SOURCE_DATE_EPOCH`` when set (reproducible builds), else now.

    Every shard of one build should get the same value, so the merged store is byte-identical
    to an unsharded build.
    """
    epoch = os.environ.get("SOURCE_DATE_EPOCH")
    moment = datetime.fromtimestamp(int(epoch), timezone.utc) if epoch else datetime.now(timezone.utc)
    return moment.strftime(BUILD_TIME_FORMAT)


def shard_classes(num_classes: int, shard_index: int, num_shards: int) -> range:
    """The contiguous, disjoint slice of classes shard ``shard_index`` of ``num_shards`` builds.

    Raises
    ------
    ValueError
        If ``num_shards`` is not in [1, num_classes] or ``shard_index`` not in [0, num_shards).
    """
    if not 1 <= num_shards <= num_classes:
        raise ValueError(f"num_shards must be in [1, {num_classes}] (the number of classes), got {num_shards}")
    if not 0 <= shard_index < num_shards:
        raise ValueError(f"shard index must be in [0, {num_shards - 1}], got {shard_index}")
    return range(shard_index * num_classes // num_shards, (shard_index + 1) * num_classes // num_shards)


def check_alpha_batch(alpha, classes, image_ids, num_classes: int, num_filters: int):
    """Validate one batch of training rows; returns (alpha float32, classes int64, ids int64)."""
    alpha = np.asarray(alpha, dtype=np.float32)
    classes, image_ids = np.asarray(classes), np.asarray(image_ids)
    if not (np.issubdtype(classes.dtype, np.integer) and np.issubdtype(image_ids.dtype, np.integer)):
        raise ValueError(f"classes and image_ids must be integers, got {classes.dtype} and {image_ids.dtype}")
    classes, image_ids = classes.astype(np.int64, copy=False), image_ids.astype(np.int64, copy=False)
    if alpha.ndim != 2 or alpha.shape[1] != num_filters:
        raise ValueError(f"alpha must have shape (B, {num_filters}), got {alpha.shape}")
    if classes.shape != (len(alpha),) or image_ids.shape != (len(alpha),):
        raise ValueError(f"classes and image_ids must have shape ({len(alpha)},), got {classes.shape} and {image_ids.shape}")
    if not np.isfinite(alpha).all():
        raise ValueError("alpha contains NaN or infinite values")
    if len(classes) and (classes.min() < 0 or classes.max() >= num_classes):
        raise ValueError(f"class ids must be in [0, {num_classes - 1}], got {classes.min()}..{classes.max()}")
    if len(image_ids) and (image_ids.min() < 0 or image_ids.max() > MAX_IMAGE_ID):
        raise ValueError(f"image ids must be in [0, {MAX_IMAGE_ID}]")
    return alpha, classes, image_ids


def write_class_arrays(directory: Path, summaries: Iterable[ClassSummary | None], num_classes: int,
                       num_filters: int, top_k: int) -> None:
    """Write every store array, one class row at a time, from the classes' summaries.

    Parameters
    ----------
    directory : Path
        The store folder (exists).
    summaries : iterable of ClassSummary or None
        One per class held, in class order; None for a class without training images (NaN
        statistics, no exemplars).
    num_classes, num_filters, top_k : int
        C (of this store or shard), K and k.
    """
    outputs = {
        name: open_memmap(directory / f"{name}.npy", mode="w+", dtype=dtype,
                          shape=array_shape(name, num_classes, num_filters, len(PERCENTILE_LEVELS), top_k))
        for name, (dtype, _) in ARRAY_SPECS.items()
    }
    for row, summary in enumerate(summaries):
        for name, array in outputs.items():
            if summary is None:
                array[row] = NO_EXEMPLAR if name == "exemplars" else np.nan
            else:
                array[row] = getattr(summary, name)
    for array in outputs.values():
        array.flush()


def build_store(batches: Iterable, out: str | os.PathLike, meta: StoreMeta, *,
                shard_index: int = 0, num_shards: int = 1, top_k: int = DEFAULT_TOP_K,
                build_time: str | None = None, progress: bool = False, data: dict | None = None) -> Path:
    """Build the store of training distributions, or one shard of it.

    Rows are spilled per class to a scratch directory, then each class is summarised alone
    (exact percentiles; memory bounded by one class's values).

    Parameters
    ----------
    batches : iterable of (alpha, classes, image_ids)
        alpha (B, K) float32 Grad-AMap scores computed for each image's ground-truth class,
        classes (B,) int ground-truth class ids, image_ids (B,) int ids in [0, 2**31).
        Rows of classes outside this shard are ignored. Row order within a class must not
        depend on the sharding (use the dataset order).
    out : path-like
        Output directory (created; its manifest is removed first and written last).
    meta : StoreMeta
    shard_index, num_shards : int
        Build the slice :func:`shard_classes` gives; (0, 1) builds the whole store.
    top_k : int
        Exemplar ids kept per (class, filter), >= 1.
    build_time : str, optional
        Defaults to :func:`default_build_time`.
    progress : bool
        Show a tqdm bar over classes.
    data : dict, optional
        Where the training samples came from (JSON), kept in the manifest's ``data``.

    Returns
    -------
    Path
        ``out``.
    """
    if top_k < 1:
        raise ValueError(f"top_k must be >= 1, got {top_k}")
    if build_time is not None:
        try:
            datetime.strptime(build_time, BUILD_TIME_FORMAT)
        except ValueError:
            raise ValueError(f"build_time must be ISO 8601 UTC like 2026-01-01T00:00:00Z, got {build_time!r}") from None
    num_classes, num_filters = len(meta.class_names), meta.num_filters
    held = shard_classes(num_classes, shard_index, num_shards)
    directory = Path(out)
    directory.mkdir(parents=True, exist_ok=True)
    (directory / MANIFEST).unlink(missing_ok=True)

    with tempfile.TemporaryDirectory(prefix="explainserve-spill-") as scratch:
        spill = ClassSpill(Path(scratch), num_filters)
        for alpha, classes, image_ids in batches:
            alpha, classes, image_ids = check_alpha_batch(alpha, classes, image_ids, num_classes, num_filters)
            mine = (classes >= held.start) & (classes < held.stop)
            if mine.any():
                spill.add(alpha[mine], classes[mine], image_ids[mine])

        counts = []

        def summaries():
            for class_id in tqdm(held, desc="summarising classes", unit="class", disable=not progress):
                values, image_ids = spill.read(class_id)
                counts.append(len(values))
                yield summarise_class(values, image_ids, top_k) if len(values) else None

        write_class_arrays(directory, summaries(), len(held), num_filters, top_k)

    shard = None if num_shards == 1 else {"index": shard_index, "count": num_shards, "classes": [held.start, held.stop]}
    finalise_store(directory, meta, counts=counts, top_k=top_k, levels=PERCENTILE_LEVELS,
                   build_time=build_time or default_build_time(), shard=shard, data=data)
    return directory
