"""The distribution store: a directory of memory-mappable .npy arrays and a JSON manifest.

Layout (C classes, K filters, L grid levels, k exemplars)::

    manifest.json    model, layer, transform, class names, counts, calibration, build time, sha256
    mean.npy         (C, K)    float32  mu_cn
    p_low.npy        (C, K)    float32  P0.1 per (class, filter)
    p_high.npy       (C, K)    float32  P99.9 per (class, filter)
    grid.npy         (C, L, K) float16  percentile grid (offline use; never read when scoring)
    exemplars.npy    (C, K, k) int32    top-k training image ids per (class, filter)
    beta_grid.npy    (C, 101)  float32  percentiles 0..100 of the class's training β

Calibration (:mod:`explainserve.anomaly.calibration`) adds, G tail levels, L part-B images of
the largest own-ranked class, n part-B images in all::

    scale.npy           (C, K)     float32  robust scale s_cn of each (class, filter)
    tail_grid.npy       (C, 3, G+2) float64 part-A tail model of the three tests (quantiles,
                                            exponential tail's start and slope)
    class_ranks.npy     (C, 4, L)  float32  part-B statistics per class, sorted, +inf padded
    fallback_ranks.npy  (4, n)     float32  part-B statistics of the class-independent group

Calibrated with pooled features as well, it holds the feature block (the calibration
section's ``features`` entry; tests of :mod:`explainserve.anomaly.feature_tests`)::

    feature_centre.npy              (K,)         float64  mean pooled feature of part A
    feature_class_means.npy         (C, K)       float64  per-class means m_c
    feature_mahalanobis_basis.npy   (K, r)       float64  the tied covariance's top r = min(K, 128) directions
    feature_mahalanobis_weights.npy (r,)         float64  their weights in the precision
    feature_isotropic.npy           (1,)         float64  1/σ² of the directions past r (0 when r = K)
    feature_basis.npy               (K, d)       float64  top d = min(K//2, 128) principal directions
    feature_tail_grid.npy           (C, 5, G+2)  float64  part-A tail model of the five tests
    feature_class_ranks.npy         (C, 3, L)    float32  part-B feature_mahalanobis,
                                                          feature_residual, combined5 per class
    feature_fallback_ranks.npy      (3, n)       float32  the same, class-independent group

A class without training images has count 0; in a complete store its rows hold the pooled
distribution of all classes (:mod:`explainserve.anomaly.pooled`, listed in the manifest's
``pooled`` section), in a shard NaN statistics until the merge. Every array's size and
sha256 are recorded in the manifest and verified on load, so a corrupt or truncated store is
refused before anything is scored against it.

A server loads a store ``into_memory``: every file is read once through one open folder, the
bytes hashed are the bytes scored, and no file stays mapped, so a writer can neither change the
data under a verified sha256 nor kill the server with SIGBUS by truncating a mapped file. Stores
are published whole into fresh folders (:mod:`explainserve.anomaly.publish`).
"""

from __future__ import annotations

import hashlib
import io
import json
import os
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

from explainserve.anomaly.pooled import RULE as POOLED_RULE
from explainserve.anomaly.pooled import fill_pooled_rows

#: 3: the feature block (pooled-feature tests, calibrated when built with features); 2: graded
#: tests and conformal p-values (calibration arrays); 1: integer-count thresholds.
FORMAT_VERSION = 3
#: What each older format lacks, for the message that refuses it.
OLDER_FORMATS = {1: "before conformal p-values", 2: "before the pooled-feature tests"}
REBUILD_HINT = ("rebuild it with `explainserve build-distributions --model ... --data ... --out DIR` "
                "(see README, Distribution stores)")
#: Formats whose training arrays (``ARRAY_SPECS``) are laid out as today's: such a store can be
#: recalibrated instead of rebuilt (:mod:`explainserve.anomaly.reissue`).
CARRIED_FORMATS = (2, 3)
RECALIBRATE_HINT = ("or keep its training arrays and calibrate it again (one pass over val): "
                    "`explainserve recalibrate-distributions DIR --out DIR --model ... --data ...`")
MANIFEST = "manifest.json"
#: Manifest entries the store's sha256 leaves out: itself, the per-array entries (it covers the
#: arrays through their hashes) and the build time, on which no verdict depends.
UNHASHED_KEYS = ("sha256", "arrays", "build_time")
BUILD_TIME_FORMAT = "%Y-%m-%dT%H:%M:%SZ"

