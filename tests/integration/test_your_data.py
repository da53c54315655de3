"""A user's own data to verdicts, with the commands a user runs: `archive` a random-init
torchvision model, `build-distributions` as two shards over real files, `merge-distributions`,
`serve`, then Explain. Images: FashionScenes written as JPEG class folders, a ResNet-18 at
64 px. Clips: MovingFashion as MP4 files and as clip folders (each built as two shards and a
merge, then served), an R3D-18 at 4 x 32 x 32.

"Exactly as served": a class with a single training sample stores that sample's alpha as its
mean, so the handler's alpha for the same file must equal it. One image class has val images
but no training folder: it is reported and scored against the pooled distribution.
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import grpc
import numpy as np
import pytest

from explainserve._generated import explain_pb2, handler_pb2, inference_pb2, inference_pb2_grpc
from explainserve.anomaly import Scorer, load_store
from explainserve.cli import main as cli
from explainserve.client import ExplainClient
from explainserve.data import FashionScenes, MovingFashion
from explainserve.sidecar.torchserve import free_port
from explainserve.wire import HANDLER_REQUEST_KEY
from support.data_folders import folder_name, write_clip_folders, write_image_folder

pytestmark = [pytest.mark.integration, pytest.mark.timeout(900)]
BUILD_TIME = "2026-01-01T00:00:00Z"
IMAGE_CLASSES = [folder_name(name) for name in FashionScenes("val", size=1).class_names]
CLIP_CLASSES = [folder_name(name) for name in MovingFashion("val", size=1).class_names]
CALIBRATION = ["--min-class-count", "2", "--target-fpr", "0.1", "--batch-size", "4", "--workers", "1"]
EMPTY = 5  # the image class whose training folder is removed


def keep_one(folder: Path) -> Path:
    """Leave a single sample in a class folder; return it."""
    entries = sorted(folder.iterdir())
    for extra in entries[1:]:
        shutil.rmtree(extra) if extra.is_dir() else extra.unlink()
    return entries[0]


def sharded_build(workdir: Path, name: str, data: str) -> Path:
    """build-distributions as two shards, then merge-distributions (calibrating) into stores/<name>."""
    mar = str(workdir / "model_store" / f"{name}.mar")
    shards = [workdir / "stores" / ".shards" / name / str(i) for i in range(2)]
    for index, shard in enumerate(shards):
        assert cli(["build-distributions", "--model", mar, "--data", data, "--out", str(shard), "--shard", str(index),
                    "--num-shards", "2", "--build-time", BUILD_TIME, *CALIBRATION]) == 0
    out = workdir / "stores" / name
    assert cli(["merge-distributions", *map(str, shards), "--out", str(out), "--model", mar, "--data", data,
                *CALIBRATION]) == 0
    return out


def handler_response(target: str, request: explain_pb2.ExplainRequest) -> handler_pb2.HandlerResponse:
    """The served handler's answer to ``request``, straight from TorchServe."""
    with grpc.insecure_channel(target) as channel:
        answer = inference_pb2_grpc.InferenceAPIsServiceStub(channel).Predictions(inference_pb2.PredictionsRequest(
            model_name=request.model, input={HANDLER_REQUEST_KEY: request.SerializeToString()}), timeout=300)
    response = handler_pb2.HandlerResponse.FromString(answer.prediction)
    assert not response.HasField("error"), response.error.message
    return response


def handler_alpha(target: str, request: explain_pb2.ExplainRequest) -> np.ndarray:
    """The served handler's alpha for ``request``."""
    return np.asarray(handler_response(target, request).alpha, dtype=np.float32)


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """Both models archived, their stores built from files, and `explainserve serve` running."""
    workdir = tmp_path_factory.mktemp("your_data")
    images = write_image_folder(workdir / "photos", {"train": 3, "val": 2}, size=64)
    single_image = keep_one(images / "train" / IMAGE_CLASSES[0])
    shutil.rmtree(images / "train" / IMAGE_CLASSES[EMPTY])  # val images only: no training distribution
    videos = write_clip_folders(workdir / "videos", {"train": 2, "val": 1}, size=32, videos=True)
    single_video = keep_one(videos / "train" / CLIP_CLASSES[0])
    (workdir / "image_classes.txt").write_text("\n".join(IMAGE_CLASSES))
    (workdir / "clip_classes.txt").write_text("\n".join(CLIP_CLASSES))
    for name, arch, classes, size in (("scenes", "resnet18", "image_classes.txt", ["64", "64"]),
                                      ("motions", "r3d_18", "clip_classes.txt", ["4", "32", "32"])):
        assert cli(["archive", "--torchvision", arch, "--class-names", str(workdir / classes), "--input-size", *size,
                    "--name", name, "--no-store", "--export-path", str(workdir / "model_store")]) == 0
    image_store = sharded_build(workdir, "scenes", f"imagefolder:{images}")
    video_store = sharded_build(workdir, "motions", f"imagefolder:{videos}")
    ports = {name: free_port() for name in ("port", "metrics-port", "torchserve-grpc-port", "torchserve-management-port")}
    run_dir = workdir / "run"
    assert cli(["serve", "--model-store", str(workdir / "model_store"), "--stores", str(workdir / "stores"),
                "--run-dir", str(run_dir), *[f"--{name}={port}" for name, port in ports.items()]]) == 0
    try:
        yield {"workdir": workdir, "target": f"127.0.0.1:{ports['port']}", "images": images, "videos": videos,
               "torchserve": f"127.0.0.1:{ports['torchserve-grpc-port']}", "image_store": image_store,
               "video_store": video_store, "single_image": single_image, "single_video": single_video}
    finally:
        cli(["stop", "--run-dir", str(run_dir)])


