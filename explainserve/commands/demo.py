"""``explainserve demo`` (``make demo``): the whole product on this machine.

1. trains the demo models if their weights are missing; 2. archives them into the model
store; 3. starts TorchServe and the gateway (``explainserve serve``); 4. sends FashionScenes
test images and one MovingFashion clip through ``Explain``; 5. prints predictions,
timings and anomaly verdicts; 6. writes overlay PNGs to ``out/``; 7. sends scenes on held-out
backgrounds and draws the region behind the first ANOMALOUS verdict; 8. leaves the service running.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from explainserve._generated import explain_pb2
from explainserve.client import ExplainClient
from explainserve.commands import archive, serve
from explainserve.commands.explain import print_result, render

IMAGE_METHODS = ["swag_i_g", "jitter_cam"]
VIDEO_METHODS = ["swag_v_i_g"]


def register(subparsers) -> None:
    parser = subparsers.add_parser("demo", help="build, serve and query the demo models end to end")
    parser.add_argument("--images", type=int, default=4, help="FashionScenes test images to send")
    parser.add_argument("--ood-images", type=int, default=24,
                        help="FashionScenes scenes on held-out backgrounds to send for anomaly verdicts")
    parser.add_argument("--out", type=Path, default=Path("out"))
    parser.add_argument("--model-store", type=Path, default=Path("model_store"))
    parser.add_argument("--port", type=int, default=50051)
    parser.add_argument("--metrics-port", type=int, default=9464)
    parser.add_argument("--torchserve-grpc-port", type=int, default=7070)
    parser.add_argument("--torchserve-management-port", type=int, default=7071)
    parser.add_argument("--weights-dir", type=Path, help="folder of the demo weights (default: the package's)")
    parser.set_defaults(func=main)


def ensure_demo_archives(store: Path, weights_dir: Path | None) -> list[str]:
    from explainserve.model_archive import write_archive
    from explainserve.models import train_demo

    names = []
    for kind in ("image", "video"):
        try:
            model, metadata = archive.demo_model(kind, weights_dir=weights_dir)
        except FileNotFoundError:
            print(f"demo: training the {kind} demo model (once)")
            train_demo(kind) if weights_dir is None else train_demo(kind, out=weights_dir)
            model, metadata = archive.demo_model(kind, weights_dir=weights_dir)
        shipped = archive.committed_store(kind, metadata, weights_dir)
        print(f"demo: archived {write_archive(model, metadata, store, store_path=shipped)}"
              + (" with its distribution store" if shipped is not None else ""))
        names.append(metadata["name"])
    return names


def show_anomalies(client: ExplainClient, out: Path, count: int) -> None:
    """Send scenes on held-out backgrounds with their labels, count the ANOMALOUS verdicts, draw
    the region that triggered the most surprising filter of the first flagged one, and say
    whether deleting that region gives the label back."""
    from explainserve.data import FashionScenes
    from explainserve.overlay import save_png
    from explainserve.result_pictures import counterfactual, region_picture

    scenes = FashionScenes("ood_backgrounds", size=count)
    flagged = []
    for index in range(count):
        sample = scenes[index]
        result = client.explain(sample["image"], model="demo_image", label=sample["label"], explain_anomaly=True,
                                timeout=60)
        if result.anomaly.predicted.verdict == explain_pb2.ClassVerdict.ANOMALOUS:
            flagged.append((index, sample, result))
    print(f"\nscenes on held-out backgrounds: {len(flagged)} of {count} ANOMALOUS "
          f"(the verdict is calibrated to flag 1 % of in-distribution scenes)")
    for index, sample, result in flagged[:1]:
        print_result(f"held-out background scene {index} (true: {scenes.class_names[sample['label']]})", result)
        verdict = result.anomaly.predicted
        if not verdict.HasField("surprise_region"):
            print(f"  no surprise region: {verdict.surprise_region_unavailable}")
            continue
        region = verdict.surprise_region
        path = out / f"ood_scene_{index}_surprise_region.png"
        save_png(region_picture(sample["image"], result, scenes.class_names), path)
        print(f"  region that triggered filter {region.filter} (segment {region.top_segment}); "
              f"training exemplars of that filter: {list(region.exemplars)} -> {path}")
        if sentence := counterfactual(result, scenes.class_names):
            print(f"  {sentence}")


def serve_arguments(*argv: str) -> argparse.Namespace:
    """``explainserve serve ARGV`` parsed as the command line parses it, so every option of
    `serve` the demo does not set takes its default (a hand-built Namespace missed --stores)."""
    parser = argparse.ArgumentParser(prog="explainserve")
    serve.register(parser.add_subparsers(dest="command", required=True))
    return parser.parse_args(["serve", *argv])


def main(args) -> int:
    from explainserve.data import FashionScenes, MovingFashion

    names = ensure_demo_archives(args.model_store, args.weights_dir)
    run_dir = args.out / "serve"
    serve.serve_main(serve_arguments(
        "--model-store", str(args.model_store), "--models", *names, "--port", str(args.port),
        "--metrics-port", str(args.metrics_port), "--torchserve-grpc-port", str(args.torchserve_grpc_port),
        "--torchserve-management-port", str(args.torchserve_management_port), "--run-dir", str(run_dir)))
    target = f"127.0.0.1:{args.port}"
    with ExplainClient(target) as client:
        scenes = FashionScenes("test", size=args.images)
        for index in range(args.images):
            sample = scenes[index]
            result = client.explain(sample["image"], model="demo_image", methods=IMAGE_METHODS, timeout=60)
            print_result(f"scene {index} (true: {scenes.class_names[sample['label']]})", result)
            render(sample["image"], result, args.out / f"scene_{index}.png")  # and scene_<i>_<method>.png
        clips = MovingFashion("test", size=1)
        clip = clips[0]
        result = client.explain(clip["clip"], model="demo_video", methods=VIDEO_METHODS, timeout=120)
        print_result(f"clip 0 (true: {clips.class_names[clip['label']]})", result)
        render(clip["clip"], result, args.out / "clip_0.png")
        show_anomalies(client, args.out, args.ood_images)
    print(f"\nthe service is still running on {target}; try:\n"
          f"  explainserve explain IMAGE --model demo_image --method swag_i_g --target {target} --out overlay.png\n"
          f"stop it with: explainserve stop --run-dir {run_dir}")
    return 0