#: name -> (dtype, shape after the class axis as a function of (K, L, k)).
ARRAY_SPECS = {
    "mean": (np.float32, lambda K, L, k: (K,)),
    "p_low": (np.float32, lambda K, L, k: (K,)),
    "p_high": (np.float32, lambda K, L, k: (K,)),
    "grid": (np.float16, lambda K, L, k: (L, K)),
    "exemplars": (np.int32, lambda K, L, k: (K, k)),
    "beta_grid": (np.float32, lambda K, L, k: (101,)),
}

MANIFEST_KEYS = ("model", "layer", "input_transform", "class_names", "num_filters", "percentile_levels",
                 "top_k", "counts", "build_time", "arrays", "sha256", "calibration")

#: Calibration arrays: name -> (dtype, expected shape from (C, K, calibration section); None
#: leaves an axis unchecked).
CALIBRATION_SPECS = {
    "scale": (np.float32, lambda C, K, section: (C, K)),
    "tail_grid": (np.float64, lambda C, K, section: (C, len(section["statistics"]) - 1, None)),
    "class_ranks": (np.float32, lambda C, K, section: (C, len(section["statistics"]), None)),
    "fallback_ranks": (np.float32, lambda C, K, section: (len(section["statistics"]), section["fallback"]["count"])),
}

#: The feature block, present when the calibration section has ``features`` (calibrated with
#: pooled features): name -> (dtype, expected shape from (C, K, calibration section)).
FEATURE_SPECS = {
    "feature_centre": (np.float64, lambda C, K, section: (K,)),
    "feature_class_means": (np.float64, lambda C, K, section: (C, K)),
    "feature_mahalanobis_basis": (np.float64, lambda C, K, section: (K, section["features"]["mahalanobis_rank"])),
    "feature_mahalanobis_weights": (np.float64, lambda C, K, section: (section["features"]["mahalanobis_rank"],)),
    "feature_isotropic": (np.float64, lambda C, K, section: (1,)),
    "feature_basis": (np.float64, lambda C, K, section: (K, section["features"]["residual_dimensions"])),
    "feature_tail_grid": (np.float64, lambda C, K, section: (C, len(section["features"]["tests"]), None)),
    "feature_class_ranks": (np.float32, lambda C, K, section: (C, len(section["features"]["statistics"]), None)),
    "feature_fallback_ranks": (np.float32, lambda C, K, section: (len(section["features"]["statistics"]),
                                                                  section["features"]["fallback"]["count"])),
}

#: Arrays the scorer reads; ``grid`` stays on disk.
SERVING_ARRAYS = ("mean", "p_low", "p_high", "exemplars", "beta_grid", *CALIBRATION_SPECS, *FEATURE_SPECS)


def calibration_specs(section: dict | None) -> dict:
    """The calibration arrays a store with calibration ``section`` holds: ``CALIBRATION_SPECS``,
    and ``FEATURE_SPECS`` when it has a feature block; none when it is not calibrated."""
    if section is None:
        return {}
    return {**CALIBRATION_SPECS, **(FEATURE_SPECS if section.get("features") else {})}


class StoreError(ValueError):
    """A store that cannot be used: missing, corrupt, truncated, or built for another model."""


@dataclass(frozen=True)
class StoreMeta:
    """What a store was built from.

    Attributes
    ----------
    model_name, model_version : str
        Identify the model; a server refuses a store whose pair differs from its model's.
    layer : str
        Target layer whose filters alpha scores.
    input_transform : dict
        How images were preprocessed (size, mean, std), JSON-serialisable.
    class_names : tuple of str
        One name per class; C = len(class_names).
    num_filters : int
        K, the length of every alpha vector.
    """

    model_name: str
    model_version: str
    layer: str
    input_transform: dict
    class_names: tuple
    num_filters: int

    def to_json(self) -> dict:
        return {
            "model": {"name": self.model_name, "version": self.model_version},
            "layer": self.layer,
            "input_transform": self.input_transform,
            "class_names": list(self.class_names),
            "num_filters": self.num_filters,
        }

    def misfits(self, model: dict) -> list[str]:
        """What differs between the model this store was built on and ``model``, the one to score.

        Parameters
        ----------
        model : dict
            Any of ``layer`` (str), ``num_filters`` (int), ``input_size``, ``mean`` and ``std``
            (lists), as an archive's metadata or its handler's describe() give them; a key
            missing on either side is not compared.

        Returns
        -------
        list of str
            One phrase per difference ("layer 'layer4', not 'layer3'"); empty when the store fits.
            Another layer, filter count, input size or normalisation gives other alpha, whose
            verdicts against this store would mean nothing.
        """
        built = {"layer": self.layer, "num_filters": self.num_filters,
                 **{key: self.input_transform[key] for key in ("input_size", "mean", "std") if key in self.input_transform}}
        misfits = []
        for key, value in built.items():
            served = model.get(key)
            if served is None:
                continue
            same = (value == served if isinstance(value, (str, int)) else
                    len(value) == len(served) and np.allclose(value, served, rtol=1e-6, atol=0))
            if not same:
                misfits.append(f"{key} {value!r}, not {served!r}")
        return misfits

    @classmethod
    def from_json(cls, manifest: dict) -> "StoreMeta":
        return cls(
            model_name=manifest["model"]["name"],
            model_version=manifest["model"]["version"],
            layer=manifest["layer"],
            input_transform=manifest["input_transform"],
            class_names=tuple(manifest["class_names"]),
            num_filters=int(manifest["num_filters"]),
        )


