"""``explainserve demo`` (``make demo``): explain a photograph in-process and write overlay PNGs.

This version runs the explanation core alone, on an UNTRAINED ResNet-18 and a photograph
from ``skimage.data``: it shows the API, the maps' shapes and the timings, not meaningful
explanations (an untrained network has nothing to explain).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torchvision
from PIL import Image
from skimage import data

from ..explainer import IMAGE_METHODS, ExplainOptions, Explainer
from ..overlay import overlay

IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def register(subparsers) -> None:
    parser = subparsers.add_parser("demo", help="explain a sample photograph and write overlay PNGs to out/")
    parser.add_argument("--out", type=Path, default=Path("out"), help="folder for the PNGs (default: out/)")
    parser.set_defaults(func=main)


def main(args) -> int:
    print("explainserve demo: UNTRAINED ResNet-18 (random weights, seed 0) on skimage.data.chelsea();")
    print("the maps show the pipeline at work, not what a trained model looks at.")
    torch.manual_seed(0)
    model = torchvision.models.resnet18(weights=None, num_classes=10)
    explainer = Explainer(model, kind="image", input_size=(224, 224), mean=IMAGENET_MEAN, std=IMAGENET_STD,
                          class_names=[f"class_{i}" for i in range(10)])
    photo = data.chelsea()
    result = explainer.explain([photo], list(IMAGE_METHODS), ExplainOptions(top_k=3))[0]

    print("top classes: " + ", ".join(f"{explainer.class_names[c]} {s:.3f}" for c, s in zip(result.classes, result.scores)))
    print("timings: " + ", ".join(f"{stage} {seconds * 1000:.0f} ms" for stage, seconds in result.timings.items()))
    args.out.mkdir(parents=True, exist_ok=True)
    shown = np.asarray(Image.fromarray(photo).resize(explainer.input_size[::-1], Image.BILINEAR))
    for method, explanation in result.maps.items():
        path = args.out / f"demo_{method}.png"
        Image.fromarray(overlay(shown, explanation.heatmap, explanation.segments)).save(path)
        segments = "" if explanation.segments is None else f", {explanation.segment_scores.size} segments"
        print(f"wrote {path} ({method}: map {explanation.heatmap.shape}{segments})")
    return 0
