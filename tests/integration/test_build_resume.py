"""A real build-distributions process killed halfway (SIGKILL) and run again with the same
arguments: the classes it finished are not computed again, and the store is byte-identical to
an uninterrupted build."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torchvision

from explainserve import model_archive
from explainserve.cli import main as cli
from explainserve.commands import distributions
from explainserve.data import FashionScenes
from support.data_folders import folder_name, write_image_folder

pytestmark = [pytest.mark.integration, pytest.mark.timeout(600)]
CLASSES = [folder_name(name) for name in FashionScenes("val", size=1).class_names]


def finished_classes(checkpoint: Path) -> set[int]:
    return {int(path.stem) for path in checkpoint.glob("*.json") if path.stem.isdigit()}


def test_a_killed_build_resumes_where_it_stopped(tmp_path, monkeypatch, capsys):
    model = tmp_path / "model"
    model.mkdir()
    torch.manual_seed(0)
    torch.save(torchvision.models.resnet18(num_classes=8).state_dict(), model / model_archive.WEIGHTS_FILE)
    (model / model_archive.METADATA_FILE).write_text(json.dumps({
        "name": "scenes-r18", "version": "1", "kind": "image", "input_size": [32, 32], "mean": [0.5] * 3,
        "std": [0.25] * 3, "class_names": CLASSES, "layer": None,
        "architecture": {"factory": "torchvision.models.resnet18", "kwargs": {"num_classes": 8}}}))
    images = write_image_folder(tmp_path / "images", {"train": 4, "val": 1}, size=32)
    argv = ["build-distributions", "--model", str(model), "--data", f"imagefolder:{images}", "--batch-size", "2",
            "--workers", "1", "--min-class-count", "2", "--target-fpr", "0.1", "--build-time", "2026-01-01T00:00:00Z"]
    out, checkpoint = tmp_path / "stores" / "scenes-r18", tmp_path / "stores" / ".scenes-r18.checkpoint"

    build = subprocess.Popen([sys.executable, "-m", "explainserve.cli", *argv, "--out", str(out)],
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
                             env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
    try:
        deadline = time.monotonic() + 300
        while len(finished_classes(checkpoint)) < 2 and build.poll() is None and time.monotonic() < deadline:
            time.sleep(0.02)
    finally:
        os.killpg(build.pid, signal.SIGKILL)  # the build and its decoding workers
        build.wait()
    killed_after = finished_classes(checkpoint)
    assert 2 <= len(killed_after) < 8, killed_after
    assert not out.exists()  # nothing published by the killed build

    computed: list[int] = []
    real_alpha_of = distributions.alpha_of

    def counting_alpha_of(explainer, samples, ids, targets):
        computed.extend(targets or [])
        return real_alpha_of(explainer, samples, ids, targets)

    monkeypatch.setattr(distributions, "alpha_of", counting_alpha_of)
    assert cli([*argv, "--out", str(out)]) == 0
    assert f"resuming: {len(killed_after)} of 8 classes already finished" in capsys.readouterr().out
    assert sorted(set(computed)) == sorted(set(range(8)) - killed_after)  # finished classes skipped
    assert not checkpoint.exists()

    monkeypatch.setattr(distributions, "alpha_of", real_alpha_of)
    assert cli([*argv, "--out", str(tmp_path / "uninterrupted")]) == 0
    for file in sorted(out.iterdir()):
        assert (tmp_path / "uninterrupted" / file.name).read_bytes() == file.read_bytes(), file.name
