"""``explainserve train-demo image|video``: train a demo model and save weights + metadata."""

from __future__ import annotations

import argparse
import json

# explainserve.models.training imports torch; registering this command must not (see explainserve.cli).
DEMO_KINDS = ("image", "image_large", "video")


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "train-demo",
        help="train the demo image or video model (seeded, reproducible)",
        description="Train a demo classifier on the CPU: image (FashionScenes, 64 px), image_large "
                    "(FashionScenes, 112 px, 512 filters) or video (MovingFashion) "
                    "and write <out>/<kind>.pt and <out>/<kind>.json.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("kind", choices=DEMO_KINDS)
    parser.add_argument("--epochs", type=int, default=None, help="epochs (default: the recipe's)")
    parser.add_argument("--samples-per-epoch", type=int, default=None,
                        help="fresh composites per epoch (default: the recipe's)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", help="output folder (default: the package's explainserve/models/weights)")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    parser.set_defaults(func=run)


def run(args) -> int:
    from ..models.training import WEIGHTS_DIR, train_demo

    metadata = train_demo(args.kind, epochs=args.epochs, samples_per_epoch=args.samples_per_epoch,
                          seed=args.seed, out=args.out or str(WEIGHTS_DIR), threads=args.threads)
    summary = {k: metadata[k] for k in ("architecture", "test_accuracy", "ood_accuracy", "training_seconds")}
    print(json.dumps(summary))
    return 0