def array_shape(name: str, num_classes: int, num_filters: int, num_levels: int, top_k: int) -> tuple:
    """Full shape of store array ``name``."""
    return (num_classes,) + ARRAY_SPECS[name][1](num_filters, num_levels, top_k)


def _digest(handle) -> tuple[int, str]:
    """(size in bytes, sha256) of what is left to read of ``handle``, read in 1 MiB blocks."""
    digest, size = hashlib.sha256(), 0
    for block in iter(lambda: handle.read(1 << 20), b""):
        digest.update(block)
        size += len(block)
    return size, digest.hexdigest()


def file_sha256(path: Path) -> str:
    with open(path, "rb") as handle:
        return _digest(handle)[1]


def store_sha256(manifest: dict) -> str:
    """One digest for the whole store: the arrays it scores with and every setting of its manifest.

    sha256 over the sorted ``name:sha256`` lines of the arrays the manifest records, followed by
    the manifest's other entries as JSON with sorted keys, ``UNHASHED_KEYS`` left out: the
    calibration section (target rate, each class's group, rank count and critical values), the
    training counts, the pooled classes, the model and layer. A change to anything a verdict
    depends on changes the digest, so an answer's ``store_sha256`` names what scored it.
    """
    arrays = manifest["arrays"]
    lines = "".join(f"{name}:{arrays[name]['sha256']}\n" for name in sorted(arrays))
    settings = {key: value for key, value in manifest.items() if key not in UNHASHED_KEYS}
    return hashlib.sha256((lines + json.dumps(settings, sort_keys=True)).encode()).hexdigest()


def write_manifest(directory: Path, manifest: dict) -> None:
    """Write ``manifest.json`` atomically, with sorted keys so equal stores give equal bytes."""
    path = Path(directory) / MANIFEST
    temporary = path.with_suffix(".json.tmp")
    temporary.write_text(json.dumps(manifest, indent=1, sort_keys=True) + "\n")
    os.replace(temporary, path)


def finalise_store(directory: Path, meta: StoreMeta, *, counts: list, top_k: int, levels: tuple,
                   build_time: str, shard: dict | None = None, data: dict | None = None) -> dict:
    """Hash the written arrays and write the manifest, which makes the store loadable.

    Parameters
    ----------
    directory : Path
        Holds every array of ``ARRAY_SPECS``, complete.
    meta : StoreMeta
    counts : list of int
        Training images per class held.
    top_k : int
    levels : tuple of float
        The percentile grid levels, in percent.
    build_time : str
        ISO 8601 UTC time of the build.
    shard : dict, optional
        ``{"index": i, "count": n, "classes": [start, stop]}`` for one shard of a build.
    data : dict, optional
        Where the training samples came from and how the validation split was chosen
        (JSON-serialisable; the same in every shard of a build).

    Returns
    -------
    dict
        The manifest written (uncalibrated).

    Notes
    -----
    A complete store (no ``shard``) gets the pooled distribution in the rows of its classes
    without training images (:mod:`explainserve.anomaly.pooled`), listed in the manifest's
    ``pooled`` section; a shard keeps those rows NaN until the merge.
    """
    pooled = [] if shard is not None else fill_pooled_rows(directory, counts)
    arrays = {name: _array_entry(directory, name) for name in ARRAY_SPECS}
    manifest = {
        "format_version": FORMAT_VERSION,
        **meta.to_json(),
        "percentile_levels": list(levels),
        "top_k": top_k,
        "counts": [int(count) for count in counts],
        "build_time": build_time,
        "arrays": arrays,
        "calibration": None,
    }
    if shard is not None:
        manifest["shard"] = shard
    if data is not None:
        manifest["data"] = data
    if pooled:
        manifest["pooled"] = {"classes": pooled, "rule": POOLED_RULE}
    manifest["sha256"] = store_sha256(manifest)
    write_manifest(directory, manifest)
    return manifest


