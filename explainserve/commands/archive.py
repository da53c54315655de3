"""``explainserve archive``: build a .mar for a demo model or the user's CNN.

The user's model comes from torchvision (``--torchvision ARCH``), timm (``--timm NAME``) or
their own Python file (``--model-file FILE.py --model-class NAME [--model-kwargs JSON]``), with
weights from a local state-dict file (``--weights``). The model is run once at the archive's
input size, so a non-classifier, a non-CNN or a layer the rule cannot choose is refused here,
not when TorchServe loads it.
"""

from __future__ import annotations

import json
import sys
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING

from .train_demo import DEMO_KINDS

if TYPE_CHECKING:  # torch is imported where a model is built, so that `explainserve --help` starts fast
    import torch

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def register(subparsers) -> None:
    parser = subparsers.add_parser("archive", help="build TorchServe model archives (.mar) into the model store")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--demo", choices=DEMO_KINDS,
                        help="one of the demo models (image: 64 px; image_large: 112 px, 512 filters; video)")
    source.add_argument("--torchvision", metavar="ARCH", help="a torchvision classifier, image or video, e.g. resnet50")
    source.add_argument("--timm", metavar="NAME", help="a timm model, e.g. efficientnet_b0 (needs explainserve[timm])")
    source.add_argument("--model-file", type=Path, metavar="FILE.py",
                        help="your Python file defining the model class (shipped inside the archive)")
    parser.add_argument("--model-class", metavar="NAME", help="the nn.Module class in --model-file")
    parser.add_argument("--extra-files", type=Path, nargs="+", default=[], metavar="PATH",
                        help="with --model-file: the .py files and package folders it imports, shipped beside it")
    parser.add_argument("--model-kwargs", default="{}", metavar="JSON",
                        help="keyword arguments of --model-class, as a JSON object")
    parser.add_argument("--weights", type=Path, help="state_dict file of the model (default: random init)")
    parser.add_argument("--class-names", type=Path, help="text file, one class name per line")
    parser.add_argument("--num-classes", type=int,
                        help="number of classes when no --class-names is given (--model-file: default the model's)")
    parser.add_argument("--input-size", type=int, nargs="+", default=[224, 224], help="H W, or T H W for video")
    parser.add_argument("--mean", type=float, nargs="+",
                        help="normalisation mean of values in [0, 1]: 3 values (RGB; default ImageNet's), or 1 for a "
                             "greyscale model (its first convolution takes 1 channel; no default)")
    parser.add_argument("--std", type=float, nargs="+", help="normalisation std, as --mean")
    parser.add_argument("--layer", help="target layer (default: the last spatial feature map the head pools)")
    parser.add_argument("--multi-label", action="store_true",
                        help="the model is a multi-label classifier (independent sigmoid outputs, trained with "
                             "BCEWithLogitsLoss): class scores are each logit's sigmoid, not the softmax")
    parser.add_argument("--name", help="model name (default: the architecture, the class or demo_<kind>)")
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


def class_names_of(args, n_outputs: int | None) -> list[str]:
    """Class names from --class-names or --num-classes; for a model file, the model's output count."""
    if args.class_names:
        names = [line.strip() for line in args.class_names.read_text().splitlines() if line.strip()]
        repeated = sorted({name for name in names if names.count(name) > 1})
        if repeated:  # a data folder or a label names one class: a repeated name would leave its twin without data
            raise ValueError(f"--class-names {args.class_names}: class names must be unique, repeated: {repeated}")
        return names
    if args.num_classes:
        if args.num_classes < 1:
            raise ValueError(f"--num-classes: must be a positive integer, got {args.num_classes}")
        return [f"class_{i}" for i in range(args.num_classes)]
    if n_outputs is None:
        raise ValueError("--class-names or --num-classes is needed with --torchvision and --timm without --weights")
    return [f"class_{i}" for i in range(n_outputs)]


