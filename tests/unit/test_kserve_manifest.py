"""deploy/kserve/inferenceservice.yaml: a well-formed pod whose gateway speaks gRPC (h2c) on the
port it listens on, with command lines the real CLI accepts."""

from __future__ import annotations

from pathlib import Path

import kubernetes_validate
import yaml

from explainserve.cli import build_parser

MANIFEST = Path(__file__).resolve().parents[2] / "deploy" / "kserve" / "inferenceservice.yaml"
KUBERNETES_VERSION = "1.37.0"


def manifest() -> dict:
    return yaml.safe_load(MANIFEST.read_text())


def test_the_predictor_is_a_valid_pod_spec():
    service = manifest()
    assert (service["apiVersion"], service["kind"]) == ("serving.kserve.io/v1beta1", "InferenceService")
    predictor = service["spec"]["predictor"]
    pod = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "predictor"},
           "spec": {"containers": predictor["containers"], "volumes": predictor["volumes"]}}
    kubernetes_validate.validate(pod, KUBERNETES_VERSION, strict=True)
    volumes = {volume["name"] for volume in predictor["volumes"]}
    for container in predictor["containers"]:
        assert {mount["name"] for mount in container["volumeMounts"]} <= volumes


def test_the_kserve_container_is_the_gateway_serving_grpc_on_its_h2c_port():
    containers = {c["name"]: c for c in manifest()["spec"]["predictor"]["containers"]}
    gateway = containers["kserve-container"]
    ports = {port["name"]: port["containerPort"] for port in gateway["ports"]}
    assert gateway["ports"][0]["name"] == "h2c"  # KServe routes HTTP/2 (gRPC) to a port of this name
    args = build_parser().parse_args(gateway["command"][1:] + gateway["args"])
    assert args.command == "sidecar" and args.listen == f"0.0.0.0:{ports['h2c']}"
    assert args.token_file.startswith(containers["torchserve"]["workingDir"])  # where TorchServe writes its keys
    assert args.auth_keys and args.tls_cert and not args.allow_unauthenticated  # secured, as the chart
    assert args.health_listen == f"0.0.0.0:{ports['health']}"
    assert gateway["readinessProbe"]["grpc"]["port"] == gateway["livenessProbe"]["grpc"]["port"] == ports["health"]
