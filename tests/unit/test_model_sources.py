"""Model sources of ``explainserve archive`` and the loader: torchvision, timm, a model file.

Each source is archived the way the CLI does it (metadata, then the loader rebuilds the model
from it and the weights file) and must give the same logits. Bad input gets one line naming the
argument and the fix.
"""

from __future__ import annotations

import json
import re
import textwrap

import pytest
import torch
import torchvision
from torch import nn

from explainserve.cli import build_parser, main
from explainserve.commands.archive import user_model
from explainserve.model_archive import build_model
from explainserve.model_sources import model_class

MODEL_FILE = textwrap.dedent('''
    import torch
    from torch import nn


    class TinyNet(nn.Module):
        """Two conv blocks, global average pool, linear head."""

        def __init__(self, num_classes=3, width=8, in_channels=3):
            super().__init__()
            self.body = nn.Sequential(nn.Conv2d(in_channels, width, 3, padding=1), nn.ReLU(),
                                      nn.Conv2d(width, width, 3, stride=2, padding=1), nn.ReLU())
            self.head = nn.Linear(width, num_classes)

        def forward(self, x):
            return self.head(self.body(x).mean(dim=(2, 3)))


    class TokenNet(nn.Module):
        """Patch embedding, then a transformer layer on tokens: not a CNN."""

        def __init__(self):
            super().__init__()
            self.embed = nn.Conv2d(3, 16, 8, stride=8)
            self.encoder = nn.TransformerEncoderLayer(16, 2, 32, batch_first=True)
            self.head = nn.Linear(16, 3)

        def forward(self, x):
            return self.head(self.encoder(self.embed(x).flatten(2).transpose(1, 2)).mean(dim=1))


    class Flat(nn.Module):
        """A multilayer perceptron: no spatial map at all."""

        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(3 * 32 * 32, 3)

        def forward(self, x):
            return self.fc(x.flatten(1))
''')


def archive_args(*argv: str):
    return build_parser(("explainserve.commands.archive",)).parse_args(["archive", *argv])


@pytest.fixture
def model_file(tmp_path):
    path = tmp_path / "model.py"
    path.write_text(MODEL_FILE)
    return path


def rebuilt_logits(model: nn.Module, metadata: dict, model_dir=None) -> tuple[torch.Tensor, torch.Tensor]:
    rebuilt = build_model(json.loads(json.dumps(metadata)), model_dir)
    rebuilt.load_state_dict(model.state_dict())
    x = torch.randn(1, 3, *metadata["input_size"])
    with torch.no_grad():
        return model.eval()(x), rebuilt.eval()(x)


@pytest.mark.parametrize("source,name,size,layer", [
    ("--torchvision", "resnet18", ["64", "64"], "layer4"),
    ("--torchvision", "r3d_18", ["4", "32", "32"], "layer4"),
    ("--timm", "resnet10t", ["64", "64"], "layer4"),
])
def test_library_sources_round_trip_with_weights(tmp_path, source, name, size, layer):
    builder = (lambda: torchvision.models.get_model(name, num_classes=3)) if source == "--torchvision" else \
        (lambda: pytest.importorskip("timm").create_model(name, pretrained=False, num_classes=3))
    weights = tmp_path / "weights.pt"
    torch.save(builder().state_dict(), weights)
    model, metadata = user_model(archive_args(source, name, "--weights", str(weights), "--num-classes", "3",
                                              "--input-size", *size))
    assert metadata["architecture"] == {"source": source[2:], "name": name, "kwargs": {"num_classes": 3}}
    assert metadata["layer"] == layer and metadata["kind"] == ("video" if len(size) == 3 else "image")
    assert torch.equal(model.state_dict()["fc.weight"], torch.load(weights)["fc.weight"])
    ours, rebuilt = rebuilt_logits(model, metadata)
    assert torch.equal(ours, rebuilt)


