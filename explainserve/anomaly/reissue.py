"""Carry a store's training arrays into a new, uncalibrated store of the current format.

Calibration is cheap (one pass over the validation split); the training arrays are not (one
pass over all the training data). A store of an older format, or one to be calibrated again
(another target rate, more validation data), keeps its training arrays byte for byte: they are
verified against the old manifest, copied, and given a fresh manifest, ready for
:func:`~explainserve.anomaly.calibration.calibrate`.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np

from explainserve.anomaly.store import (ARRAY_SPECS, CARRIED_FORMATS, MANIFEST, StoreError, StoreMeta, array_shape,
                                        file_sha256, finalise_store)


def reissue_store(source: str | os.PathLike, out: str | os.PathLike, *, val_limit: dict | None = None) -> dict:
    """Copy the training arrays of the complete store at ``source`` into ``out`` under a new manifest.

    Parameters
    ----------
    source : path-like
        A complete (merged or unsharded) store of a format in ``CARRIED_FORMATS``, calibrated or not.
    out : path-like
        An empty folder.
    val_limit : dict, optional
        How the validation split of the new calibration is limited, ``{"val": N, "rule": ...}``,
        for the data record's ``val_limit`` entry; None: all of it. A store without a data
        record keeps none.

    Returns
    -------
    dict
        The new manifest: the same model, layer, classes, counts, grid, exemplars, data record (but
        its ``val_limit``) and build time, the current format, no calibration.

    Raises
    ------
    StoreError
        ``source`` has no readable manifest, is a shard, has another format, or an array that is
        missing, of the wrong dtype or shape, or does not match its recorded sha256.
    """
    source, out = Path(source), Path(out)
    try:
        manifest = json.loads((source / MANIFEST).read_text())
    except (OSError, ValueError) as error:
        raise StoreError(f"distribution store {source}: unreadable {MANIFEST} ({error})") from None
    if not isinstance(manifest, dict) or manifest.get("format_version") not in CARRIED_FORMATS:
        found = manifest.get("format_version") if isinstance(manifest, dict) else None
        raise StoreError(f"distribution store {source}: format_version {found!r} cannot be carried over "
                         f"(formats {list(CARRIED_FORMATS)} can); build the store again")
    if "shard" in manifest:
        raise StoreError(f"distribution store {source}: a shard; merge the shards first (merge-distributions)")
    try:
        meta = StoreMeta.from_json(manifest)
        counts, levels, top_k = manifest["counts"], tuple(manifest["percentile_levels"]), manifest["top_k"]
        recorded = {name: manifest["arrays"][name] for name in ARRAY_SPECS}
    except (KeyError, TypeError) as error:
        raise StoreError(f"distribution store {source}: malformed {MANIFEST} ({error!r})") from None
    for name, (dtype, _) in ARRAY_SPECS.items():
        file = source / f"{name}.npy"
        if not file.is_file():
            raise StoreError(f"distribution store {source}: {file.name} is missing")
        if file_sha256(file) != recorded[name]["sha256"]:
            raise StoreError(f"distribution store {source}: {file.name} sha256 does not match its manifest (corrupt)")
        array = np.load(file, mmap_mode="r")
        expected = array_shape(name, len(meta.class_names), meta.num_filters, len(levels), top_k)
        if array.dtype != dtype or array.shape != expected:
            raise StoreError(f"distribution store {source}: {file.name} is {array.dtype}{array.shape}, "
                             f"expected {np.dtype(dtype)}{expected}")
        del array
        shutil.copyfile(file, out / file.name)
    data = manifest.get("data")
    if data is not None:
        data = {key: value for key, value in data.items() if key != "val_limit"}
        if val_limit is not None:
            data["val_limit"] = val_limit
    return finalise_store(out, meta, counts=counts, top_k=top_k, levels=levels, build_time=manifest["build_time"],
                          data=data)
