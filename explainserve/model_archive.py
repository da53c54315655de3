"""The layout of an explainserve model archive (.mar) and how a handler rebuilds the model.

An archive holds ``weights.pt`` (a state_dict), ``metadata.json`` (below), the handler
files and, when one is shipped, the anomaly distribution store under the top-level folder
``distribution_store/`` (its ``manifest.json`` and ``.npy`` arrays). ``metadata.json``::

    {"name", "version", "kind": "image"|"video", "input_size": [H, W] or [T, H, W],
     "mean", "std" (3 floats each, or 1 for a greyscale model), "class_names", "layer": str|null,
     "architecture": {"source": "torchvision", "name": "resnet18", "kwargs": {...}},
     "build_timestamp": seconds since the epoch}

``architecture`` takes every form of :mod:`explainserve.model_sources`; a ``model_file``
source's Python file ships at the archive's top level (TorchServe's ``--model-file``), and so
do the modules and package folders it imports, named in ``architecture["extra_files"]``.
"""

from __future__ import annotations

import json
import tempfile
import zipfile
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn

from .model_sources import ALLOWED_FACTORY_MODULES, SOURCES, build_architecture

METADATA_FILE = "metadata.json"
WEIGHTS_FILE = "weights.pt"
# Folder of the archive that holds the anomaly distribution store (what `explainserve serve` unpacks).
STORE_FOLDER = "distribution_store"
REQUIRED_KEYS = ("name", "kind", "input_size", "mean", "std", "class_names", "architecture")
# Top-level names of an archive that a model file's own modules may not take.
RESERVED_NAMES = (METADATA_FILE, WEIGHTS_FILE, STORE_FOLDER, "MAR-INF", "model-config.yaml", "explain_handler.py",
                  "image_handler.py", "video_handler.py")


def check_metadata(metadata: dict) -> None:
    """Raise ValueError naming the first missing or malformed metadata entry."""
    missing = [key for key in REQUIRED_KEYS if key not in metadata]
    if missing:
        raise ValueError(f"metadata: missing keys {missing}")
    if metadata["kind"] not in ("image", "video"):
        raise ValueError(f"metadata kind: expected 'image' or 'video', got {metadata['kind']!r}")
    architecture = metadata["architecture"]
    source = architecture.get("source")
    if source is not None and source not in SOURCES:
        raise ValueError(f"metadata architecture.source: {source!r} is not one of {SOURCES}")
    factory = architecture.get("factory", "")
    if source is None and factory.rpartition(".")[0] not in ALLOWED_FACTORY_MODULES:
        raise ValueError(f"metadata architecture.factory: {factory!r} is not in one of {ALLOWED_FACTORY_MODULES}")


def build_model(metadata: dict, model_dir: str | Path | None = None) -> nn.Module:
    """Instantiate the (untrained) model ``metadata["architecture"]`` describes.

    ``model_dir`` is the unpacked archive, where a ``model_file`` source's file lies.
    """
    check_metadata(metadata)
    return build_architecture(metadata["architecture"], model_dir)


def load_model(model_dir: str | Path) -> tuple[nn.Module, dict]:
    """Rebuild the model and read the metadata from an unpacked archive folder."""
    model_dir = Path(model_dir)
    metadata = json.loads((model_dir / METADATA_FILE).read_text())
    model = build_model(metadata, model_dir)
    model.load_state_dict(torch.load(model_dir / WEIGHTS_FILE, map_location="cpu", weights_only=True))
    return model.eval(), metadata


def model_file_names(model_file: str | Path, extra_files: Sequence[str | Path] = ()) -> list[str]:
    """The top-level names the model file and its ``extra_files`` take in an archive.

    Raises
    ------
    ValueError
        An extra file that is missing or neither a .py file nor a folder, a name taken twice or
        one an archive keeps for itself; the message starts with ``--extra-files``.
    """
    names = [Path(model_file).name]
    for path in map(Path, extra_files):
        if not (path.is_dir() or (path.is_file() and path.suffix == ".py")):
            raise ValueError(f"--extra-files {path}: not a .py file or a package folder; pass the modules the model "
                             f"file imports")
        if path.name in names or path.name in RESERVED_NAMES:
            raise ValueError(f"--extra-files {path}: the name {path.name!r} is taken ("
                             f"{'by another file' if path.name in names else 'by the archive itself'}); rename it")
        names.append(path.name)
    return names


