"""Carry a store's training arrays into a new, uncalibrated store of the current format.

Calibration is cheap (one pass over the validation split); the training arrays are not (one
pass over all the training data). A store of an older format, or one to be calibrated again
(another target rate, more validation data), keeps its training arrays byte for byte: they are
verified against the old manifest, copied, and given a fresh manifest, ready for
:func:`~explainserve.anomaly.calibration.calibrate`.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from explainserve.anomaly.store import ARRAY_SPECS, finalise_store, load_training_arrays


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
        From :func:`~explainserve.anomaly.store.load_training_arrays`: ``source`` has no readable
        manifest, is a shard, has another format, or a training array that is missing, of the wrong
        dtype or shape, or does not match its recorded size and sha256.
    """
    source, out = Path(source), Path(out)
    manifest, meta = load_training_arrays(source)
    for name in ARRAY_SPECS:
        shutil.copyfile(source / f"{name}.npy", out / f"{name}.npy")
    data = manifest.get("data")
    if data is not None:
        data = {key: value for key, value in data.items() if key != "val_limit"}
        if val_limit is not None:
            data["val_limit"] = val_limit
    return finalise_store(out, meta, counts=manifest["counts"], top_k=manifest["top_k"],
                          levels=tuple(manifest["percentile_levels"]), build_time=manifest["build_time"], data=data)
