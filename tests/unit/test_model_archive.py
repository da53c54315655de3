"""write_archive is safe to run beside another archive of the same model name."""

from __future__ import annotations

import os
import tempfile
import zipfile

from explainserve.model_archive import write_archive
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
