"""Micro-benchmark of the explanation core on the CPU: ResNet-50, batch 1, 224 x 224.

Every timed call runs in rounds, one call of each per round, so that the machine's noise hits
all of them alike; the figures are medians. Prints a table and two ratios:

* swag_overhead_ratio = SWAG_I end to end / captum GuidedBackprop (target <= 1.3)
* swag_overhead_ratio_vgg16: the same on VGG16, whose classifier has ReLUs after the target
  layer, so the probe backpropagates its head twice (vanilla for dy/dA, guided for the input)
* jitter_overhead_ratio = Jitter-CAM (d = m) / one batched forward of the same patches plus
  autograd.grad of their summed target logits w.r.t. the target activations (target <= 1.15)

Usage: python bench/core_timing.py [--rounds N] [--jitter-rounds N]
"""

from __future__ import annotations

import argparse
import statistics
import time
import warnings

import numpy as np
import torch
import torch.nn.functional as F
import torchvision
from captum.attr import GuidedBackprop
from pytorch_grad_cam import GradCAM
from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget
from skimage import data, transform
from tqdm import tqdm

from explainserve.explainer import Explainer
from explainserve.jitter_cam import patch_offsets
from explainserve.probe import probe

IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def reference_jitter_pass(model, patches, target):
    """The minimal Jitter-CAM network work, written without the library."""
    captured = {}
    handle = model.layer4.register_forward_hook(lambda module, args, output: captured.setdefault("A", output))
    try:
        logits = model(patches)
    finally:
        handle.remove()
    return torch.autograd.grad(logits[:, target].sum(), captured["A"])


def jitter_patches(inputs, cam_size):
    """The (m+1)^2 patches Jitter-CAM with d = m takes from the upscaled image."""
    (m_h, m_w), (_, _, height, width) = cam_size, inputs.shape
    upscaled = F.interpolate(inputs, size=(2 * height, 2 * width), mode="bilinear", align_corners=False)
    cell_h, cell_w = height // m_h, width // m_w
    return torch.cat([upscaled[:, :, i * cell_h: i * cell_h + height, j * cell_w: j * cell_w + width]
                      for i in patch_offsets(m_h, 1) for j in patch_offsets(m_w, 1)])


def imagenet_explainer(model: torch.nn.Module) -> Explainer:
    return Explainer(model, kind="image", input_size=(224, 224), mean=IMAGENET_MEAN, std=IMAGENET_STD,
                     class_names=[str(i) for i in range(1000)])


def run_rounds(calls: dict, rounds: int, label: str) -> dict[str, float]:
    times = {name: [] for name in calls}
    for name, call in calls.items():  # warm-up
        call()
    for _ in tqdm(range(rounds), desc=label, unit="round"):
        for name, call in calls.items():
            started = time.perf_counter()
            call()
            times[name].append(time.perf_counter() - started)
    return {name: statistics.median(values) for name, values in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=9, help="rounds for the single-pass methods")
    parser.add_argument("--jitter-rounds", type=int, default=3, help="rounds for Jitter-CAM and its reference")
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    torch.manual_seed(0)

    model = torchvision.models.resnet50(weights=None).eval()
    explainer = imagenet_explainer(model)
    vgg16 = torchvision.models.vgg16(weights=None).eval()
    vgg16_explainer = imagenet_explainer(vgg16)
    image = (transform.resize(data.chelsea(), (224, 224), anti_aliasing=True) * 255).astype(np.uint8)
    inputs = explainer.prepare([image]).inputs
    target = int(probe(model, inputs, input_gradient=False).predicted[0])
    guided_backprop = GuidedBackprop(model)
    vgg16_target = int(probe(vgg16, inputs, input_gradient=False).predicted[0])
    vgg16_guided_backprop = GuidedBackprop(vgg16)
    grad_cam_reference = GradCAM(model=model, target_layers=[model.layer4])
    patches = jitter_patches(inputs, explainer.cam_size)

    def forward():
        with torch.no_grad():
            model(inputs)

    single = run_rounds({
        "forward alone": forward,
        "probe pass (forward + guided backward)": lambda: probe(model, inputs),
        "SWAG_I end to end": lambda: explainer.explain([image], ["swag_i"]),
        "SWAG_G end to end": lambda: explainer.explain([image], ["swag_g"]),
        "SWAG_I+G end to end": lambda: explainer.explain([image], ["swag_i_g"]),
        "Grad-CAM end to end": lambda: explainer.explain([image], ["grad_cam"]),
        "captum GuidedBackprop": lambda: guided_backprop.attribute(inputs, target=target),
        "pytorch-grad-cam GradCAM": lambda: grad_cam_reference(input_tensor=inputs, targets=[ClassifierOutputTarget(target)]),
        "VGG16 SWAG_I end to end": lambda: vgg16_explainer.explain([image], ["swag_i"]),
        "VGG16 captum GuidedBackprop": lambda: vgg16_guided_backprop.attribute(inputs, target=vgg16_target),
    }, args.rounds, "single-pass methods")
    jitter = run_rounds({
        f"Jitter-CAM d=m ({patches.shape[0]} patches) end to end": lambda: explainer.explain([image], ["jitter_cam"]),
        "reference: batched patch forward + autograd.grad to A": lambda: reference_jitter_pass(model, patches, target),
    }, args.jitter_rounds, "Jitter-CAM")

    print(f"\nCPU, ResNet-50 and VGG16 (random init), batch 1, 224x224, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads; medians of {args.rounds} (Jitter-CAM: {args.jitter_rounds}) rounds")
    print(f"{'what':60s} {'seconds':>9s}")
    for name, seconds in {**single, **jitter}.items():
        print(f"{name:60s} {seconds:9.4f}")
    jitter_ours, jitter_reference = jitter.values()
    print(f"\nswag_overhead_ratio={single['SWAG_I end to end'] / single['captum GuidedBackprop']:.3f}  (target <= 1.3)")
    print(f"swag_overhead_ratio_vgg16="
          f"{single['VGG16 SWAG_I end to end'] / single['VGG16 captum GuidedBackprop']:.3f}  (target <= 1.3)")
    print(f"jitter_overhead_ratio={jitter_ours / jitter_reference:.3f}  (target <= 1.15)")


if __name__ == "__main__":
    main()
