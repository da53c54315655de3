"""The command line starts without torch: `--help`, `explain --help` and a whole `explain` call.

Each case runs in a fresh interpreter, because this test process has imported torch already.
"""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import textwrap

import numpy as np
import pytest
from PIL import Image

HEAVY = ("torch", "torchvision", "matplotlib", "skimage.segmentation", "skimage.transform")  # skimage itself loads lazily


def modules_after(argv: list[str]) -> dict:
    """Run explainserve.cli.main(argv) in a fresh interpreter; its exit code and which heavy modules it imported."""
    script = textwrap.dedent(f"""
        import contextlib, io, json, sys
        from explainserve import cli
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            try:
                code = cli.main({argv!r})
            except SystemExit as exit:
                code = exit.code
        print(json.dumps({{"code": code, "heavy": [m for m in {HEAVY!r} if m in sys.modules]}}))
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("argv", [["--help"], ["explain", "--help"], ["demo", "--help"], ["archive", "--help"]])
def test_help_imports_no_torch(argv):
    result = modules_after(argv)
    assert result["code"] == 0
    assert result["heavy"] == []


def test_explain_call_imports_no_torch(tmp_path):
    image = tmp_path / "grey.png"
    Image.fromarray(np.full((16, 16, 3), 128, np.uint8)).save(image)
    with socket.socket() as probe:  # a loopback port nothing listens on: the call fails UNAVAILABLE
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    result = modules_after(["explain", str(image), "--model", "m", "--target", f"127.0.0.1:{port}", "--timeout", "2"])
    assert result["code"] == 1  # the call failed, and said so
    assert result["heavy"] == []


def test_explain_out_without_a_method_is_refused_before_any_call(tmp_path, capsys):
    from explainserve.cli import main

    image = tmp_path / "grey.png"
    Image.fromarray(np.full((16, 16, 3), 128, np.uint8)).save(image)
    # the target is never dialled: the refusal comes first
    assert main(["explain", str(image), "--model", "m", "--out", str(tmp_path / "o.png"), "--target", "127.0.0.1:1"]) == 2
    assert capsys.readouterr().err.strip() == (
        "explainserve explain: error: --out: no map to draw without --method; pass one (repeat for several), "
        "e.g. --method swag_i_g")
    assert not (tmp_path / "o.png").exists()


def test_train_demo_kinds_are_the_recipes():
    from explainserve.commands.train_demo import DEMO_KINDS
    from explainserve.models.training import RECIPES

    assert sorted(DEMO_KINDS) == sorted(RECIPES)
