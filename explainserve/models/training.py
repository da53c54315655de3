"""Seeded training of the demo models on freshly composed FashionScenes / MovingFashion data."""

from __future__ import annotations

import datetime
import hashlib
import json
import shlex
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from ..data import FashionScenes, MovingFashion
from .architectures import IMAGE_ARCHITECTURE, LARGE_IMAGE_ARCHITECTURE, VIDEO_ARCHITECTURE, DEMO_ARCHITECTURES

WEIGHTS_DIR = Path(__file__).parent / "weights"


@dataclass(frozen=True)
class DemoRecipe:
    """Everything that defines one demo model's training run.

    ``samples_per_epoch`` fresh composites are drawn each epoch (the training split composed
    with seed ``seed * 1000 + epoch``): the generator is the augmentation. The learning rate
    follows a one-cycle schedule over all steps.
    """

    kind: str
    architecture: str
    dataset: type
    epochs: int
    samples_per_epoch: int
    batch_size: int
    learning_rate: float
    weight_decay: float = 5e-4
    val_size: int = 1000
    test_size: int | None = None  # None: the whole split
    image_size: int = 64
    extra: dict = field(default_factory=dict)


RECIPES = {
    # Sized for about 30 minutes on a busy 2-core CPU (20-50 images/s, 4-10 clips/s).
    "image": DemoRecipe("image", IMAGE_ARCHITECTURE, FashionScenes, epochs=8, samples_per_epoch=6400,
                        batch_size=64, learning_rate=3e-3, test_size=4000),
    # 112 px, 512 filters at the target layer: about 2.3x the image model's multiply-adds per
    # image; 48,000 composites fit an hour on 2 idle cores (35 images/s measured).
    "image_large": DemoRecipe("image", LARGE_IMAGE_ARCHITECTURE, FashionScenes, epochs=6, samples_per_epoch=8000,
                              batch_size=64, learning_rate=3e-3, test_size=4000, image_size=112),
    "video": DemoRecipe("video", VIDEO_ARCHITECTURE, MovingFashion, epochs=4, samples_per_epoch=2400,
                        batch_size=24, learning_rate=3e-3, val_size=480, test_size=1000),
}


def check_kind(kind: str) -> DemoRecipe:
    """Return the recipe of ``kind`` or raise a ValueError naming the accepted kinds."""
    if kind not in RECIPES:
        raise ValueError(f"kind: must be one of {tuple(RECIPES)}, got {kind!r}")
    return RECIPES[kind]


def to_tensor(pixels: np.ndarray, mean, std) -> torch.Tensor:
    """uint8 images (N,H,W,3) or clips (N,T,H,W,3) -> normalised float32 (N,3,H,W) / (N,3,T,H,W)."""
    x = torch.from_numpy(pixels).float().div_(255.0)
    x = x.permute(0, 3, 1, 2) if x.ndim == 4 else x.permute(0, 4, 1, 2, 3)
    shape = (1, 3) + (1,) * (x.ndim - 2)
    return ((x - torch.tensor(mean).view(shape)) / torch.tensor(std).view(shape)).contiguous()


def _pixels_and_labels(dataset, indices) -> tuple[np.ndarray, np.ndarray]:
    batch = dataset.batch(indices)
    return batch[0], batch.labels


def channel_statistics(dataset, count: int = 512) -> tuple[list[float], list[float]]:
    """Per-channel mean and std of RGB in [0, 1] over the first ``count`` samples."""
    pixels, _ = _pixels_and_labels(dataset, range(min(count, len(dataset))))
    values = pixels.reshape(-1, 3).astype(np.float64) / 255.0
    return [round(float(v), 4) for v in values.mean(0)], [round(float(v), 4) for v in values.std(0)]


@torch.no_grad()
def evaluate(model: nn.Module, dataset, mean, std, batch_size: int = 128, desc: str = "evaluate") -> float:
    """Top-1 accuracy of ``model`` on every sample of ``dataset`` (labels < 0 are not allowed)."""
    model.eval()
    correct = 0
    for start in tqdm(range(0, len(dataset), batch_size), desc=desc, leave=False):
        pixels, labels = _pixels_and_labels(dataset, range(start, min(start + batch_size, len(dataset))))
        if (labels < 0).any():
            raise ValueError(f"dataset: split {dataset.split!r} has samples without an in-distribution label")
        correct += int((model(to_tensor(pixels, mean, std)).argmax(1).numpy() == labels).sum())
    return correct / len(dataset)


def train_steps(model: nn.Module, dataset, mean, std, optimiser, scheduler, batch_size: int,
                order: np.ndarray, desc: str) -> list[float]:
    """One pass over ``dataset`` in ``order``, one optimiser step per batch; returns the losses."""
    model.train()
    losses = []
    bar = tqdm(range(0, len(order) - batch_size + 1, batch_size), desc=desc)
    for start in bar:
        pixels, labels = _pixels_and_labels(dataset, order[start:start + batch_size])
        loss = nn.functional.cross_entropy(model(to_tensor(pixels, mean, std)), torch.from_numpy(labels))
        optimiser.zero_grad(set_to_none=True)
        loss.backward()
        optimiser.step()
        if scheduler is not None:
            scheduler.step()
        losses.append(loss.item())
        bar.set_postfix(loss=f"{np.mean(losses[-20:]):.3f}")
    return losses