def stage_model_files(paths: Sequence[str | Path], folder: Path) -> Path:
    """Copy ``paths`` (a model file and the files and package folders it imports, checked by
    :func:`model_file_names`) into ``folder``, side by side as an archive holds them; returns ``folder``."""
    import shutil

    folder.mkdir(parents=True, exist_ok=True)
    for path in map(Path, paths):
        if path.is_dir():
            shutil.copytree(path, folder / path.name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        else:
            shutil.copy2(path, folder / path.name)
    return folder


def read_archive_metadata(mar: str | Path) -> dict:
    """The ``metadata.json`` of the ``.mar`` file ``mar``, read without unpacking it."""
    with zipfile.ZipFile(mar) as archive:
        return json.loads(archive.read(METADATA_FILE))


def load_archive(mar: str | Path) -> tuple[nn.Module, dict]:
    """Rebuild the model and read the metadata from the ``.mar`` file ``mar``: its metadata,
    weights and, for a ``model_file`` source, the user's Python file and its extra files (shipped
    at its top level)."""
    with tempfile.TemporaryDirectory(prefix="explainserve-mar-") as folder, zipfile.ZipFile(mar) as archive:
        archive.extract(METADATA_FILE, folder)
        archive.extract(WEIGHTS_FILE, folder)
        architecture = json.loads((Path(folder) / METADATA_FILE).read_text())["architecture"]
        if architecture.get("source") == "model_file":
            shipped = [Path(str(name)).name
                       for name in (architecture.get("file", ""), *architecture.get("extra_files", ()))]
            archive.extractall(folder, [member for member in archive.namelist()
                                        if member in shipped or member.split("/")[0] in shipped])
        return load_model(folder)


def pack_store(store_path: str | Path, metadata: dict, folder: Path) -> Path:
    """Verify the store for this model and copy it to ``folder/distribution_store``; return ``folder``.

    torch-model-archiver copies the *contents* of a folder given in --extra-files to the
    archive's top level, so the folder handed to it holds only ``distribution_store/``.
    """
    import shutil

    from explainserve.anomaly import Scorer, load_store
    from explainserve.anomaly.store import MANIFEST

    store = load_store(store_path, model_name=metadata["name"], model_version=str(metadata.get("version", "1.0")))
    Scorer(store)  # refuses a shard or an uncalibrated store
    misfits = store.meta.misfits(metadata)
    if misfits:
        raise ValueError(f"--store {store_path}: built at {'; '.join(misfits)}, as this archive explains the model; "
                         f"its verdicts would mean nothing: rebuild it from this archive (explainserve "
                         f"build-distributions --model <the .mar>)")
    target = folder / STORE_FOLDER
    target.mkdir(parents=True)
    for name in (MANIFEST, *(f"{array}.npy" for array in store.manifest["arrays"])):  # calibration's arrays too
        shutil.copy2(store.path / name, target / name)
    return folder


HANDLERS_DIR = Path(__file__).resolve().parents[1] / "handlers"
HANDLER_FILES = {"image": "image_handler.py", "video": "video_handler.py"}


def write_archive(model: nn.Module, metadata: dict, export_dir: str | Path, *, batch_size: int = 4,
                  max_batch_delay_ms: int = 20, response_timeout_s: int = 120,
                  store_path: str | Path | None = None, model_file: str | Path | None = None,
                  extra_files: Sequence[str | Path] = ()) -> Path:
    """Package a model as ``<export_dir>/<name>.mar`` with torch-model-archiver.

    Parameters
    ----------
    model : nn.Module
        Built by ``metadata["architecture"]``; its state_dict is stored.
    metadata : dict
        See the module docstring.
    batch_size, max_batch_delay_ms : int
        TorchServe batching: up to ``batch_size`` requests arriving within the delay form a batch.
    store_path : path, optional
        A complete, calibrated anomaly distribution store (a folder) built for this model's
        name and version; it is verified, then shipped under ``distribution_store/``.
    model_file : path, optional
        The Python file of a ``model_file`` source; shipped at the archive's top level.
    extra_files : sequence of paths
        The modules (.py files) and package folders ``model_file`` imports; shipped beside it.

    Returns
    -------
    Path of the written archive.

    Raises
    ------
    ValueError
        Bad metadata or batching, or (StoreError) a store that is corrupt, a shard,
        uncalibrated or built for another model name or version.
    """
    import os
    import subprocess
    import sys
    import tempfile

    check_metadata(metadata)
    if not 1 <= batch_size <= 256:
        raise ValueError(f"batch_size: expected an int in [1, 256], got {batch_size}")
    if not 0 <= max_batch_delay_ms <= 10_000:
        raise ValueError(f"max_batch_delay_ms: expected an int in [0, 10000], got {max_batch_delay_ms}")
    export_dir = Path(export_dir)
    export_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        torch.save(model.state_dict(), tmp / WEIGHTS_FILE)
        (tmp / METADATA_FILE).write_text(json.dumps(metadata, indent=1))
        (tmp / "model-config.yaml").write_text(
            f"minWorkers: 1\nmaxWorkers: 1\nbatchSize: {batch_size}\nmaxBatchDelay: {max_batch_delay_ms}\n"
            f"responseTimeout: {response_timeout_s}\n"
        )
        extra = [tmp / METADATA_FILE, HANDLERS_DIR / "explain_handler.py"]
        if extra_files:
            model_file_names(model_file, extra_files)
            # The archiver copies a folder's *contents* to the top level: one folder holding them all
            # (the model file goes as its --model-file).
            extra.append(stage_model_files(extra_files, tmp / "model_files"))
        if store_path is not None:
            extra.append(pack_store(store_path, metadata, tmp / "store"))
        archiver = Path(sys.executable).with_name("torch-model-archiver")
        subprocess.run(
            [str(archiver), "--model-name", metadata["name"], "--version", str(metadata.get("version", "1.0")),
             "--serialized-file", str(tmp / WEIGHTS_FILE),
             "--handler", str(HANDLERS_DIR / HANDLER_FILES[metadata["kind"]]),
             "--extra-files", ",".join(str(p) for p in extra),
             "--config-file", str(tmp / "model-config.yaml"),
             *(["--model-file", str(model_file)] if model_file is not None else []),
             "--export-path", str(export_dir), "--force"],
            # The archiver stages files in $TMPDIR/<model name>: a private TMPDIR keeps two
            # archives of one name (parallel builds or test runs) from mixing their files.
            check=True, capture_output=True, text=True, env={**os.environ, "TMPDIR": str(tmp)},
        )
    return export_dir / f"{metadata['name']}.mar"
