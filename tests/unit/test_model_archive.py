"""write_archive is safe to run beside another archive of the same model name, and ships only a
store that fits the model."""

from __future__ import annotations

import dataclasses
import os
import tempfile
import zipfile

import numpy as np
import pytest

from explainserve.anomaly import build_store, calibrate, load_store, save_calibration
from explainserve.anomaly.synthetic import SyntheticClasses
from explainserve.model_archive import pack_store, write_archive
from support.serving_harness import tiny_image_model


def test_an_archive_does_not_stage_in_the_shared_temporary_folder(tmp_path, monkeypatch):
    # torch-model-archiver stages in $TMPDIR/<model name>; there, another build's file blocks it.
    shared = tmp_path / "shared"
    shared.mkdir()
    (shared / "tiny_image").write_text("another build's staging")
    monkeypatch.setenv("TMPDIR", str(shared))
    monkeypatch.setattr(tempfile, "tempdir", str(shared))
    model, metadata = tiny_image_model()
    archive = write_archive(model, metadata, tmp_path / "store")
    assert {"metadata.json", "image_handler.py", "explain_handler.py"} <= set(zipfile.ZipFile(archive).namelist())
    assert (shared / "tiny_image").read_text() == "another build's staging" and os.listdir(shared) == ["tiny_image"]


def test_a_store_built_at_another_layer_or_normalisation_is_not_shipped(tmp_path):
    synthetic = SyntheticClasses.random(3, 8)
    metadata = {"name": "net", "version": "1.0", "layer": "layer4", "input_size": [32, 32], "mean": [0.5] * 3,
                "std": [0.25] * 3}
    meta = dataclasses.replace(synthetic.meta, model_name="net", model_version="1.0",
                               input_transform={key: metadata[key] for key in ("input_size", "mean", "std")})
    store = build_store(synthetic.batches(40), tmp_path / "store", meta, build_time="2026-01-01T00:00:00Z")
    classes = np.repeat(np.arange(3), 40)
    save_calibration(load_store(store), calibrate(load_store(store), synthetic.sample(classes, seed=1), classes))
    assert (pack_store(store, metadata, tmp_path / "fits") / "distribution_store" / "manifest.json").exists()
    with pytest.raises(ValueError, match=rf"^--store {store}: built at layer 'layer4', not 'layer3'; mean \[0\.5, "
                                         r"0\.5, 0\.5\], not \[0\.485, 0\.456, 0\.406\], as this archive explains "
                                         r"the model; its verdicts would mean nothing: rebuild it from this archive"):
        pack_store(store, {**metadata, "layer": "layer3", "mean": [0.485, 0.456, 0.406]}, tmp_path / "misfit")
    assert not (tmp_path / "misfit").exists()