def architecture_of(args) -> tuple[dict, str]:
    """The archive's ``architecture`` entry for the chosen source, and the model's default name."""
    if args.model_class and not args.model_file:
        raise ValueError("--model-class: only with --model-file FILE.py")
    if args.extra_files and not args.model_file:
        raise ValueError("--extra-files: only with --model-file FILE.py (the modules it imports)")
    if args.torchvision or args.timm:
        source, name = ("torchvision", args.torchvision) if args.torchvision else ("timm", args.timm)
        architecture = {"source": source, "name": name}
        if args.weights and not (args.class_names or args.num_classes):
            from explainserve.model_sources import classes_in_weights

            outputs = classes_in_weights(architecture, args.weights)
            print(f"archive: {max(outputs, 2)} classes, read from the head of --weights {args.weights}; name them "
                  f"with --class-names FILE", file=sys.stderr)
        else:
            outputs = len(class_names_of(args, None))
            if outputs == 2 and args.weights and one_row_head(architecture, args.weights):
                outputs = 1  # two names for a sigmoid classifier's one logit
        return {**architecture, "kwargs": {"num_classes": outputs}}, name
    if not args.model_class:
        raise ValueError("--model-class: required with --model-file; pass the name of your nn.Module class")
    try:
        kwargs = json.loads(args.model_kwargs)
    except json.JSONDecodeError as error:
        raise ValueError(f"--model-kwargs: not JSON ({error}); pass an object such as '{{\"num_classes\": 3}}'") from None
    if not isinstance(kwargs, dict):
        raise ValueError(f"--model-kwargs: expected a JSON object, got {args.model_kwargs!r}")
    from explainserve.model_archive import model_file_names

    extra = {"extra_files": model_file_names(args.model_file, args.extra_files)[1:]} if args.extra_files else {}
    return {"source": "model_file", "file": args.model_file.name, "class": args.model_class,
            "kwargs": kwargs, **extra}, args.model_class.lower()


def one_row_head(architecture: dict, weights: Path) -> bool:
    """True when the head of the torchvision or timm ``weights`` has one row (a sigmoid
    classifier's one logit); False too when no class count can be read (loading them says why)."""
    from explainserve.model_sources import classes_in_weights

    try:
        return classes_in_weights(architecture, weights) == 1
    except ValueError:
        return False


def normalisation_of(args, model: torch.nn.Module) -> tuple[list[float], list[float]]:
    """--mean and --std, ImageNet's where left out of an RGB model's arguments; checked against the
    model's first convolution (1 or 3 values each)."""
    from explainserve.explainer import normalisation_channels
    from explainserve.probe import expected_channels

    greyscale = expected_channels(model) == 1
    if greyscale and (args.mean is None or args.std is None):
        raise ValueError("--mean, --std: the model's first convolution takes 1 channel (greyscale), which has no "
                         "default normalisation; pass --mean M --std S, those it was trained with")
    mean = list(IMAGENET_MEAN if args.mean is None else args.mean)
    std = list(IMAGENET_STD if args.std is None else args.std)
    try:
        normalisation_channels(model, mean, std)
    except ValueError as error:
        raise ValueError(f"--{str(error).replace('mean, std', 'mean, --std', 1)}") from None
    return mean, std