@dataclass
class DistributionStore:
    """A loaded store; arrays are read-only memory maps.

    Attributes
    ----------
    path : Path
    manifest : dict
        The parsed manifest.
    meta : StoreMeta
    arrays : dict of str -> np.ndarray
        Shapes as in the module docstring.
    """

    path: Path
    manifest: dict
    meta: StoreMeta
    arrays: dict

    @property
    def num_classes(self) -> int:
        return len(self.meta.class_names)

    @property
    def counts(self) -> np.ndarray:
        """(C,) int64 training images per class."""
        return np.asarray(self.manifest["counts"], dtype=np.int64)

    @property
    def class_offset(self) -> int:
        """Index of the first class held (non-zero only for a shard)."""
        shard = self.manifest.get("shard")
        return int(shard["classes"][0]) if shard else 0

    @property
    def calibration(self) -> dict | None:
        return self.manifest.get("calibration")

    @property
    def sha256(self) -> str:
        return self.manifest["sha256"]

    @property
    def build_timestamp(self) -> float:
        """Build time in seconds since the epoch (for ``explainserve_store_build_timestamp_seconds``)."""
        return datetime.strptime(self.manifest["build_time"], BUILD_TIME_FORMAT).replace(tzinfo=timezone.utc).timestamp()

    def serving_bytes(self) -> int:
        """Bytes of the arrays the scorer reads (everything except the percentile grid)."""
        return sum(self.arrays[name].nbytes for name in SERVING_ARRAYS if name in self.arrays)

    def total_bytes(self) -> int:
        """Bytes of all arrays."""
        return sum(array.nbytes for array in self.arrays.values())


def _refuse(directory: Path, problem: str) -> StoreError:
    return StoreError(f"distribution store {directory}: {problem}")


def _open_in(folder: int, name: str):
    """File ``name`` of the open folder ``folder`` (a file descriptor), opened for binary reading."""
    return open(name, "rb", opener=lambda path, flags: os.open(path, flags, dir_fd=folder))


def _read_file(folder: int, name: str) -> bytes:
    with _open_in(folder, name) as handle:
        return handle.read()


def _array_from_npy(data: bytes) -> np.ndarray:
    """A read-only array viewing the ``.npy`` file bytes ``data`` (no copy). Raises ValueError."""
    stream = io.BytesIO(data)
    version = np.lib.format.read_magic(stream)
    read_header = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
    shape, fortran_order, dtype = read_header(stream)
    if dtype.hasobject:
        raise ValueError("object arrays are not store arrays")
    count = int(np.prod(shape))
    if len(data) - stream.tell() != count * dtype.itemsize:
        raise ValueError(f"{len(data) - stream.tell()} data bytes for {count} values of {dtype}")
    return np.frombuffer(data, dtype=dtype, count=count, offset=stream.tell()).reshape(
        shape, order="F" if fortran_order else "C")


def _array_entry(directory: Path, name: str) -> dict:
    file = Path(directory) / f"{name}.npy"
    return {"bytes": file.stat().st_size, "sha256": file_sha256(file)}


def save_calibration_arrays(store: "DistributionStore", section: dict, arrays: dict) -> None:
    """Write calibration ``arrays`` (:func:`calibration_specs` of ``section``) into ``store``'s
    folder and record ``section``, their sizes and hashes in its manifest, written last
    (atomically). The store object then holds them too. A feature block of an earlier
    calibration that this one lacks is deleted once the manifest no longer records it."""
    directory = Path(store.path)
    entries = {name: entry for name, entry in store.manifest["arrays"].items() if name in ARRAY_SPECS}
    specs = calibration_specs(section)
    for name, (dtype, _) in specs.items():
        file = directory / f"{name}.npy"
        temporary = file.with_suffix(".npy.tmp")
        with open(temporary, "wb") as handle:
            np.save(handle, np.ascontiguousarray(arrays[name], dtype=dtype))
        os.replace(temporary, file)
        entries[name] = _array_entry(directory, name)
    manifest = dict(store.manifest, calibration=section, arrays=entries)
    manifest["sha256"] = store_sha256(manifest)
    write_manifest(directory, manifest)
    for name in FEATURE_SPECS.keys() - specs.keys():
        (directory / f"{name}.npy").unlink(missing_ok=True)
    store.manifest = manifest
    store.arrays = {**{name: store.arrays[name] for name in ARRAY_SPECS},
                    **{name: np.load(directory / f"{name}.npy", mmap_mode="r") for name in specs}}