@pytest.mark.parametrize("source,name,head", [
    ("--torchvision", "resnet18", "fc.weight"),
    ("--torchvision", "mobilenet_v3_small", "classifier.3.weight"),
    ("--torchvision", "googlenet", "aux1.fc2.weight"),  # an auxiliary head has the classes' rows too
    ("--timm", "convnext_atto", "head.fc.weight"),
])
def test_without_class_names_the_class_count_is_read_from_the_weights(tmp_path, capsys, source, name, head):
    kwargs = {"aux_logits": True, "init_weights": False} if name == "googlenet" else {}
    trained = (torchvision.models.get_model(name, num_classes=6, **kwargs) if source == "--torchvision"
               else pytest.importorskip("timm").create_model(name, pretrained=False, num_classes=6))
    weights = tmp_path / "weights.pt"
    torch.save(torch.compile(trained).state_dict(), weights)  # a wrapper's prefix, as a user's file may have
    model, metadata = user_model(archive_args(source, name, "--weights", str(weights), "--input-size", "64", "64"))
    assert metadata["class_names"] == [f"class_{i}" for i in range(6)]
    assert metadata["architecture"]["kwargs"] == {"num_classes": 6}
    assert torch.equal(model.state_dict()[head], trained.state_dict()[head])
    assert f"6 classes, read from the head of --weights {weights}" in capsys.readouterr().err


def test_a_class_count_the_weights_do_not_give_is_refused_naming_the_head(tmp_path, capsys):
    state = torchvision.models.resnet18(num_classes=6).state_dict()
    state["fc.bias"] = torch.zeros(4)  # a head whose weight and bias disagree
    weights = tmp_path / "odd.pt"
    torch.save(state, weights)
    message = one_line_error(capsys, "--torchvision", "resnet18", "--weights", str(weights), "--input-size", "32", "32")
    assert re.search(r"--weights .*odd\.pt: cannot read a class count from the resnet18 head tensors "
                     r"\['fc\.weight', 'fc\.bias'\] \(found rows \[4, 6\]\); pass --num-classes N", message), message


@pytest.mark.parametrize("source,name", [("--torchvision", "resnet18"), ("--timm", "resnet10t")])
def test_a_sigmoid_classifiers_one_logit_is_served_as_two_classes(tmp_path, capsys, source, name):
    trained = (torchvision.models.get_model(name, num_classes=1) if source == "--torchvision"
               else pytest.importorskip("timm").create_model(name, pretrained=False, num_classes=1)).eval()
    weights, names = tmp_path / "weights.pt", tmp_path / "names.txt"
    torch.save(trained.state_dict(), weights)
    names.write_text("healthy\nfaulty\n")
    size = ("--input-size", "64", "64")
    x = torch.randn(3, 3, 64, 64)
    with torch.no_grad():
        z = trained(x)
    # Read from the weights' one-row head, named by two class names, or asked for by --num-classes 1.
    for naming, class_names in ((), ["class_0", "class_1"]), (("--class-names", str(names)), ["healthy", "faulty"]), \
            (("--num-classes", "1"), ["class_0", "class_1"]):
        model, metadata = user_model(archive_args(source, name, "--weights", str(weights), *naming, *size))
        assert metadata["class_names"] == class_names
        assert metadata["architecture"] == {"source": source[2:], "name": name, "kwargs": {"num_classes": 1},
                                            "one_logit": True}
        assert "served as two classes with logits (-z/2, z/2)" in capsys.readouterr().err
        rebuilt = build_model(json.loads(json.dumps(metadata)))  # as the handler and the store build do
        rebuilt.load_state_dict(torch.load(weights))
        with torch.no_grad():
            for served in (model.eval()(x), rebuilt.eval()(x)):
                torch.testing.assert_close(served, torch.cat([-z / 2, z / 2], dim=1), rtol=0, atol=0)
    # Two class names for a two-row head stay an ordinary two-class model.
    torch.save(torchvision.models.resnet18(num_classes=2).state_dict(), weights)
    _, metadata = user_model(archive_args("--torchvision", "resnet18", "--weights", str(weights), "--class-names",
                                          str(names), *size))
    assert metadata["architecture"] == {"source": "torchvision", "name": "resnet18", "kwargs": {"num_classes": 2}}


