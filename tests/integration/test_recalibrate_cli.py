"""`explainserve recalibrate-distributions`: a committed demo store calibrated again on a
different validation draw, through the real command and the demo model's network pass; its
training arrays are kept byte for byte and the source store is left as it was."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from explainserve.anomaly import Scorer, load_store
from explainserve.anomaly.store import ARRAY_SPECS
from explainserve.cli import main as cli
from explainserve.commands.archive import demo_store

pytestmark = [pytest.mark.integration, pytest.mark.timeout(600)]
VAL_LIMIT = 300


def test_a_demo_store_is_recalibrated_keeping_its_training_arrays(tmp_path):
    source, _, _ = demo_store("image")
    before = {file.name: file.read_bytes() for file in Path(source).iterdir()}
    out = tmp_path / "stores" / "image"
    assert cli(["recalibrate-distributions", str(source), "--model", "image", "--data", "fashion-scenes",
                "--val-limit", str(VAL_LIMIT), "--min-class-count", "10", "--batch-size", "50", "--out", str(out)]) == 0
    assert {file.name: file.read_bytes() for file in Path(source).iterdir()} == before
    for name in ARRAY_SPECS:
        assert (out / f"{name}.npy").read_bytes() == before[f"{name}.npy"]
    store = load_store(out)
    assert store.calibration["held_out_images"] == VAL_LIMIT
    assert store.calibration["min_class_count"] == 10
    assert store.sha256 != load_store(source).sha256  # another calibration, another digest
    rows = np.asarray(store.arrays["mean"])[:3]
    scored = Scorer(store).score(rows, np.arange(3))
    assert scored.p_value.shape == (3,) and np.all((scored.p_value > 0) & (scored.p_value <= 1))


def test_a_store_for_another_model_is_refused(tmp_path, capsys):
    source, _, _ = demo_store("video")
    assert cli(["recalibrate-distributions", str(source), "--model", "image", "--data", "fashion-scenes",
                "--val-limit", "20", "--out", str(tmp_path / "store")]) != 0
    assert "the store was built for 'demo_video' version '1.0' at layer 'features.3'" in capsys.readouterr().err
    assert not (tmp_path / "store").exists() and not list(tmp_path.iterdir())  # nothing half-published