def load_store(path: str | os.PathLike, *, model_name: str | None = None,
               model_version: str | None = None, verify: bool = True,
               into_memory: bool = False) -> DistributionStore:
    """Open a store, verify it, and memory-map its arrays (or read them into memory).

    Parameters
    ----------
    path : path-like
        Store directory.
    model_name, model_version : str, optional
        When given, the manifest must name this model (and this version, if one is given).
    verify : bool
        Check every array's size and sha256 against the manifest (reads each file once).
    into_memory : bool
        For a server: resolve ``path`` once (a published store is a symlink to a version
        folder), read the manifest and the ``SERVING_ARRAYS`` through that one open folder into
        read-only in-memory arrays, hash exactly those bytes, and keep no file open or mapped.
        ``grid`` is verified but not kept (``arrays`` lacks it). Implies ``verify``.

    Returns
    -------
    DistributionStore

    Raises
    ------
    StoreError
        Missing or unreadable manifest, unknown format, wrong model, a missing, truncated or
        modified array, or an array of the wrong dtype or shape.
    """
    directory = Path(path).resolve() if into_memory else Path(path)
    folder = _open_folder(directory)
    try:  # every file comes from this one folder, even if `path` is swapped meanwhile
        return _load(directory, folder, model_name, model_version, verify or into_memory, into_memory)
    finally:
        os.close(folder)


def _open_folder(directory: Path) -> int:
    """A file descriptor of the store folder ``directory``, which every file is then read through."""
    try:
        return os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    except FileNotFoundError:
        raise _refuse(directory, "no such folder") from None
    except OSError as error:
        raise _refuse(directory, f"unreadable folder ({error})") from None


def _read_manifest(directory: Path, folder: int) -> Any:
    """The parsed manifest of the open store folder (any JSON value: the caller checks it)."""
    try:
        return json.loads(_read_file(folder, MANIFEST))
    except FileNotFoundError:
        raise _refuse(directory, f"no {MANIFEST}") from None
    except (OSError, ValueError) as error:
        raise _refuse(directory, f"unreadable {MANIFEST} ({error})") from None


def load_training_arrays(path: str | os.PathLike) -> tuple[dict, StoreMeta]:
    """Verify the training arrays of a complete store of a format in ``CARRIED_FORMATS``, calibrated
    or not, for :func:`~explainserve.anomaly.reissue.reissue_store` to carry them into a new store.

    Parameters
    ----------
    path : path-like
        Store directory.

    Returns
    -------
    (dict, StoreMeta)
        Its manifest and the model it was built for. The ``ARRAY_SPECS`` files have the size,
        sha256, dtype and shape the manifest records; the calibration is not read.

    Raises
    ------
    StoreError
        No readable manifest, a format that cannot be carried over, a shard, a malformed manifest,
        or a training array that is missing, modified or of the wrong dtype or shape.
    """
    directory = Path(path)
    folder = _open_folder(directory)
    try:
        manifest = _read_manifest(directory, folder)
        if not isinstance(manifest, dict) or manifest.get("format_version") not in CARRIED_FORMATS:
            found = manifest.get("format_version") if isinstance(manifest, dict) else None
            raise _refuse(directory, f"format_version {found!r} cannot be carried over (formats "
                                     f"{list(CARRIED_FORMATS)} can); build the store again")
        if "shard" in manifest:
            raise _refuse(directory, "a shard; merge the shards first (merge-distributions)")
        try:
            meta = StoreMeta.from_json(manifest)
            num_levels, top_k = len(manifest["percentile_levels"]), manifest["top_k"]
            specs = {name: (dtype, array_shape(name, len(meta.class_names), meta.num_filters, num_levels, top_k))
                     for name, (dtype, _) in ARRAY_SPECS.items()}
            _verified_arrays(directory, folder, manifest, specs, verify=True, into_memory=False)
        except (KeyError, TypeError, AttributeError) as error:
            raise _refuse(directory, f"malformed {MANIFEST} ({error!r})") from None
    finally:
        os.close(folder)
    return manifest, meta