def user_model(args) -> tuple[torch.nn.Module, dict]:
    """Build the user's model, load its weights, check it and describe it in archive metadata."""
    import torch

    from explainserve.layers import resolve_layer
    from explainserve.model_archive import stage_model_files
    from explainserve.model_sources import build_architecture, check_classifier, load_weights
    from explainserve.models import served_as_two_classes

    architecture, default_name = architecture_of(args)
    with tempfile.TemporaryDirectory(prefix="explainserve-model-files-") as staged:
        # Built from the files the archive will hold, so that an import of a module left out
        # fails here; a model file that is not there is named by the build itself.
        if args.model_file and args.model_file.is_file():
            model_dir = stage_model_files([args.model_file, *args.extra_files], Path(staged))
        else:
            model_dir = args.model_file.parent if args.model_file else None
        try:
            model = build_architecture(architecture, model_dir)
        except ValueError as error:  # name the user's file, not its staged copy
            raise ValueError(str(error).replace(str(Path(staged) / args.model_file.name), str(args.model_file))
                             if args.model_file else str(error)) from None
    if args.weights:
        load_weights(model, args.weights, f"{default_name} as built from your arguments")
    kind = "video" if len(args.input_size) == 3 else "image"
    mean, std = normalisation_of(args, model)
    inputs = torch.zeros(1, len(mean), *args.input_size)
    n_outputs = check_classifier(model, inputs)
    served = max(n_outputs, 2)  # a sigmoid classifier's one logit z is served as two classes
    # --num-classes 1 asked for the one logit; the classes served are still two.
    class_names = class_names_of(args, served) if args.class_names or args.num_classes != 1 \
        else [f"class_{i}" for i in range(served)]
    if len(class_names) != served:
        logits = (f"{n_outputs} logits" if n_outputs > 1 else
                  "one logit (a sigmoid binary classifier), served as two classes: name both")
        raise ValueError(f"--class-names: {len(class_names)} names, but the model returns {logits}")
    if n_outputs == 1 and args.multi_label:
        raise ValueError("--multi-label: the model returns one logit, a binary classifier; leave --multi-label out "
                         "(it is served as two classes, scored 1 - sigmoid(z) and sigmoid(z))")
    if n_outputs == 1:
        architecture["one_logit"] = True
        served_as_two_classes(model)
        print("archive: the model returns one logit z (a sigmoid binary classifier): served as two classes with "
              "logits (-z/2, z/2), whose softmax is (1 - sigmoid(z), sigmoid(z)); the second class is the one "
              "sigmoid(z) > 0.5 predicts", file=sys.stderr)
    try:
        layer, _ = resolve_layer(model, args.layer, inputs)
    except ValueError as error:
        argument = f"--layer {args.layer}" if args.layer else f"--{architecture['source'].replace('_', '-')}"
        raise ValueError(f"{argument}: {str(error).replace('layer=<dotted module name>', '--layer NAME')}") from None
    if not args.weights:  # allowed (a smoke test of the pipeline), but an untrained network's answers mean nothing
        print(f"WARNING: no --weights: {default_name} keeps its random initial weights; its predictions, maps and "
              "verdicts carry no meaning (pass a state_dict file to serve your trained model)", file=sys.stderr)
    metadata = {
        "name": args.name or default_name, "version": args.version, "kind": kind,
        "input_size": args.input_size, "mean": mean, "std": std,
        "class_names": class_names, "layer": layer, "architecture": architecture,
        "build_timestamp": time.time(), **({"multi_label": True} if args.multi_label else {}),
    }
    return model, metadata


def demo_model(kind: str, name: str | None = None, version: str = "1.0",
               weights_dir: Path | None = None) -> tuple[torch.nn.Module, dict]:
    """A trained demo model (see explainserve.models) and its archive metadata."""
    from explainserve.models import DEMO_ARCHITECTURES, load_demo_model
    from explainserve.models.training import check_kind

    model, demo = load_demo_model(kind) if weights_dir is None else load_demo_model(kind, weights_dir)
    metadata = {
        "name": name or f"demo_{kind}", "version": version, "kind": check_kind(kind).kind,
        "input_size": demo["input_size"],
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

    if args.demo and args.multi_label:
        raise ValueError("--multi-label: not with --demo (the demo models are single-label classifiers)")
    model, metadata = demo_model(args.demo, args.name, args.version, args.weights_dir) if args.demo else user_model(args)
    store = (committed_store(args.demo, metadata, args.weights_dir)
             if args.demo and args.store is None and not args.no_store else args.store)
    path = write_archive(model, metadata, args.export_path, batch_size=args.batch_size,
                         max_batch_delay_ms=args.max_batch_delay_ms, store_path=store,
                         model_file=args.model_file if not args.demo else None,
                         extra_files=args.extra_files if not args.demo else ())
    print(f"wrote {path}" + (f" with the distribution store {store}" if store is not None else ""))
    return 0
