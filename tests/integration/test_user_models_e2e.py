"""A user's own CNN (TorchServe model file importing a module and a package of its own), the
same CNN taking greyscale input, a timm multi-label classifier (sigmoid scores), and a timm
sigmoid binary classifier (one logit, served as two classes): archived with ``explainserve archive``, served by a real TorchServe behind
the real gateway, explained over gRPC; the maps and the Grad-AMap alpha equal the library's."""

from __future__ import annotations

import textwrap

import numpy as np
import pytest
import torch

from explainserve._generated import handler_pb2
from explainserve.cli import main
from explainserve.client import ExplainClient, build_request
from explainserve.commands.archive import register, user_model
from explainserve.explainer import ExplainOptions
from explainserve.model_sources import model_class
from explainserve.wire import HANDLER_REQUEST_KEY
from support.serving_harness import explainer_for, png, random_image, stack_for_module

pytestmark = [pytest.mark.integration, pytest.mark.timeout(600)]
METHODS = ["swag_i_g", "grad_cam", "jitter_cam"]
SIZE = ("64", "64")
# In-place and functional ReLUs, one after the target layer and one in the head: what the probe
# must get right without captum's module hooks.
USER_MODEL = textwrap.dedent('''
    import torch.nn.functional as F
    from torch import nn

    from user_convs import strided
    from user_heads.sizes import HIDDEN


    class UserCNN(nn.Module):
        def __init__(self, num_classes=3, width=8, in_channels=3):
            super().__init__()
            self.stem = strided(in_channels, width)
            self.block = strided(width, 2 * width)
            self.hidden = nn.Linear(2 * width, HIDDEN)
            self.out = nn.Linear(HIDDEN, num_classes)

        def forward(self, x):
            x = F.relu(self.stem(x), inplace=True)
            x = F.relu(self.block(x), inplace=True)
            return self.out(F.relu(self.hidden(x.mean(dim=(2, 3)))))
''')


# The modules the model file imports (archive --extra-files): a file and a package.
USER_MODULES = {
    "user_convs.py": "from torch import nn\n\n\ndef strided(cin, cout):\n"
                     "    return nn.Conv2d(cin, cout, 3, stride=2, padding=1)\n",
    "user_heads/__init__.py": "",
    "user_heads/sizes.py": "HIDDEN = 16\n",
}


def archive_argv(workdir, source: str) -> list[str]:
    weights = workdir / f"{source}.pt"
    rgb = ["--mean", "0.5", "0.5", "0.5", "--std", "0.25", "0.25", "0.25"]
    if source in ("user", "grey"):
        (workdir / "user_cnn.py").write_text(USER_MODEL)
        for name, text in USER_MODULES.items():
            (workdir / name).parent.mkdir(exist_ok=True)
            (workdir / name).write_text(text)
        torch.manual_seed(5)
        channels = 1 if source == "grey" else 3
        torch.save(model_class(workdir / "user_cnn.py", "UserCNN")(in_channels=channels).state_dict(), weights)
        argv = ["--model-file", str(workdir / "user_cnn.py"), "--model-class", "UserCNN", "--name", f"{source}_cnn",
                "--extra-files", str(workdir / "user_convs.py"), str(workdir / "user_heads")]
        if source == "grey":
            argv += ["--model-kwargs", '{"in_channels": 1}']
            rgb = ["--mean", "0.45", "--std", "0.3"]
    elif source == "binary":  # one logit: two class names, and the weights' one-row head
        timm = pytest.importorskip("timm")
        torch.manual_seed(7)
        torch.save(timm.create_model("resnet10t", pretrained=False, num_classes=1).state_dict(), weights)
        (workdir / "binary.txt").write_text("intact\ncracked\n")
        argv = ["--timm", "resnet10t", "--class-names", str(workdir / "binary.txt"), "--name", "timm_binary"]
    else:
        timm = pytest.importorskip("timm")
        torch.manual_seed(6)
        torch.save(timm.create_model("resnet10t", pretrained=False, num_classes=3).state_dict(), weights)
        # A multi-label classifier: its three scores are sigmoids, served as the library gives them.
        argv = ["--timm", "resnet10t", "--num-classes", "3", "--name", "timm_resnet10t", "--multi-label"]
    return argv + ["--weights", str(weights), "--input-size", *SIZE, *rgb]


