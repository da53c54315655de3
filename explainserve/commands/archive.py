"""``explainserve archive``: build a .mar for the demo models or for user torchvision weights."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # torch is imported where a model is built, so that `explainserve --help` starts fast
    import torch

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def register(subparsers) -> None:
    parser = subparsers.add_parser("archive", help="build TorchServe model archives (.mar) into the model store")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--demo", choices=("image", "video"), help="one of the demo models")
    source.add_argument("--torchvision", metavar="ARCH", help="a torchvision architecture, e.g. resnet50")
    parser.add_argument("--weights", type=Path, help="state_dict file for --torchvision (default: random init)")
    parser.add_argument("--class-names", type=Path, help="text file, one class name per line (--torchvision)")
    parser.add_argument("--num-classes", type=int, help="number of classes when no --class-names is given")
    parser.add_argument("--input-size", type=int, nargs="+", default=[224, 224], help="H W, or T H W for video")
    parser.add_argument("--mean", type=float, nargs=3, default=IMAGENET_MEAN)
    parser.add_argument("--std", type=float, nargs=3, default=IMAGENET_STD)
    parser.add_argument("--layer", help="target layer (default: the architecture's last conv block)")
    parser.add_argument("--name", help="model name (default: the architecture or demo_<kind>)")
    parser.add_argument("--version", default="1.0")
    parser.add_argument("--weights-dir", type=Path, help="folder of the demo weights (default: the package's)")
    store = parser.add_mutually_exclusive_group()
    store.add_argument("--store", type=Path, help="anomaly distribution store folder to ship in the archive "
                                                  "(default for --demo: the package's store of that demo model)")
    store.add_argument("--no-store", action="store_true", help="ship no distribution store")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--max-batch-delay-ms", type=int, default=20)
    parser.add_argument("--export-path", type=Path, default=Path("model_store"))
    parser.set_defaults(func=main)


def torchvision_model(args) -> tuple[torch.nn.Module, dict]:
    """Build the architecture, load the weights and describe it in archive metadata."""
    import torch
    import torchvision

    if args.class_names:
        class_names = [line.strip() for line in args.class_names.read_text().splitlines() if line.strip()]
    elif args.num_classes:
        class_names = [f"class_{i}" for i in range(args.num_classes)]
    else:
        raise ValueError("--class-names or --num-classes is needed with --torchvision")
    kind = "video" if len(args.input_size) == 3 else "image"
    module = "torchvision.models.video" if kind == "video" else "torchvision.models"
    factory = f"{module}.{args.torchvision}"
    try:
        model = torchvision.models.get_model(args.torchvision, weights=None, num_classes=len(class_names))
    except ValueError as error:
        raise ValueError(f"--torchvision: {error}") from None
    if args.weights:
        model.load_state_dict(torch.load(args.weights, map_location="cpu", weights_only=True))
    metadata = {
        "name": args.name or args.torchvision, "version": args.version, "kind": kind,
        "input_size": args.input_size, "mean": list(args.mean), "std": list(args.std),
        "class_names": class_names, "layer": args.layer,
        "architecture": {"factory": factory, "kwargs": {"num_classes": len(class_names)}},
        "build_timestamp": time.time(),
    }
    return model, metadata


def demo_model(kind: str, name: str | None = None, version: str = "1.0",
               weights_dir: Path | None = None) -> tuple[torch.nn.Module, dict]:
    """A trained demo model (see explainserve.models) and its archive metadata."""
    from explainserve.models import DEMO_ARCHITECTURES, load_demo_model

    model, demo = load_demo_model(kind) if weights_dir is None else load_demo_model(kind, weights_dir)
    metadata = {
        "name": name or f"demo_{kind}", "version": version, "kind": kind, "input_size": demo["input_size"],
        "mean": demo["mean"], "std": demo["std"], "class_names": demo["class_names"], "layer": demo["target_layer"],
        "architecture": {"factory": f"explainserve.models.{DEMO_ARCHITECTURES[demo['architecture']].__name__}",
                         "kwargs": {"num_classes": len(demo["class_names"])}},
        "build_timestamp": time.time(),
    }
    return model, metadata


def demo_store(kind: str) -> tuple[Path, dict | None, str]:
    """The committed distribution store of a demo model: its folder, its build record
    (``stores/<kind>.json``: how and from which weights it was built; None without one) and
    the sha256 of the package's current weights of that model."""
    from explainserve.models.training import WEIGHTS_DIR

    folder = WEIGHTS_DIR.parent / "stores" / kind
    record = folder.with_suffix(".json")
    weights = json.loads((WEIGHTS_DIR / f"{kind}.json").read_text())["weights_sha256"]
    return folder, json.loads(record.read_text()) if record.is_file() else None, weights


def committed_store(kind: str, metadata: dict, weights_dir: Path | None = None) -> Path | None:
    """The committed store of demo model ``kind`` when it was built for the archive's model name
    and version and for the package's current weights; else None, saying why."""
    if weights_dir is not None:
        print("no distribution store shipped: the demo store is for the package's weights, not --weights-dir")
        return None
    folder, record, weights = demo_store(kind)
    served = {"name": metadata["name"], "version": str(metadata["version"])}
    if record is None or record["model"] != served or record["weights_sha256"] != weights:
        built = "none is committed" if record is None else \
            f"it is for {record['model']} with weights {record['weights_sha256'][:12]}"
        print(f"no distribution store shipped for {served} with weights {weights[:12]}: {built}; "
              "build one with build-distributions and pass --store")
        return None
    return folder


def main(args) -> int:
    from explainserve.model_archive import write_archive

    model, metadata = demo_model(args.demo, args.name, args.version, args.weights_dir) if args.demo else torchvision_model(args)
    store = (committed_store(args.demo, metadata, args.weights_dir)
             if args.demo and args.store is None and not args.no_store else args.store)
    path = write_archive(model, metadata, args.export_path, batch_size=args.batch_size,
                         max_batch_delay_ms=args.max_batch_delay_ms, store_path=store)
    print(f"wrote {path}" + (f" with the distribution store {store}" if store is not None else ""))
    return 0
