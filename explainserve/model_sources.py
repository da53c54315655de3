"""Where a served model comes from: torchvision, timm, or the user's own model file.

An archive's ``metadata.json`` names the source under ``"architecture"``:

* ``{"source": "torchvision", "name": "resnet18", "kwargs": {"num_classes": 3}}``: any
  torchvision image or video classifier, built with ``weights=None``;
* ``{"source": "timm", "name": "resnet18", "kwargs": {"num_classes": 3}}``: a timm model,
  built with ``pretrained=False`` (timm is the optional extra ``explainserve[timm]``);
* ``{"source": "model_file", "file": "model.py", "class": "MyNet", "kwargs": {...}}``:
  TorchServe's model-file convention; the file ships inside the archive, beside the metadata;
* ``{"factory": "explainserve.models.FashionVGG", "kwargs": {...}}``: the demo models.

Any of them may add ``"one_logit": true``: the model returns one logit z (a sigmoid binary
classifier) and is served as two classes with logits (-z / 2, z / 2)
(:func:`~explainserve.models.one_logit.served_as_two_classes`).

Weights always come from a local state-dict file; nothing is downloaded. TorchScript, ONNX and
``torch.export`` files are refused: the maps hook the model's layers and backpropagate through
an eager ``nn.Module``.
"""

from __future__ import annotations

import importlib
import importlib.util
import inspect
import os
import sys
import zipfile
from pathlib import Path

import torch
from torch import nn

from .models.one_logit import served_as_two_classes
from .models.state_dicts import load_checked, read_classifier_state, read_state_dict
from .probe import check_logits, input_size_failure, one_logit_per_sample

SOURCES = ("torchvision", "timm", "model_file")
# Factories a metadata file may name; archives cannot make the handler import anything else.
ALLOWED_FACTORY_MODULES = ("torchvision.models", "torchvision.models.video", "explainserve.models")
EAGER_HINT = ("explanations need the eager nn.Module (the maps hook its layers and backpropagate through them): "
              "pass --torchvision ARCH, --timm NAME or --model-file FILE.py --model-class NAME, "
              "with --weights a state_dict file (torch.save(model.state_dict(), path))")


def compiled_format(path: str | Path) -> str | None:
    """Name the compiled format of ``path`` (TorchScript, ONNX, torch.export), or None for anything else."""
    path = Path(path)
    if path.suffix.lower() == ".onnx":
        return "an ONNX model"
    if path.suffix.lower() == ".pt2":
        return "a torch.export program"
    if path.is_file() and zipfile.is_zipfile(path):
        with zipfile.ZipFile(path) as archive:
            names = archive.namelist()
        if any("serialized_exported_program" in n or n.endswith("/models/model.json") for n in names):
            return "a torch.export program"
        if any(n.endswith("/constants.pkl") or "/code/" in n for n in names):
            return "a TorchScript module"
    return None


def refuse_compiled(path: str | Path, argument: str) -> None:
    """Raise ValueError when ``path`` is a TorchScript, ONNX or torch.export file."""
    found = compiled_format(path)
    if found is not None:
        raise ValueError(f"{argument} {path}: {found}; {EAGER_HINT}")


def torchvision_names() -> tuple[str, ...]:
    """Every torchvision classification architecture, image and video."""
    import torchvision

    return tuple(sorted(torchvision.models.list_models(module=torchvision.models)
                        + torchvision.models.list_models(module=torchvision.models.video)))


def build_torchvision(name: str, kwargs: dict) -> nn.Module:
    import torchvision

    if name not in torchvision_names():
        raise ValueError(f"--torchvision {name}: not a torchvision classification architecture; "
                         f"pass one of torchvision.models.list_models(), e.g. resnet18, vgg16, r3d_18")
    return torchvision.models.get_model(name, weights=None, **kwargs)


def build_timm(name: str, kwargs: dict) -> nn.Module:
    try:
        import timm
    except ImportError:
        raise ValueError(f"--timm {name}: timm is not installed; pip install 'explainserve[timm]'") from None
    if not timm.is_model(name):
        raise ValueError(f"--timm {name}: not a timm model name; pass one of timm.list_models(), "
                         f"e.g. resnet18, efficientnet_b0, convnext_atto")
    return timm.create_model(name, pretrained=False, **kwargs)


def model_class(file: str | Path, class_name: str) -> type[nn.Module]:
    """Import ``file`` (a Python source file) and return its ``nn.Module`` subclass ``class_name``."""
    file = Path(file)
    if file.suffix != ".py":
        found = compiled_format(file)
        what = found or f"a {file.suffix or 'suffix-less'} file"
        raise ValueError(f"--model-file {file}: {what}, not Python source defining the model class; {EAGER_HINT}")
    if not file.is_file():
        raise ValueError(f"--model-file {file}: no such file; pass the .py file that defines your nn.Module")
    spec = importlib.util.spec_from_file_location(f"explainserve_user_model_{file.stem}", file)
    module = importlib.util.module_from_spec(spec)
    folder = str(file.resolve().parent)
    known = set(sys.modules)
    sys.path.insert(0, folder)  # the modules it imports from beside it (--extra-files), as `python FILE.py` finds them
    try:
        spec.loader.exec_module(module)
    except ModuleNotFoundError as error:
        raise ValueError(f"--model-file {file}: importing it failed (ModuleNotFoundError: {error}); if {error.name!r} "
                         f"is your own code, ship it beside the file with --extra-files ({error.name}.py or its "
                         f"package folder), else install it where the model is served") from error
    except Exception as error:  # the user's code may raise anything
        raise ValueError(f"--model-file {file}: importing it failed ({type(error).__name__}: {error}); "
                         "fix the file so that `python FILE.py` runs") from error
    finally:
        sys.path.remove(folder)
        # Another model file may have a module of the same name beside it: forget this one's.
        for name in set(sys.modules) - known:
            if str(getattr(sys.modules[name], "__file__", None) or "").startswith(folder + os.sep):
                del sys.modules[name]
    found = getattr(module, class_name, None)
    if not (inspect.isclass(found) and issubclass(found, nn.Module)):
        defined = sorted(n for n, v in vars(module).items()
                         if inspect.isclass(v) and issubclass(v, nn.Module) and v.__module__ == module.__name__)
        raise ValueError(f"--model-class {class_name}: {file.name} defines no nn.Module class {class_name!r}; "
                         f"pass one of {defined}")
    return found