def test_multi_label_is_recorded_in_the_metadata_and_refused_where_it_cannot_hold(tmp_path, capsys):
    weights = tmp_path / "weights.pt"
    torch.save(torchvision.models.resnet18(num_classes=4).state_dict(), weights)
    size = ("--input-size", "32", "32")
    _, metadata = user_model(archive_args("--torchvision", "resnet18", "--weights", str(weights), "--multi-label", *size))
    assert metadata["multi_label"] is True and len(metadata["class_names"]) == 4
    _, metadata = user_model(archive_args("--torchvision", "resnet18", "--weights", str(weights), *size))
    assert "multi_label" not in metadata  # a single-label classifier, as every archive made before the flag
    capsys.readouterr()
    torch.save(torchvision.models.resnet18(num_classes=1).state_dict(), weights)
    names = tmp_path / "names.txt"
    names.write_text("healthy\nfaulty\n")
    message = one_line_error(capsys, "--torchvision", "resnet18", "--weights", str(weights), "--class-names",
                             str(names), "--multi-label", *size)
    assert "--multi-label: the model returns one logit, a binary classifier; leave --multi-label out" in message
    message = one_line_error(capsys, "--demo", "image", "--multi-label", "--export-path", str(tmp_path))
    assert "--multi-label: not with --demo" in message


def test_model_file_round_trip_from_the_archive_folder(tmp_path, model_file, capsys):
    weights = tmp_path / "weights.pt"
    torch.save(model_class(model_file, "TinyNet")(num_classes=4, width=6).state_dict(), weights)
    model, metadata = user_model(archive_args(
        "--model-file", str(model_file), "--model-class", "TinyNet", "--model-kwargs", '{"num_classes": 4, "width": 6}',
        "--weights", str(weights), "--input-size", "32", "32"))
    assert metadata["architecture"] == {"source": "model_file", "file": "model.py", "class": "TinyNet",
                                        "kwargs": {"num_classes": 4, "width": 6}}
    assert metadata["class_names"] == [f"class_{i}" for i in range(4)]  # from the model's outputs
    assert metadata["layer"] == "body"
    assert "WARNING" not in capsys.readouterr().err  # weights given
    served = tmp_path / "served"
    served.mkdir()
    (served / "model.py").write_text(model_file.read_text())
    ours, rebuilt = rebuilt_logits(model, metadata, served)
    assert torch.equal(ours, rebuilt)


# A model file split over a module and a package, imported as `python multi_net.py` finds them.
MULTI_FILES = {
    "multi_net.py": textwrap.dedent('''
        from torch import nn

        from net_blocks import conv_block
        from net_heads import Head


        class MultiNet(nn.Module):
            def __init__(self, num_classes=3):
                super().__init__()
                self.body = conv_block(3, 6)
                self.head = Head(6, num_classes)

            def forward(self, x):
                return self.head(self.body(x))
    '''),
    "net_blocks.py": "from torch import nn\n\n\ndef conv_block(cin, cout):\n"
                     "    return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1), nn.ReLU())\n",
    "net_heads/__init__.py": "from .pooled import Head\n",
    "net_heads/pooled.py": "from torch import nn\n\n\nclass Head(nn.Module):\n"
                           "    def __init__(self, width, num_classes):\n        super().__init__()\n"
                           "        self.fc = nn.Linear(width, num_classes)\n\n"
                           "    def forward(self, x):\n        return self.fc(x.mean(dim=(2, 3)))\n",
}


def write_multi_net(folder) -> list[str]:
    for name, text in MULTI_FILES.items():
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_text(text)
    return ["--model-file", str(folder / "multi_net.py"), "--model-class", "MultiNet", "--input-size", "16", "16"]


def test_a_model_file_with_its_modules_is_archived_and_rebuilt_from_the_mar_alone(tmp_path, capsys):
    import zipfile

    from explainserve.model_archive import load_archive

    source = tmp_path / "source"
    argv = write_multi_net(source)
    # Without its modules the file does not import, as it would not in TorchServe: said at archive time.
    message = one_line_error(capsys, *argv, "--export-path", str(tmp_path / "store"))
    assert (f"--model-file {source / 'multi_net.py'}: importing it failed (ModuleNotFoundError: No module named "
            f"'net_blocks'); if 'net_blocks' is your own code, ship it beside the file with --extra-files "
            f"(net_blocks.py or its package folder), else install it where the model is served") in message
    assert main(["archive", *argv, "--extra-files", str(source / "net_blocks.py"), str(source / "net_heads"),
                 "--export-path", str(tmp_path / "store")]) == 0
    mar = tmp_path / "store" / "multinet.mar"
    with zipfile.ZipFile(mar) as archive:
        assert {"multi_net.py", "net_blocks.py", "net_heads/__init__.py", "net_heads/pooled.py"} <= set(archive.namelist())
        metadata = json.loads(archive.read("metadata.json"))
    assert metadata["architecture"]["extra_files"] == ["net_blocks.py", "net_heads"]
    model, _ = user_model(archive_args(*argv, "--extra-files", str(source / "net_blocks.py"), str(source / "net_heads")))
    for path in sorted(source.rglob("*"), reverse=True):  # the rebuild may only read the archive
        path.unlink() if path.is_file() else path.rmdir()
    rebuilt, _ = load_archive(mar)
    x = torch.randn(2, 3, 16, 16)
    rebuilt.load_state_dict(model.state_dict())
    with torch.no_grad():
        assert torch.equal(rebuilt(x), model.eval()(x))
    assert type(rebuilt.head).__module__ == "net_heads.pooled"