def _load(directory: Path, folder: int, model_name, model_version, verify: bool, into_memory: bool) -> DistributionStore:
    manifest = _read_manifest(directory, folder)
    if not isinstance(manifest, dict) or manifest.get("format_version") != FORMAT_VERSION:
        found = manifest.get("format_version") if isinstance(manifest, dict) else None
        older = OLDER_FORMATS.get(found) if isinstance(found, int) else None
        raise _refuse(directory, f"format_version {found!r} is not {FORMAT_VERSION}"
                      + (f" (built by an older explainserve, {older}); {REBUILD_HINT}" if older else "")
                      + (f", {RECALIBRATE_HINT}" if older and found in CARRIED_FORMATS else ""))
    missing = [key for key in MANIFEST_KEYS if key not in manifest]
    if missing:
        raise _refuse(directory, f"{MANIFEST} lacks {missing}")
    meta = StoreMeta.from_json(manifest)
    if model_name is not None and (meta.model_name != model_name
                                   or (model_version is not None and meta.model_version != model_version)):
        raise _refuse(
            directory,
            f"built for model {meta.model_name!r} version {meta.model_version!r}, "
            f"not {model_name!r} version {model_version!r}",
        )
    shard = manifest.get("shard")
    held = shard["classes"][1] - shard["classes"][0] if shard else len(meta.class_names)
    section = manifest["calibration"]
    num_levels, top_k = len(manifest["percentile_levels"]), manifest["top_k"]
    specs = {name: (dtype, array_shape(name, held, meta.num_filters, num_levels, top_k))
             for name, (dtype, _) in ARRAY_SPECS.items()}
    if section is not None:
        try:
            specs.update({name: (dtype, shape(held, meta.num_filters, section))
                          for name, (dtype, shape) in calibration_specs(section).items()})
        except (KeyError, TypeError) as error:
            raise _refuse(directory, f"malformed calibration section ({error!r}); {REBUILD_HINT}") from None
    arrays = _verified_arrays(directory, folder, manifest, specs, verify, into_memory)
    try:
        digest = store_sha256(manifest) if verify else None
    except (KeyError, TypeError) as error:
        raise _refuse(directory, f"{MANIFEST} has a malformed arrays entry ({error!r})") from None
    if verify and digest != manifest["sha256"]:
        raise _refuse(directory, f"store sha256 does not match its arrays and settings (a modified {MANIFEST}, "
                                 f"or one hashed before the settings were covered: {REBUILD_HINT})")
    return DistributionStore(directory, manifest, meta, arrays)


def _verified_arrays(directory: Path, folder: int, manifest: dict, specs: dict, verify: bool,
                     into_memory: bool) -> dict:
    """The arrays ``specs`` names ((dtype, shape) each; None in a shape: any length), read from
    the open store folder: each file's size and (with ``verify``) sha256 checked against the
    manifest, then its dtype and shape. With ``into_memory`` the ``SERVING_ARRAYS`` are read into
    memory and the others verified but not kept; otherwise each is memory-mapped."""
    arrays = {}
    for name, (dtype, expected) in specs.items():
        file_name = f"{name}.npy"
        recorded = manifest["arrays"].get(name)
        if recorded is None:
            raise _refuse(directory, f"{MANIFEST} records no {file_name}")
        try:
            if into_memory and name in SERVING_ARRAYS:
                data = _read_file(folder, file_name)
                size, sha256 = len(data), hashlib.sha256(data).hexdigest()
            else:
                data = None
                with _open_in(folder, file_name) as handle:
                    size, sha256 = _digest(handle) if verify else (os.fstat(handle.fileno()).st_size, recorded["sha256"])
        except FileNotFoundError:
            raise _refuse(directory, f"{file_name} is missing") from None
        if size != recorded["bytes"]:
            raise _refuse(directory, f"{file_name} is {size} bytes, the manifest says {recorded['bytes']} (truncated or replaced)")
        if sha256 != recorded["sha256"]:
            raise _refuse(directory, f"{file_name} sha256 does not match the manifest (corrupt)")
        if into_memory and data is None:
            continue  # verified, not kept: the scorer never reads it
        try:
            array = _array_from_npy(data) if data is not None else np.load(directory / file_name, mmap_mode="r")
        except ValueError as error:
            raise _refuse(directory, f"{file_name} is not a valid .npy file ({error})") from None
        fits = len(array.shape) == len(expected) and all(e is None or a == e for a, e in zip(array.shape, expected))
        if array.dtype != dtype or not fits:
            raise _refuse(directory, f"{file_name} is {array.dtype}{array.shape}, expected {np.dtype(dtype)}{expected}")
        arrays[name] = array
    return arrays
