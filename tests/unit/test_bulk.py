"""Bulk runs without a model: input listing, retries and backoff against a real gRPC server
whose Explain fails on purpose, resumable results.jsonl and the report page."""

from __future__ import annotations

import json
import time
from concurrent import futures

import grpc
import numpy as np
import pytest
from PIL import Image

from explainserve._generated import explain_pb2, explain_pb2_grpc
from explainserve.bulk import BulkOptions, list_inputs, run_bulk, write_report
from explainserve.bulk.inputs import BulkInput, label_index, load
from explainserve.bulk.record import read_results
from explainserve.client import ExplainClient


def picture(path, side=16):
    Image.fromarray(np.full((side, side, 3), 90, np.uint8)).save(path)


def test_a_folder_lists_pictures_and_clips_recursively_and_a_manifest_its_rows(tmp_path):
    (tmp_path / "a").mkdir()
    picture(tmp_path / "b.png")
    picture(tmp_path / "a" / "c.jpg")
    np.save(tmp_path / "clip.npy", np.zeros((2, 8, 8, 3), np.uint8))
    (tmp_path / "notes.md").write_text("not an input")
    assert [item.id for item in list_inputs(tmp_path)] == ["a/c.jpg", "b.png", "clip.npy"]
    (tmp_path / "list.txt").write_text("# inputs\nb.png\n\na/c.jpg\n")
    assert [(i.id, i.path) for i in list_inputs(tmp_path / "list.txt")] == [
        ("b.png", tmp_path / "b.png"), ("a/c.jpg", tmp_path / "a" / "c.jpg")]
    (tmp_path / "list.jsonl").write_text('{"path": "b.png", "label": 2}\n{"path": "/abs/x.png"}\n')
    items = list_inputs(tmp_path / "list.jsonl")
    assert items[0].label == 2 and str(items[1].path) == "/abs/x.png"  # an absolute path stays as it is
    (tmp_path / "bad.csv").write_text("path,label\n,1\n")
    with pytest.raises(ValueError, match="row 1 has no path"):
        list_inputs(tmp_path / "bad.csv")
    with pytest.raises(ValueError, match="input: expected a folder or a manifest"):
        list_inputs(tmp_path / "b.png")


def test_loading_names_the_input_and_what_is_wrong(tmp_path):
    (tmp_path / "x.png").write_bytes(b"garbage")
    np.save(tmp_path / "flat.npy", np.zeros((4, 4), np.uint8))
    with pytest.raises(ValueError, match="x.png is not a JPEG or PNG"):
        load(BulkInput("x.png", tmp_path / "x.png"))
    with pytest.raises(ValueError, match=r"flat.npy: expected a uint8 \(T, H, W, 3\) clip"):
        load(BulkInput("flat.npy", tmp_path / "flat.npy"))
    with pytest.raises(ValueError, match="gone.png: cannot be read"):
        load(BulkInput("gone.png", tmp_path / "gone.png"))
    assert label_index(BulkInput("a", tmp_path, "3")) == 3
    with pytest.raises(ValueError, match="label: expected a class index"):
        label_index(BulkInput("a", tmp_path, "coat"))


class Flaky(explain_pb2_grpc.ExplainerServicer):
    """Explain answers UNAVAILABLE ``failures`` times per image, then a small valid answer;
    an image named in ``slow`` never answers within the deadline."""

    def __init__(self, failures: int):
        self.failures, self.calls = failures, {}

    def Explain(self, request, context):
        key = request.image
        self.calls[key] = self.calls.get(key, 0) + 1
        if key.startswith(b"slow"):
            time.sleep(2)
        if self.calls[key] <= self.failures:
            context.abort(grpc.StatusCode.UNAVAILABLE, "warming up")
        if key.startswith(b"refuse"):
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, "image: refused")
        return explain_pb2.ExplainResponse(model="m", predicted_class=1, target_class=1,
                                           classes=[explain_pb2.ClassScore(index=1, name="one", score=0.75)])