def test_extra_files_that_cannot_ship_get_one_line(tmp_path, capsys):
    argv = write_multi_net(tmp_path)
    (tmp_path / "notes.txt").write_text("x")
    (tmp_path / "distribution_store").mkdir()
    cases = [
        (("--torchvision", "resnet18", "--num-classes", "3", "--extra-files", str(tmp_path / "net_blocks.py")),
         r"--extra-files: only with --model-file FILE\.py"),
        ((*argv, "--extra-files", str(tmp_path / "missing.py")), r"--extra-files .*missing\.py: not a \.py file or a package"),
        ((*argv, "--extra-files", str(tmp_path / "notes.txt")), r"--extra-files .*notes\.txt: not a \.py file or a package"),
        ((*argv, "--extra-files", str(tmp_path / "multi_net.py")),
         r"--extra-files .*multi_net\.py: the name 'multi_net\.py' is taken \(by another file\); rename it"),
        ((*argv, "--extra-files", str(tmp_path / "distribution_store")),
         r"--extra-files .*distribution_store: the name 'distribution_store' is taken \(by the archive itself\)"),
    ]
    for arguments, pattern in cases:
        message = one_line_error(capsys, *arguments, "--export-path", str(tmp_path / "store"))
        assert re.search(pattern, message), (arguments, message)


def test_an_archive_without_weights_warns_that_its_answers_mean_nothing(model_file, capsys):
    model, _ = user_model(archive_args("--model-file", str(model_file), "--model-class", "TinyNet", "--input-size",
                                       "32", "32"))
    assert model is not None
    assert ("WARNING: no --weights: tinynet keeps its random initial weights; its predictions, maps and verdicts "
            "carry no meaning") in capsys.readouterr().err


def one_line_error(capsys, *argv: str) -> str:
    assert main(["archive", *argv]) == 2
    message = capsys.readouterr().err.strip()
    assert "\n" not in message, message
    return message


