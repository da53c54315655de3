"""Bulk explanations through a real TorchServe and gateway: `explainserve explain DIR --out OUT`
writes one results.jsonl line per input (bad files as error lines), the pictures and a
report.html that headless Chromium renders, sorts and filters; a rerun resumes."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from explainserve._generated import explain_pb2
from explainserve.bulk.record import read_results
from explainserve.client import ExplainClient
from explainserve.data.scenes import FashionScenes
from support import chromium
from support.serving_harness import png, scored_demo_stack

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]
MODEL = "demo_image"
SIDE = 64
needs_chromium = pytest.mark.skipif(chromium.CHROMIUM is None, reason="Debian's chromium is not installed")


@pytest.fixture(scope="module")
def stack(request, tmp_path_factory):
    yield from scored_demo_stack(request, tmp_path_factory.mktemp("bulk"))


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> Path:
    """Six test scenes (two in a sub-folder), two noise images (ANOMALOUS for the demo model),
    a file that is no picture, a picture too small to explain and a clip of the wrong shape."""
    folder = tmp_path_factory.mktemp("bulk_inputs")
    scenes = FashionScenes("test", seed=3, size=6, image_size=SIDE)
    (folder / "more").mkdir()
    for index in range(6):
        (folder / ("more" if index >= 4 else ".") / f"scene_{index}.png").write_bytes(png(scenes[index]["image"]))
    for seed in (0, 1):
        noise = np.random.default_rng(seed).integers(0, 256, (SIDE, SIDE, 3), dtype=np.uint8)
        (folder / f"noise_{seed}.png").write_bytes(png(noise))
    (folder / "broken.jpg").write_bytes(b"\xff\xd8 this is not a JPEG")
    (folder / "tiny.png").write_bytes(png(np.zeros((4, 4, 3), np.uint8)))
    np.save(folder / "flat.npy", np.zeros((8, 8), np.uint8))
    return folder


def explain_folder(source: Path, out: Path, target: str, *extra: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "explainserve.cli", "explain", str(source), "--model", MODEL,
                           "--method", "swag_i_g", "--target", target, "--out", str(out), "--concurrency", "3",
                           "--no-progress", *extra], capture_output=True, text=True, timeout=240)


def results(out: Path) -> dict[str, dict]:
    lines = [json.loads(text) for text in (out / "results.jsonl").read_text().splitlines()]
    assert len({line["id"] for line in lines}) == len(lines), "one line per input"
    return {line["id"]: line for line in lines}


@pytest.fixture(scope="module")
def bulk_run(stack, inputs, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("bulk_out")
    run = explain_folder(inputs, out, stack.target)
    assert run.returncode == 0, run.stdout + run.stderr
    assert "11 inputs: 0 done before, 8 answered now, 3 errors" in run.stdout
    return out


def test_every_input_gets_one_line_and_bad_files_are_error_lines(bulk_run):
    lines = results(bulk_run)
    assert sorted(lines) == sorted(["scene_0.png", "scene_1.png", "scene_2.png", "scene_3.png", "more/scene_4.png",
                                    "more/scene_5.png", "noise_0.png", "noise_1.png", "broken.jpg", "tiny.png",
                                    "flat.npy"])
    for name in ("broken.jpg", "tiny.png", "flat.npy"):
        assert lines[name]["status"] == "error" and lines[name]["error"]["code"] == "BAD_INPUT", lines[name]
        assert name in lines[name]["error"]["message"]
    assert "at least 8" in lines["tiny.png"]["error"]["message"]
    for line in (line for line in lines.values() if line["status"] == "ok"):
        assert line["anomaly_status"] == "OK" and line["verdict"] in ("NORMAL", "ANOMALOUS")
        assert line["predicted"] == line["top_k"][0] and len(line["top_k"]) == 5
        assert line["timings"]["client"] >= line["timings"]["total"] > 0 and line["attempts"] == 1
        assert isinstance(line["surprise_count"], int) and isinstance(line["score"], float)
        for name in ("overlay", "original", "map"):
            assert (bulk_run / line["pictures"][name]).is_file()
    for name in ("noise_0.png", "noise_1.png"):  # uniform noise is far from every training scene
        line = lines[name]
        assert line["verdict"] == "ANOMALOUS" and 0 < line["p_value"] < 0.05 and line["region"]["exemplars"]
        assert {"region", "region_overlay"} <= set(line["pictures"])
        region = np.asarray(Image.open(bulk_run / line["pictures"]["region_overlay"]))
        assert region.shape[0] > 256  # the 256-pixel panels over the caption


def test_a_line_says_what_explain_answers(stack, inputs, bulk_run):
    line = results(bulk_run)["noise_1.png"]
    with ExplainClient(stack.target) as client:
        answer = client.explain(inputs / "noise_1.png", model=MODEL, methods=["swag_i_g"], timeout=60)
    verdict = answer.anomaly.predicted
    assert line["predicted"]["index"] == answer.predicted_class
    # The bulk run's calls may have shared a TorchServe batch, and the network's float32 kernels
    # round by batch size on some CPUs: equal to 1e-5, not to the bit.
    assert line["predicted"]["score"] == pytest.approx(answer.classes[0][2], rel=1e-5)
    assert line["verdict"] == explain_pb2.ClassVerdict.Verdict.Name(verdict.verdict)
    assert line["score"] == pytest.approx(verdict.score, rel=1e-5)
    assert line["p_value"] == pytest.approx(verdict.p_value, rel=1e-5)
    assert line["smallest_p_value"] == verdict.smallest_p_value > 0
    assert (line["surprise_count"], line["expectation_count"]) == (verdict.surprise_count, verdict.expectation_count)


def test_a_rerun_skips_what_is_done_and_explains_only_new_inputs(stack, inputs, bulk_run, tmp_path):
    before = (bulk_run / "results.jsonl").read_text()
    run = explain_folder(inputs, bulk_run, stack.target)
    assert run.returncode == 0 and "11 inputs: 11 done before, 0 answered now" in run.stdout, run.stdout + run.stderr
    assert (bulk_run / "results.jsonl").read_text() == before
    manifest = tmp_path / "list.csv"  # a manifest naming one input already done and one new, with a label
    shutil.copy(inputs / "scene_0.png", tmp_path / "again.png")
    manifest.write_text("path,label\n" f"{inputs / 'noise_0.png'},\nagain.png,3\n")
    out = tmp_path / "out"
    out.mkdir()
    done = {**results(bulk_run)["noise_0.png"], "id": str(inputs / "noise_0.png")}  # the manifest's id of it
    (out / "results.jsonl").write_text(json.dumps(done) + "\n" + '{"id": "cut short by a cra')  # a crash mid-line
    run = explain_folder(manifest, out, stack.target)
    assert run.returncode == 0 and "2 inputs: 1 done before, 1 answered now, 0 errors" in run.stdout, run.stdout
    lines = read_results(out)  # the last line per id; the cut one does not parse
    assert set(lines) == {str(inputs / "noise_0.png"), "again.png"}
    assert lines["again.png"]["label"] == "3" and lines["again.png"]["label_verdict"]["class_index"] == 3



class Cards(HTMLParser):
    """The report's cards in page order (their attributes), and the layout the page measured."""

    def __init__(self, page: str):
        super().__init__()
        self.cards, self.layout, self.gallery = [], None, {}
        self.feed(page)

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "article" and attrs.get("class") == "card":
            self.cards.append(attrs)
        elif tag == "body":
            self.layout = json.loads(attrs["data-layout"])
        elif tag == "main":
            self.gallery = attrs

    def shown(self) -> list[dict]:
        return [card for card in self.cards if "hidden" not in card]


