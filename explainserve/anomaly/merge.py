"""Join the shards of a sharded build into one store, byte-identical to an unsharded build."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

from numpy.lib.format import open_memmap

from explainserve.anomaly.store import (ARRAY_SPECS, MANIFEST, StoreError, finalise_store,
                                        load_store)


def merge_stores(shard_paths: Sequence[str | os.PathLike], out: str | os.PathLike) -> Path:
    """Merge every shard of one build.

    Parameters
    ----------
    shard_paths : sequence of path-like
        The shard stores, in any order; all ``count`` of them, each verified on load.
    out : path-like
        Output store directory.

    Returns
    -------
    Path
        ``out``. The merged build time is the latest shard build time.

    Raises
    ------
    StoreError
        A shard is corrupt, is not a shard, or the shards disagree on the model, the layer,
        the classes, the grid or the shard count, or do not cover every class once.
    """
    shards = sorted((load_store(path) for path in shard_paths), key=lambda store: store.class_offset)
    if not shards:
        raise StoreError("merge needs at least one shard")
    first = shards[0]
    for store in shards:
        if "shard" not in store.manifest:
            raise StoreError(f"distribution store {store.path}: not a shard (no shard section in its manifest)")
        if store.manifest["shard"]["count"] != first.manifest["shard"]["count"]:
            raise StoreError(f"shards {first.path} and {store.path} come from builds with different shard counts")
        for key in ("model", "layer", "input_transform", "class_names", "num_filters", "percentile_levels", "top_k", "data"):
            if store.manifest.get(key) != first.manifest.get(key):
                raise StoreError(f"shards {first.path} and {store.path} disagree on {key}")
    expected_count = first.manifest["shard"]["count"]
    found = [store.manifest["shard"]["index"] for store in shards]
    if sorted(found) != list(range(expected_count)):
        raise StoreError(f"need shards 0..{expected_count - 1} exactly once, got indices {sorted(found)}")
    stop = 0
    for store in shards:
        start, end = store.manifest["shard"]["classes"]
        if start != stop:
            raise StoreError(f"shard {store.path} starts at class {start}, expected {stop}")
        stop = end
    if stop != first.num_classes:
        raise StoreError(f"shards cover classes 0..{stop - 1} of {first.num_classes}")

    directory = Path(out)
    directory.mkdir(parents=True, exist_ok=True)
    (directory / MANIFEST).unlink(missing_ok=True)
    for name, (dtype, _) in ARRAY_SPECS.items():
        parts = [store.arrays[name] for store in shards]
        merged = open_memmap(directory / f"{name}.npy", mode="w+", dtype=dtype,
                             shape=(stop,) + parts[0].shape[1:])
        row = 0
        for part in parts:
            merged[row:row + len(part)] = part
            row += len(part)
        merged.flush()
        del merged
    finalise_store(directory, first.meta, counts=[c for store in shards for c in store.manifest["counts"]],
                   top_k=first.manifest["top_k"], levels=tuple(first.manifest["percentile_levels"]),
                   build_time=max(store.manifest["build_time"] for store in shards), data=first.manifest.get("data"))
    return directory