@pytest.fixture
def server():
    servers = []

    def start(servicer):
        grpc_server = grpc.server(futures.ThreadPoolExecutor(4))
        explain_pb2_grpc.add_ExplainerServicer_to_server(servicer, grpc_server)
        port = grpc_server.add_insecure_port("127.0.0.1:0")
        grpc_server.start()
        servers.append(grpc_server)
        return f"127.0.0.1:{port}"

    yield start
    for grpc_server in servers:
        grpc_server.stop(0)


def test_unavailable_is_retried_with_backoff_and_other_failures_are_lines(server, tmp_path, monkeypatch):
    from explainserve.bulk import runner

    monkeypatch.setattr(runner, "load", lambda item: np.zeros((16, 16, 3), np.uint8))  # send the file's bytes as they are
    for name in ("ok1", "ok2", "refuse", "slow"):
        (tmp_path / f"{name}.png").write_bytes(name.encode())
    service = Flaky(failures=2)
    target = server(service)
    out = tmp_path / "out"
    options = BulkOptions(model="m", concurrency=2, timeout=1.0, retries=2, backoff=0.05)
    started = time.perf_counter()
    with ExplainClient(target) as client:
        counts = run_bulk(client, list_inputs(tmp_path, exclude=out), out, options, progress=False)
    lines = read_results(out)
    assert counts == {"inputs": 4, "skipped": 0, "ok": 2, "errors": 2, "anomalous": 0}
    assert lines["ok1.png"]["attempts"] == 3 and lines["ok1.png"]["predicted"]["name"] == "one"
    assert lines["ok1.png"]["anomaly_status"] == "STATUS_UNSPECIFIED" and lines["ok1.png"]["verdict"] is None
    assert lines["refuse.png"]["error"] == {"code": "INVALID_ARGUMENT", "message": "image: refused"}
    assert lines["refuse.png"]["attempts"] == 3  # two UNAVAILABLE, then a final refusal
    assert lines["slow.png"]["error"]["code"] == "DEADLINE_EXCEEDED" and lines["slow.png"]["attempts"] == 1
    assert service.calls[b"ok1"] == 3 and time.perf_counter() - started < 10
    # A rerun tries only the input whose failure may pass (the deadline), and keeps the rest.
    assert len(list_inputs(tmp_path)) == 6  # the pictures written into out/, inside the input folder
    assert [item.id for item in list_inputs(tmp_path, exclude=out)] == ["ok1.png", "ok2.png", "refuse.png", "slow.png"]
    with ExplainClient(target) as client:
        again = run_bulk(client, list_inputs(tmp_path, exclude=out), out, options, progress=False)
    assert again["skipped"] == 3 and service.calls[b"ok1"] == 3 and service.calls[b"slow"] == 2
    assert len((out / "results.jsonl").read_text().splitlines()) == 5 and len(read_results(out)) == 4
    report = write_report(out).read_text()
    assert report.count('<article class="card"') == 4 and "http" not in report.replace("http://www.w3.org", "")


def test_exhausted_retries_leave_an_unavailable_line(server, tmp_path, monkeypatch):
    from explainserve.bulk import runner

    monkeypatch.setattr(runner, "load", lambda item: np.zeros((16, 16, 3), np.uint8))
    (tmp_path / "a.png").write_bytes(b"a")
    target = server(Flaky(failures=5))
    with ExplainClient(target) as client:
        run_bulk(client, list_inputs(tmp_path), tmp_path / "out",
                 BulkOptions(model="m", retries=1, backoff=0.01), progress=False)
    line = json.loads((tmp_path / "out" / "results.jsonl").read_text())
    assert line["error"]["code"] == "UNAVAILABLE" and line["attempts"] == 2


def test_options_are_checked_by_name():
    with pytest.raises(ValueError, match="concurrency"):
        BulkOptions(model="m", concurrency=0).check()
    with pytest.raises(ValueError, match="retries"):
        BulkOptions(model="m", retries=-1).check()