def test_image_folder_to_verdicts(served, capsys):
    store = load_store(served["image_store"])
    smallest = Scorer(store).smallest_p_value
    assert store.counts.tolist() == [1, 3, 3, 3, 3, 0, 3, 3] and store.calibration["held_out_images"] == 16
    record = json.loads((served["image_store"] / "build_record.json").read_text())
    assert record["train"] == {"files": 19, "bad": 0, "listed": []} and record["val"]["files"] == 16
    with ExplainClient(served["target"]) as client:
        for path in sorted((served["images"] / "val").glob("*/*.jpg"))[:4]:
            result = client.explain(path, model="scenes", timeout=300)
            assert result.anomaly.status == explain_pb2.AnomalyReport.OK, result.anomaly.reason
            # 16 val images: no group ranks more than 8, so no p-value goes below 1/9, over the 10 % target
            predicted = result.anomaly.predicted
            assert predicted.smallest_p_value == smallest[predicted.class_index] >= predicted.target_fpr == 0.1
            assert predicted.verdict == explain_pb2.ClassVerdict.NORMAL and predicted.p_value >= predicted.smallest_p_value
            assert result.anomaly.store_sha256 == store.sha256
        # The single training image of class 0, scored against class 0: its alpha is the class mean.
        label = client.explain(served["single_image"], model="scenes", label=0, timeout=300).anomaly.label
    assert label.class_index == 0 and abs(label.beta) < 1e-5
    # The command line says so beside the verdict.
    assert cli(["explain", str(path), "--model", "scenes", "--target", served["target"]]) == 0
    assert "never ANOMALOUS with this store: its p-values for this class go no lower than" in capsys.readouterr().out


def test_a_class_without_training_images_gets_verdicts_from_the_pooled_distribution(served):
    store = load_store(served["image_store"])
    record = json.loads((served["image_store"] / "build_record.json").read_text())
    assert record["classes_without_training_samples"] == [IMAGE_CLASSES[EMPTY]]
    assert store.manifest["pooled"]["classes"] == [EMPTY] and store.calibration["classes"]["source"][EMPTY] == "pooled"
    # By hand: the pooled mean is the count-weighted mean of the other classes' means.
    counts = store.counts.astype(np.float64)
    pooled_mean = (counts[:, None] * np.asarray(store.arrays["mean"], np.float64)).sum(0) / counts.sum()
    np.testing.assert_allclose(store.arrays["mean"][EMPTY], pooled_mean, rtol=1e-5, atol=1e-7)
    path = sorted((served["images"] / "val" / IMAGE_CLASSES[EMPTY]).glob("*.jpg"))[0]
    answer = handler_response(served["torchserve"], explain_pb2.ExplainRequest(
        model="scenes", image=path.read_bytes(), target_class=EMPTY))
    alpha, features = np.asarray(answer.alpha, dtype=np.float32), np.asarray(answer.features, dtype=np.float32)
    p_high, p_low = store.arrays["p_high"][EMPTY], store.arrays["p_low"][EMPTY]
    expected_missing = int(((alpha < p_low) & (pooled_mean > pooled_mean.mean())).sum())
    expected_beta = alpha.astype(np.float64).mean() - pooled_mean.mean()
    with ExplainClient(served["target"]) as client:
        report = client.score(alpha, model="scenes", predicted_class=EMPTY, features=features, timeout=60)
        alpha_only = client.score(alpha, model="scenes", predicted_class=EMPTY, timeout=60)
        explained = client.explain(path, model="scenes", label=EMPTY, timeout=300).anomaly
    assert report.status == explain_pb2.AnomalyReport.OK, report.reason
    verdict = report.predicted
    assert verdict.pooled_distribution and verdict.class_index == EMPTY
    assert verdict.verdict in (explain_pb2.ClassVerdict.NORMAL, explain_pb2.ClassVerdict.ANOMALOUS)
    assert verdict.beta == pytest.approx(expected_beta, rel=1e-4, abs=1e-6)
    assert verdict.surprise_count == int((alpha > p_high).sum()) and verdict.expectation_count == expected_missing
    assert all(reason.source == "pooled" for reason in verdict.reasons)
    assert all(len(flag.exemplars) == 0 for flag in verdict.surprising_filters)
    scorer = Scorer(store)
    assert scorer.has_feature_tests  # the build calibrated the feature tests, the pooled class's too
    assert verdict.p_value == pytest.approx(scorer.score(alpha, EMPTY, features=features).p_value[0], rel=1e-9)
    assert alpha_only.predicted.p_value == pytest.approx(scorer.score(alpha, EMPTY).p_value[0], rel=1e-9)
    assert alpha_only.predicted.pooled_distribution and not alpha_only.predicted.HasField("feature_mahalanobis")
    assert verdict.HasField("feature_mahalanobis")
    # The same image explained with the empty class as its label: scored against the pool too, with
    # the pooled features the handler returned (Explain always sends them to the scorer).
    assert explained.status == explain_pb2.AnomalyReport.OK, explained.reason
    assert explained.label.pooled_distribution and explained.label.class_index == EMPTY
    assert explained.label.beta == pytest.approx(verdict.beta, rel=1e-4, abs=1e-6)
    assert explained.label.p_value == pytest.approx(verdict.p_value, rel=1e-6)
    assert not explained.predicted.pooled_distribution or explained.predicted.class_index == EMPTY


