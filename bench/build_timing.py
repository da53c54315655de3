"""How fast build-distributions runs over a folder of images, against the network pass alone.

Writes a folder of JPEG files (FashionScenes at ``--image-size`` px, ``--images`` of them over
8 classes), then, in one process and one run:

- ``build_images_per_second``: the training pass of ``build-distributions --data imagefolder:DIR``
  (decoding and preparing in ``--workers`` processes, the Grad-AMap pass for each image's class,
  the class summaries, the store written), images over its wall time;
- ``probe_images_per_second``: the Grad-AMap pass alone on the same images already decoded,
  resized and normalised in memory, at the same batch size (the speed the build could reach if
  everything but the network were free);
- ``build_efficiency``: their ratio (target >= 0.85);
- ``peak_rss_mb``: this process's peak resident memory, and ``workers_peak_rss_mb`` the largest
  of the decoding processes';
- the load average, because the machine may be shared.

The model is a random-init torchvision ResNet-50 at 224 px (weights change nothing here).

Usage::

    .venv/bin/python bench/build_timing.py [--images 256 --batch-size 16 --workers 1]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import tempfile
import time
from pathlib import Path

import torch
import torchvision
from PIL import Image

from explainserve import model_archive
from explainserve.anomaly.publish import publishing
from explainserve.commands import distributions
from explainserve.commands.distributions_files import build_from_files
from explainserve.data import FashionScenes
from explainserve.data.files import decode_sample, default_workers
from explainserve.data.sources import open_source

CLASSES = [name.replace("/", "-") for name in FashionScenes("val", size=1).class_names]


def write_folder(root: Path, images: int, image_size: int) -> None:
    """``images`` JPEG files in ``root/train/<class>/`` and one per class in ``root/val/``."""
    scenes = FashionScenes("train", size=images + len(CLASSES), image_size=image_size)
    for index in range(len(scenes)):
        sample = scenes[index]
        split = "val" if index >= images else "train"
        folder = root / split / CLASSES[sample["label"]]
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(sample["image"]).save(folder / f"{index:05d}.jpg", quality=90)


def write_model(folder: Path, input_size: int) -> None:
    folder.mkdir(parents=True)
    torch.save(torchvision.models.resnet50(num_classes=len(CLASSES)).state_dict(), folder / model_archive.WEIGHTS_FILE)
    (folder / model_archive.METADATA_FILE).write_text(json.dumps({
        "name": "resnet50", "version": "1", "kind": "image", "input_size": [input_size, input_size],
        "mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225], "class_names": CLASSES, "layer": None,
        "architecture": {"factory": "torchvision.models.resnet50", "kwargs": {"num_classes": len(CLASSES)}}}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=256, help="training images (a few hundred)")
    parser.add_argument("--image-size", type=int, default=256, help="side of the JPEG files")
    parser.add_argument("--input-size", type=int, default=224, help="the model's input side")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--workers", type=int, default=default_workers())
    options = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="build-timing-") as scratch:
        scratch = Path(scratch)
        write_folder(scratch / "images", options.images, options.image_size)
        write_model(scratch / "model", options.input_size)
        parser = argparse.ArgumentParser()
        distributions.register(parser.add_subparsers(dest="command"))
        args = parser.parse_args(["build-distributions", "--model", str(scratch / "model"), "--data",
                                  f"imagefolder:{scratch / 'images'}", "--out", str(scratch / "store"),
                                  "--batch-size", str(options.batch_size), "--workers", str(options.workers)])
        explainer, meta = distributions.open_subject(args)
        data = open_source(args.data, list(meta.class_names))

        started = time.perf_counter()
        with publishing(args.out) as folder:
            build_from_files(args, explainer, meta, data, distributions.alpha_of, folder)
        build_seconds = time.perf_counter() - started

        # The network pass alone: the same images, decoded and prepared beforehand, same batches.
        decoded = [(decode_sample(s.path, "image"), s.label) for s in data.train]
        batches = [decoded[start:start + options.batch_size] for start in range(0, len(decoded), options.batch_size)]
        prepared = [(explainer.prepare([image for image, _ in batch]), [label for _, label in batch]) for batch in batches]
        started = time.perf_counter()
        for inputs, labels in prepared:
            distributions.alpha_of(explainer, inputs, list(range(len(labels))), labels)
        probe_seconds = time.perf_counter() - started

    build_rate, probe_rate = len(data.train) / build_seconds, len(data.train) / probe_seconds
    print(f"images={len(data.train)} batch_size={options.batch_size} workers={options.workers} "
          f"torch_threads={torch.get_num_threads()} input_size={options.input_size} model=resnet50")
    print(f"build_images_per_second={build_rate:.2f}")
    print(f"probe_images_per_second={probe_rate:.2f}")
    print(f"build_efficiency={build_rate / probe_rate:.3f}")
    print(f"peak_rss_mb={resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f}")
    print(f"workers_peak_rss_mb={resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024:.0f}")
    print(f"load_average_1min={os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