def train_demo(kind: str, epochs: int | None = None, samples_per_epoch: int | None = None, seed: int = 0,
               out: str | Path = WEIGHTS_DIR, threads: int = 2) -> dict:
    """Train a demo model, save ``<out>/<kind>.pt`` and ``<out>/<kind>.json``, return the metadata.

    Parameters
    ----------
    kind
        The demo model: "image" (FashionVGG on FashionScenes, 64 px), "image_large" (FashionVGG512
        on FashionScenes, 112 px) or "video" (MotionC3D on MovingFashion).
    epochs, samples_per_epoch
        Override the recipe (see :data:`RECIPES`).
    seed
        Seeds the weights' initialisation, the batch order and the training composites.
        Evaluation always uses the published splits (seed 0).
    out
        Output folder.
    threads
        ``torch.set_num_threads`` value.
    """
    recipe = check_kind(kind)
    epochs = recipe.epochs if epochs is None else epochs
    samples_per_epoch = recipe.samples_per_epoch if samples_per_epoch is None else samples_per_epoch
    for name, value in (("epochs", epochs), ("samples_per_epoch", samples_per_epoch)):
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"{name}: must be a positive integer, got {value!r}")
    if samples_per_epoch < recipe.batch_size:
        raise ValueError(f"samples_per_epoch: must be at least the batch size {recipe.batch_size}, got {samples_per_epoch}")
    torch.set_num_threads(threads)
    torch.manual_seed(seed)
    make = lambda split, **kw: recipe.dataset(split, image_size=recipe.image_size, **kw)  # noqa: E731
    mean, std = channel_statistics(make("train", seed=seed * 1000))
    class_names = make("val", size=1).class_names
    model = DEMO_ARCHITECTURES[recipe.architecture](num_classes=len(class_names))
    steps = epochs * (samples_per_epoch // recipe.batch_size)
    optimiser = torch.optim.AdamW(model.parameters(), lr=recipe.learning_rate, weight_decay=recipe.weight_decay)
    scheduler = torch.optim.lr_scheduler.OneCycleLR(optimiser, max_lr=recipe.learning_rate, total_steps=steps)
    order_rng = np.random.default_rng(seed)
    val = make("val", size=recipe.val_size)
    curve, started = [], time.monotonic()
    for epoch in range(epochs):
        composites = make("train", seed=seed * 1000 + epoch, size=samples_per_epoch)
        losses = train_steps(model, composites, mean, std, optimiser, scheduler, recipe.batch_size,
                             order_rng.permutation(samples_per_epoch), desc=f"{kind} epoch {epoch + 1}/{epochs}")
        val_accuracy = evaluate(model, val, mean, std, desc="val")
        curve.append({"epoch": epoch + 1, "train_loss": round(float(np.mean(losses)), 4),
                      "val_accuracy": round(val_accuracy, 4), "seconds": round(time.monotonic() - started, 1)})
        tqdm.write(json.dumps(curve[-1]))
    training_seconds = time.monotonic() - started
    test = make("test", size=recipe.test_size)
    ood = make("ood_backgrounds", size=recipe.test_size)
    metadata = {
        "architecture": recipe.architecture,
        "kind": recipe.kind,
        "input_size": ([16] if recipe.kind == "video" else []) + [recipe.image_size, recipe.image_size],
        "mean": mean,
        "std": std,
        "class_names": class_names,
        "target_layer": model.target_layer,
        "training_command": "explainserve train-demo " + shlex.join([kind, "--epochs", str(epochs),
                                                                      "--samples-per-epoch", str(samples_per_epoch),
                                                                      "--seed", str(seed)]),
        "seed": seed,
        "test_accuracy": round(evaluate(model, test, mean, std, desc="test"), 4),
        "test_samples": len(test),
        "ood_accuracy": round(evaluate(model, ood, mean, std, desc="ood_backgrounds"), 4),
        "ood_split": "ood_backgrounds",
        "ood_samples": len(ood),
        "learning_curve": curve,
        "training_seconds": round(training_seconds, 1),
        "torch_version": torch.__version__,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }
    save_demo_model(model, metadata, Path(out) / kind)
    return metadata


def save_demo_model(model: nn.Module, metadata: dict, stem: Path) -> None:
    """Write ``stem.pt`` (state-dict) and ``stem.json`` (metadata plus the weights' sha256)."""
    stem.parent.mkdir(parents=True, exist_ok=True)
    weights = stem.with_suffix(".pt")
    torch.save(model.state_dict(), weights)
    metadata = dict(metadata, weights_sha256=hashlib.sha256(weights.read_bytes()).hexdigest())
    stem.with_suffix(".json").write_text(json.dumps(metadata, indent=2) + "\n")