@needs_chromium
def test_the_report_renders_in_chromium_with_a_summary_over_a_gallery(bulk_run, tmp_path):
    lines = results(bulk_run)
    page = Cards(chromium.dom(bulk_run / "report.html"))
    assert [card["data-id"] for card in page.cards] == sorted(lines)  # one card per input, by name
    assert len(page.shown()) == len(lines)
    layout = page.layout
    assert layout["summary"]["y"] + layout["summary"]["height"] <= layout["gallery"]["y"]  # summary above
    assert layout["columns"] >= 2  # a grid of cards at 1280 pixels
    shot = np.asarray(Image.open(chromium.screenshot(bulk_run / "report.html", tmp_path / "report.png")).convert("RGB"))
    assert shot.shape[:2] == (1400, 1280) and shot.std() > 20  # not blank
    summary = shot[:int(layout["summary"]["height"]) + 16]
    red = np.all(np.abs(summary.astype(int) - (0xd7, 0x30, 0x1f)) <= 2, axis=-1)
    assert red.sum() > 100  # the anomalous verdict bar is drawn in the summary
    pictured = [box for card, box in zip(page.shown(), layout["cards"]) if lines[card["data-id"]]["status"] == "ok"]
    x, y, w, h = (int(pictured[0][k]) for k in ("x", "y", "width", "height"))
    card_pixels = shot[y:y + h, x:x + w]
    assert (card_pixels.min(axis=-1) < 200).mean() > 0.15  # its pictures are drawn, not empty boxes


@needs_chromium
def test_the_report_sorts_and_filters_when_its_buttons_are_clicked(bulk_run):
    lines = results(bulk_run)
    page = Cards(chromium.dom(bulk_run / "report.html", fragment="filter=ANOMALOUS&sort=score-desc"))
    assert (page.gallery["data-filter"], page.gallery["data-sort"]) == ("ANOMALOUS", "score-desc")
    anomalous = sorted((line for line in lines.values() if line.get("verdict") == "ANOMALOUS"),
                       key=lambda line: -line["score"])
    assert len(anomalous) >= 2
    assert [card["data-id"] for card in page.shown()] == [line["id"] for line in anomalous]
    assert len(page.cards) == len(lines)  # the others are hidden, not removed
    errors = Cards(chromium.dom(bulk_run / "report.html", fragment="filter=ERROR"))
    assert sorted(card["data-id"] for card in errors.shown()) == ["broken.jpg", "flat.npy", "tiny.png"]
    by_p = Cards(chromium.dom(bulk_run / "report.html", fragment="sort=p-asc"))
    p_values = [float(card["data-p"]) for card in by_p.shown() if card["data-p"]]
    assert p_values == sorted(p_values) and len(p_values) == 8  # the answered ones; errors last
    assert [card["data-id"] for card in by_p.shown()][-3:] == sorted(["broken.jpg", "flat.npy", "tiny.png"]) or \
        {card["data-id"] for card in by_p.shown()[-3:]} == {"broken.jpg", "flat.npy", "tiny.png"}
    slowest = Cards(chromium.dom(bulk_run / "report.html", fragment="sort=latency-desc"))
    latencies = [float(card["data-latency"]) for card in slowest.shown() if card["data-latency"]]
    assert latencies == sorted(latencies, reverse=True) and len(latencies) == len(lines)