def build_model_file(file: str | Path, class_name: str, kwargs: dict) -> nn.Module:
    cls = model_class(file, class_name)
    try:
        return cls(**kwargs)
    except TypeError as error:
        raise ValueError(f"--model-kwargs {kwargs}: {class_name}(**kwargs) failed ({error}); "
                         f"pass the keyword arguments of {class_name}{inspect.signature(cls)}") from error


def build_architecture(architecture: dict, model_dir: str | Path | None = None) -> nn.Module:
    """Instantiate the untrained model an archive's ``architecture`` entry describes.

    Parameters
    ----------
    architecture : dict
        One of the forms of the module docstring.
    model_dir : path, optional
        The unpacked archive folder, where a ``model_file`` source's file lies.

    Raises
    ------
    ValueError
        On an unknown source, architecture, class or factory, naming the entry and the fix.
    """
    model = _build_source(architecture, model_dir)
    return served_as_two_classes(model) if architecture.get("one_logit") else model


def _build_source(architecture: dict, model_dir: str | Path | None) -> nn.Module:
    kwargs = dict(architecture.get("kwargs", {}))
    source = architecture.get("source")
    if source == "torchvision":
        return build_torchvision(architecture["name"], kwargs)
    if source == "timm":
        return build_timm(architecture["name"], kwargs)
    if source == "model_file":
        file = Path(architecture["file"])
        if file.name != architecture["file"] or model_dir is None:
            raise ValueError(f"architecture.file: {architecture['file']!r} must be a file name inside the archive")
        return build_model_file(Path(model_dir) / file, architecture["class"], kwargs)
    if source is not None:
        raise ValueError(f"architecture.source: {source!r} is not one of {SOURCES}")
    module_name, _, function_name = architecture.get("factory", "").rpartition(".")
    if module_name not in ALLOWED_FACTORY_MODULES:
        raise ValueError(f"architecture.factory: {architecture.get('factory')!r} is not in one of {ALLOWED_FACTORY_MODULES}")
    return getattr(importlib.import_module(module_name), function_name)(**kwargs)


def load_weights(model: nn.Module, path: str | Path, description: str) -> nn.Module:
    """Load a local state-dict file into ``model`` strictly; refuse compiled model files.

    Raises
    ------
    ValueError
        When the file is TorchScript/ONNX/torch.export, unreadable, or holds another model's
        weights; the message starts with ``--weights PATH`` and says what to pass instead.
    """
    refuse_compiled(path, "--weights")
    if not Path(path).is_file():
        raise ValueError(f"--weights {path}: no such file; pass a local state_dict file")
    try:
        return load_checked(model, read_state_dict(path), path, description)
    except ValueError as error:
        raise ValueError(f"--weights {error}; pass the state_dict saved from this model "
                         "(torch.save(model.state_dict(), path)) or leave --weights out for random init") from None


def classes_in_weights(architecture: dict, path: str | Path) -> int:
    """The class count of the weights file ``path`` for a torchvision or timm ``architecture``
    entry: the rows of the file's head tensors (:func:`~explainserve.models.state_dicts.read_classifier_state`).

    Raises
    ------
    ValueError
        When the file is unreadable, lacks the head tensors or they disagree; the message starts
        with ``--weights PATH`` and names the fix.
    """
    refuse_compiled(path, "--weights")

    def build(count: int) -> nn.Module:
        return build_architecture({**architecture, "kwargs": {**architecture.get("kwargs", {}), "num_classes": count}})
    try:
        return read_classifier_state(build, path, architecture["name"])[1]
    except (ValueError, FileNotFoundError) as error:
        raise ValueError(f"--weights {error}; pass --num-classes N or --class-names FILE") from None


def check_classifier(model: nn.Module, inputs: torch.Tensor) -> int:
    """Run ``model`` once on ``inputs``; return how many logits it gives per input (1 for a
    sigmoid binary classifier, which :func:`~explainserve.models.one_logit.served_as_two_classes`
    adapts), or raise ValueError if it is no classifier."""
    try:
        with torch.no_grad():
            logits = model.eval()(inputs)
    except RuntimeError as error:
        size = " ".join(str(v) for v in inputs.shape[2:])
        raise input_size_failure(error, tuple(inputs.shape), f"--input-size {size}") from None
    if one_logit_per_sample(logits, len(inputs)):
        return 1
    check_logits(logits, tuple(inputs.shape))
    return int(logits.shape[1])