def test_the_stored_alpha_of_an_image_is_the_served_alpha(served):
    request = explain_pb2.ExplainRequest(model="scenes", image=served["single_image"].read_bytes(), target_class=0)
    served_alpha = handler_alpha(served["torchserve"], request)
    stored = np.asarray(load_store(served["image_store"]).arrays["mean"][0])
    assert np.abs(served_alpha).max() > 1e-3  # a live layer, not zeros on both sides
    np.testing.assert_allclose(served_alpha, stored, rtol=0, atol=1e-5)


def test_video_files_to_verdicts_and_the_stored_alpha_is_served(served):
    store = load_store(served["video_store"])
    assert store.counts.tolist() == [1, 2, 2, 2, 2, 2, 2, 2]
    request = explain_pb2.ExplainRequest(model="motions", clip=explain_pb2.Clip(video=served["single_video"].read_bytes()),
                                         target_class=0)
    np.testing.assert_allclose(handler_alpha(served["torchserve"], request), store.arrays["mean"][0], rtol=0, atol=1e-5)
    with ExplainClient(served["target"]) as client:
        for path in sorted((served["videos"] / "val").glob("*/*.mp4"))[:3]:
            result = client.explain(path, model="motions", timeout=300)
            assert result.anomaly.status == explain_pb2.AnomalyReport.OK, result.anomaly.reason


def test_clip_folders_build_the_alpha_served_for_their_frames(served, tmp_path):
    """Last in the module: publishes the clip-folder store over the served MP4 one."""
    clips = write_clip_folders(tmp_path / "clips", {"train": 1, "val": 1}, size=32)
    store = load_store(sharded_build(served["workdir"], "motions", f"clipfolder:{clips}"))
    assert store.counts.tolist() == [1] * 8
    clip = sorted((clips / "train" / CLIP_CLASSES[3]).iterdir())[0]
    frames = sorted(clip.iterdir())
    chosen = [frames[i].read_bytes() for i in (2, 6, 10, 14)]  # the middle frame of each quarter of 16
    request = explain_pb2.ExplainRequest(model="motions", clip=explain_pb2.Clip(frames=chosen), target_class=3)
    np.testing.assert_allclose(handler_alpha(served["torchserve"], request), store.arrays["mean"][3], rtol=0, atol=1e-5)
    # The gateway picks the published store up (it polls its folders every 5 s) and scores with it.
    with ExplainClient(served["target"]) as client:
        deadline = time.monotonic() + 120
        while True:
            anomaly = client.send(request, timeout=300).anomaly
            if anomaly.store_sha256 == store.sha256 or time.monotonic() > deadline:
                break
            time.sleep(2)
    assert anomaly.status == explain_pb2.AnomalyReport.OK, anomaly.reason
    assert anomaly.store_sha256 == store.sha256 and anomaly.predicted.verdict != explain_pb2.ClassVerdict.VERDICT_UNSPECIFIED