def test_bad_sources_get_one_line_naming_the_argument_and_the_fix(tmp_path, model_file, capsys):
    other = tmp_path / "other.pt"
    torch.save(torchvision.models.resnet18(num_classes=3).state_dict(), other)
    small = ("--input-size", "32", "32")
    repeated_names = tmp_path / "names.txt"
    repeated_names.write_text("cat\ndog\n cat \n")
    (tmp_path / "three.txt").write_text("cat\ndog\nbird\n")
    cases = [
        (("--torchvision", "resnet19", "--num-classes", "3"), r"--torchvision resnet19: not a torchvision .* pass one of"),
        (("--timm", "no_such_net", "--num-classes", "3"), r"--timm no_such_net: not a timm model name; pass one of"),
        (("--torchvision", "vgg11", "--num-classes", "3", "--weights", str(other), *small),
         r"--weights .*other\.pt: does not hold weights of vgg11 .* pass the state_dict saved from this model"),
        (("--model-file", str(model_file), "--model-class", "Missing", *small),
         r"--model-class Missing: model\.py defines no nn\.Module class 'Missing'; pass one of \['Flat', 'TinyNet', 'TokenNet'\]"),
        (("--model-file", str(model_file), "--model-class", "TokenNet", *small),
         r"--model-file: layer: the head does not pool .* is not a CNN.* pass --layer NAME"),
        (("--model-file", str(model_file), "--model-class", "Flat", *small),
         r"--model-file: layer: no module outputs a spatial feature map .* pass --layer NAME"),
        (("--model-file", str(model_file), "--model-class", "Flat"),  # its Linear takes 32 x 32 inputs, not 224 x 224
         r"error: --input-size 224 224: the model cannot run on an input of shape \(1, 3, 224, 224\) \(RuntimeError: mat1 "
         r"and mat2 shapes cannot be multiplied .*\); pass the input size it was trained at$"),
        (("--model-file", str(model_file), "--model-class", "TinyNet", "--model-kwargs", '{"depth": 2}', *small),
         r"--model-kwargs .*TinyNet\(\*\*kwargs\) failed .* pass the keyword arguments of TinyNet\(num_classes=3, width=8, in_channels=3\)"),
        (("--model-file", str(model_file), "--model-class", "TinyNet", "--num-classes", "5", *small),
         r"--class-names: 5 names, but the model returns 3 logits"),
        (("--torchvision", "resnet18", *small), r"--class-names or --num-classes is needed"),
        (("--model-file", str(model_file), "--model-class", "TinyNet", "--model-kwargs", '{"num_classes": 1}',
          "--class-names", str(repeated_names.with_name("three.txt")), *small),
         r"--class-names: 3 names, but the model returns one logit \(a sigmoid binary classifier\), served as two "
         r"classes: name both$"),
        (("--model-file", str(model_file), "--model-class", "TinyNet", "--model-kwargs", '{"in_channels": 1}', *small),
         r"--mean, --std: the model's first convolution takes 1 channel \(greyscale\), which has no default "
         r"normalisation; pass --mean M --std S, those it was trained with$"),
        (("--model-file", str(model_file), "--model-class", "TinyNet", "--model-kwargs", '{"in_channels": 1}',
          "--mean", "0.5", "0.5", "0.5", "--std", "0.2", "0.2", "0.2", *small),
         r"--mean, --std: the model's first convolution takes 1 channel\(s\) \(greyscale\) but 3 value\(s\) each"),
        (("--model-file", str(model_file), "--model-class", "TinyNet", "--mean", "0.5", "--std", "0.2", *small),
         r"--mean, --std: the model's first convolution takes 3 channel\(s\) \(RGB\) but 1 value\(s\) each"),
        (("--model-file", str(model_file), "--model-class", "TinyNet", "--std", "0", "1", "1", *small),
         r"--mean, --std: expected finite values and positive stds, got \[0\.485, 0\.456, 0\.406\] and"),
        (("--torchvision", "resnet18", "--class-names", str(repeated_names), *small),
         r"--class-names .*names\.txt: class names must be unique, repeated: \['cat'\]"),
    ]
    for argv, pattern in cases:
        message = one_line_error(capsys, *argv)
        assert re.search(pattern, message), (argv, message)


def test_compiled_models_are_refused_saying_why_and_what_to_pass(tmp_path, model_file, capsys):
    net = model_class(model_file, "TinyNet")().eval()
    scripted = tmp_path / "scripted.pt"
    torch.jit.save(torch.jit.script(net), scripted)
    exported = tmp_path / "exported.pt2"
    torch.export.save(torch.export.export(net, (torch.randn(1, 3, 16, 16),)), exported)
    renamed = tmp_path / "exported.pt"
    renamed.write_bytes(exported.read_bytes())
    onnx = tmp_path / "model.onnx"
    onnx.write_bytes(b"\x08\x07")
    base = ("--model-file", str(model_file), "--model-class", "TinyNet", "--input-size", "16", "16")
    cases = [
        ((*base, "--weights", str(scripted)), "--weights .*scripted.pt: a TorchScript module"),
        ((*base, "--weights", str(exported)), "--weights .*exported.pt2: a torch.export program"),
        ((*base, "--weights", str(renamed)), "--weights .*exported.pt: a torch.export program"),
        (("--model-file", str(onnx), "--model-class", "TinyNet"), "--model-file .*model.onnx: an ONNX model"),
    ]
    for argv, pattern in cases:
        message = one_line_error(capsys, *argv)
        assert re.search(pattern, message), (argv, message)
        assert "explanations need the eager nn.Module" in message and "--model-file FILE.py --model-class NAME" in message