@pytest.fixture(scope="module")
def served(request, tmp_path_factory):
    """Both archives built by the CLI, and the library's own model and metadata for each."""
    import argparse

    workdir = tmp_path_factory.mktemp("user_models")
    parser = argparse.ArgumentParser()
    register(parser.add_subparsers(dest="command"))
    references = {}
    for source in ("user", "grey", "timm", "binary"):
        argv = archive_argv(workdir, source)
        assert main(["archive", *argv, "--export-path", str(workdir / "model_store")]) == 0
        model, metadata = user_model(parser.parse_args(["archive", *argv]))
        references[metadata["name"]] = (model, metadata)
    assert references["user_cnn"][1]["layer"] == references["grey_cnn"][1]["layer"] == "block"
    assert (references["grey_cnn"][1]["mean"], references["grey_cnn"][1]["std"]) == ([0.45], [0.3])
    assert references["timm_binary"][1]["architecture"]["one_logit"] is True
    assert references["timm_resnet10t"][1]["multi_label"] is True and "multi_label" not in references["user_cnn"][1]
    for stack in stack_for_module(request, workdir, [], prebuilt=tuple(references)):
        yield stack, references, workdir


@pytest.mark.parametrize("name", ["user_cnn", "grey_cnn", "timm_resnet10t", "timm_binary"])
def test_served_maps_and_alpha_equal_the_library(served, name):
    stack, references, _ = served
    model, metadata = references[name]
    library = explainer_for(model, metadata)
    assert library.channels == (1 if name == "grey_cnn" else 3)
    image = random_image(11)
    top_k = min(3, len(metadata["class_names"]))
    expected = library.explain([image], METHODS, ExplainOptions(top_k=top_k))[0]
    with ExplainClient(stack.target) as client:
        result = client.explain(png(image), model=name, methods=METHODS, top_k=top_k, timeout=240)
    assert result.predicted_class == expected.predicted
    np.testing.assert_allclose([score for _, _, score in result.classes], expected.scores, rtol=1e-4)
    with torch.no_grad():
        logits = model.eval()(library.prepare([image]).inputs)[0]
    scored = logits.sigmoid() if name == "timm_resnet10t" else logits.softmax(0)  # the multi-label archive
    np.testing.assert_allclose([score for _, _, score in result.classes],
                               scored[[index for index, _, _ in result.classes]].numpy(), rtol=1e-4)
    for method in METHODS:
        served_map, reference = result.maps[method], expected.maps[method]
        tolerance = served_map.quantisation_step / 2 + 1e-4 * float(np.ptp(reference.heatmap)) + 1e-7
        assert np.abs(served_map.heatmap - reference.heatmap).max() <= tolerance, method
        assert np.ptp(reference.heatmap) > 0, method

    import grpc
    from explainserve._generated import inference_pb2, inference_pb2_grpc

    request = build_request(png(image), model=name, methods=["grad_cam"], top_k=top_k)
    with grpc.insecure_channel(stack.torchserve.grpc_target) as channel:
        answer = inference_pb2_grpc.InferenceAPIsServiceStub(channel).Predictions(
            inference_pb2.PredictionsRequest(model_name=name, input={HANDLER_REQUEST_KEY: request.SerializeToString()}),
            timeout=240).prediction
    alpha = np.array(handler_pb2.HandlerResponse.FromString(answer).alpha)
    assert alpha.shape == expected.alpha.shape and np.abs(expected.alpha).max() > 0
    np.testing.assert_allclose(alpha, expected.alpha, rtol=1e-4, atol=1e-6 * np.abs(expected.alpha).max())


@pytest.mark.parametrize("name", ["user_cnn", "grey_cnn", "timm_binary"])
def test_a_model_file_archive_is_rebuilt_from_the_mar_for_store_builds(served, name):
    # build-distributions --model X.mar: the user's .py files ship inside the archive and are read from it,
    # and a one-logit model is served as two classes again.
    from explainserve.commands.distributions import load_model

    _, references, workdir = served
    model, metadata = references[name]
    rebuilt, rebuilt_metadata = load_model(str(workdir / "model_store" / f"{name}.mar"))
    assert rebuilt_metadata["mean"] == metadata["mean"]
    inputs = torch.randn(2, len(metadata["mean"]), *map(int, SIZE))
    torch.testing.assert_close(rebuilt(inputs), model.eval()(inputs), rtol=0, atol=0)
