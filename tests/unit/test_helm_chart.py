"""The Helm chart, rendered offline with helm-python-sdk (Helm v4's Go SDK) for the
default values and the value sets platform teams use, linted, validated against the
Kubernetes schemas, and checked for the properties that matter in production."""
import importlib.util
import json
import re
from pathlib import Path

import helm_python
import kubernetes_validate
import pytest
import yaml

from explainserve.sidecar.torchserve import JVM_ARGS, TorchServeConfig

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "helm" / "explainserve"
KUBERNETES_VERSION = "1.37.0"
RELEASE, NAMESPACE = "demo", "ml"
FULLNAME = f"{RELEASE}-explainserve"

VALUE_SETS = {
    "default": {},
    "gpu": {"torchserve": {"gpu": {"enabled": True, "count": 2}}},
    "native-sidecar": {"sidecar": {"native": True}},
    "hpa-off": {"autoscaling": {"enabled": False}, "replicaCount": 3},
    "network-policy": {"networkPolicy": {"enabled": True}, "torchserve": {"directAccess": True}},
    "hpa-inflight": {"autoscaling": {"metric": "inflight", "targetInflightPerPod": 2}},
    "init-containers": {"models": {"source": "initContainer", "initContainer": {"image": "registry/models:1"}},
                        "stores": {"source": "initContainer", "initContainer": {"image": "registry/stores:1"}},
                        "sidecar": {"native": True}},
    "distributions": {"distributions": {"build": {"enabled": True, "dataClaim": "training-images",
                                                  "numShards": 3, "parallelism": 2, "name": "demo_image"}}},
    "insecure": {"torchserve": {"tokenAuthorization": False}, "insecure": True},
    "cert-manager-mtls": {"sidecar": {"tls": {"certManager": {"enabled": True, "issuerRef": {"name": "internal-ca"}},
                                              "clientCA": {"enabled": True}}}},
    "no-tls-no-keys": {"insecure": True, "sidecar": {"tls": {"enabled": False}, "auth": {"enabled": False},
                                                     "reflection": True}},
    "your-data": {"distributions": {"build": {"enabled": True, "dataClaim": "photos", "data": "imagefolder:catalogue/v2",
                                              "valFraction": 0.1, "maxBadFraction": 0.02, "numShards": 2,
                                              "limit": 50000, "valLimit": 5000,
                                              "model": "/models/resnet50.mar", "name": "resnet50"}}},
}
CRD_GROUPS = ("monitoring.coreos.com/", "cert-manager.io/")


@pytest.fixture(scope="module")
def chart():
    with helm_python.Chart.load(str(CHART)) as loaded:
        yield loaded


def render(chart, values):
    """(objects, notes): the rendered manifests as dicts, and NOTES.txt."""
    rendered = chart.render(values, name=RELEASE, namespace=NAMESPACE)
    notes = next(text for path, text in rendered.items() if path.endswith("NOTES.txt"))
    objects = [doc for path, text in rendered.items() if not path.endswith("NOTES.txt")
               for doc in yaml.safe_load_all(text) if doc]
    return objects, notes


def find(objects, kind, name=None):
    found = [o for o in objects if o["kind"] == kind and (name is None or o["metadata"]["name"] == name)]
    return found


def one(objects, kind, name=None):
    found = find(objects, kind, name)
    assert len(found) == 1, (kind, name, [o["metadata"]["name"] for o in found])
    return found[0]


def pod_specs(objects):
    return [o["spec"]["template"]["spec"] for o in objects if o["kind"] in ("Deployment", "Job")]


def containers(pod):
    return pod["containers"] + pod.get("initContainers", [])


def container(pod, name):
    return next(c for c in containers(pod) if c["name"] == name)


def probe_port(probe):
    """The port a probe reaches; exec probes name it in their --url."""
    for kind in ("grpc", "httpGet", "tcpSocket"):
        if kind in probe:
            return probe[kind]["port"]
    url = probe["exec"]["command"][probe["exec"]["command"].index("--url") + 1]
    return int(re.match(r"https?://[^:/]+:(\d+)/", url).group(1))


@pytest.fixture(scope="module", params=sorted(VALUE_SETS))
def rendered(request, chart):
    return request.param, render(chart, VALUE_SETS[request.param])


def test_lint_reports_no_errors():
    for values in VALUE_SETS.values():
        report = helm_python.lint(str(CHART), values, strict=True, kube_version="v" + KUBERNETES_VERSION)
        assert report["errors"] == []
        assert [m for m in report["messages"] if m["severity"] >= 2] == []


def test_core_objects_pass_kubernetes_validate(rendered):
    _, (objects, _) = rendered
    core = [o for o in objects if not o["apiVersion"].startswith(CRD_GROUPS)]
    assert len(core) >= 5
    for obj in core:
        kubernetes_validate.validate(obj, KUBERNETES_VERSION, strict=True)


def test_custom_resources_are_well_formed(rendered):
    _, (objects, _) = rendered
    service = one(objects, "Service")
    service_ports = {p["name"] for p in service["spec"]["ports"]}
    for monitor in find(objects, "ServiceMonitor"):
        assert monitor["apiVersion"] == "monitoring.coreos.com/v1"
        assert monitor["spec"]["selector"]["matchLabels"].items() <= service["metadata"]["labels"].items()
        jobs = {}
        for endpoint in monitor["spec"]["endpoints"]:
            assert endpoint["port"] in service_ports
            assert re.fullmatch(r"\d+[smh]", endpoint["interval"])
            (relabel,) = endpoint["relabelings"]
            jobs[endpoint["port"]] = relabel["replacement"]
            assert relabel["targetLabel"] == "job"
        # rules.yml selects on these job names
        assert jobs == {"metrics": "explainserve-sidecar", "ts-metrics": "explainserve-torchserve"}
    for rule in find(objects, "PrometheusRule"):
        assert rule["apiVersion"] == "monitoring.coreos.com/v1"
        for group in rule["spec"]["groups"]:
            assert group["name"] and group["rules"]
            for item in group["rules"]:
                assert ("alert" in item) != ("record" in item) and item["expr"]


def test_probes_point_at_ports_that_exist(rendered):
    name, (objects, _) = rendered
    deployment = one(objects, "Deployment")
    pod = deployment["spec"]["template"]["spec"]
    for c in (container(pod, "torchserve"), container(pod, "sidecar")):
        ports = {p["containerPort"] for p in c["ports"]}
        probes = [c[k] for k in ("startupProbe", "livenessProbe", "readinessProbe") if k in c]
        assert len(probes) >= 2, c["name"]
        for probe in probes:
            port = probe_port(probe)
            assert isinstance(port, int), "probes use numeric ports"
            assert port in ports, (name, c["name"], port, ports)
    torchserve = container(pod, "torchserve")
    assert {"startupProbe", "livenessProbe", "readinessProbe"} <= torchserve.keys()
    assert probe_port(torchserve["readinessProbe"]) == 8080
    sidecar = container(pod, "sidecar")
    # the plaintext health port: the kubelet's gRPC probes cannot speak TLS
    assert sidecar["readinessProbe"]["grpc"] == {"port": 50052, "service": "explainserve.v1.Explainer"}
    # liveness asks a gRPC service that answers while the event loop does, with a timeout (a TCP
    # probe would pass with the loop stuck)
    assert sidecar["livenessProbe"]["grpc"] == {"port": 50052, "service": "liveness"}
    assert sidecar["livenessProbe"]["timeoutSeconds"] == 5
    assert "--health-listen=0.0.0.0:50052" in sidecar["args"]


def test_torchserve_probe_asks_ping_with_the_key_or_plain_http(chart):
    secure, _ = render(chart, {})
    probe = container(one(secure, "Deployment")["spec"]["template"]["spec"], "torchserve")["livenessProbe"]
    command = probe["exec"]["command"]
    assert command[:2] == ["python", "/opt/explainserve/deploy/torchserve_ping.py"]
    assert command[command.index("--url") + 1] == "http://127.0.0.1:8080/ping"
    assert command[command.index("--key-file") + 1] == "/run/torchserve/key_file.json"
    insecure, _ = render(chart, VALUE_SETS["insecure"])
    probe = container(one(insecure, "Deployment")["spec"]["template"]["spec"], "torchserve")["livenessProbe"]
    # TorchServe listens on 127.0.0.1 only: the probe runs inside the container, without a key
    assert probe["exec"]["command"][-2:] == ["--url", "http://127.0.0.1:8080/ping"]


def test_pods_are_locked_down(rendered):
    _, (objects, _) = rendered
    for pod in pod_specs(objects):
        assert pod["automountServiceAccountToken"] is False
        assert pod["securityContext"]["runAsNonRoot"] is True
        assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
        tmp_volumes = {v["name"] for v in pod["volumes"] if "emptyDir" in v}
        for c in containers(pod):
            context = c["securityContext"]
            assert context["readOnlyRootFilesystem"] is True
            assert context["allowPrivilegeEscalation"] is False
            assert context["capabilities"]["drop"] == ["ALL"]
            assert context["seccompProfile"] == {"type": "RuntimeDefault"}
            if not c["name"].startswith("copy-"):
                tmp = [m for m in c["volumeMounts"] if m["mountPath"] == "/tmp"]
                assert tmp and tmp[0]["name"] in tmp_volumes, c["name"]
            assert "resources" in c or c["name"].startswith("copy-")


def test_one_pod_runs_torchserve_and_the_sidecar_with_the_documented_commands(chart):
    objects, _ = render(chart, {})
    pod = one(objects, "Deployment")["spec"]["template"]["spec"]
    assert [c["name"] for c in pod["containers"]] == ["torchserve", "sidecar"]
    torchserve, sidecar = pod["containers"]
    assert torchserve["image"] == sidecar["image"] == "ghcr.io/explainserve/explainserve:0.1.0"
    # tini as PID 1 forwards SIGTERM to TorchServe's process group, so the pod stops in seconds
    assert torchserve["command"] + torchserve["args"][:9] == [
        "tini", "-g", "--", "torchserve", "--foreground", "--ts-config", "/config/config.properties",
        "--log-config", "/config/log4j2.xml", "--model-store", "/models", "--models", "all"]
    assert sidecar["command"] == ["explainserve", "sidecar"]
    assert sidecar["args"][:7] == ["--listen=0.0.0.0:50051", "--metrics-port=9095", "--metrics-address=0.0.0.0",
                                   "--torchserve=127.0.0.1:7070", "--torchserve-management=127.0.0.1:7071",
                                   "--store-dir=/stores", "--token-file=/run/torchserve/key_file.json"]
    # TorchServe writes its keys where the sidecar reads them: one shared in-memory volume.
    keys = next(v for v in pod["volumes"] if v["name"] == "torchserve-keys")
    assert keys["emptyDir"]["medium"] == "Memory"
    assert torchserve["workingDir"] == "/run/torchserve"
    mount = next(m for m in sidecar["volumeMounts"] if m["name"] == "torchserve-keys")
    assert mount == {"name": "torchserve-keys", "mountPath": "/run/torchserve", "readOnly": True}


def test_native_sidecar_is_a_restartable_init_container(chart):
    objects, _ = render(chart, VALUE_SETS["native-sidecar"])
    pod = one(objects, "Deployment")["spec"]["template"]["spec"]
    assert [c["name"] for c in pod["containers"]] == ["torchserve"]
    (sidecar,) = pod["initContainers"]
    assert sidecar["name"] == "sidecar" and sidecar["restartPolicy"] == "Always"
    # A startup probe on a native sidecar would hold TorchServe back, while the sidecar's
    # health waits for TorchServe: there must be none.
    assert "startupProbe" not in sidecar


def test_copy_init_containers_run_before_the_native_sidecar(chart):
    objects, _ = render(chart, VALUE_SETS["init-containers"])
    pod = one(objects, "Deployment")["spec"]["template"]["spec"]
    assert [c["name"] for c in pod["initContainers"]] == ["copy-models", "copy-stores", "sidecar"]
    copy = pod["initContainers"][0]
    assert copy["image"] == "registry/models:1"
    assert {"name": "models", "mountPath": "/models"} in copy["volumeMounts"]
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert volumes["models"] == {"name": "models", "emptyDir": {}}
    assert not find(objects, "PersistentVolumeClaim")


def test_models_and_stores_come_from_claims_by_default(chart):
    objects, _ = render(chart, {"models": {"source": "pvc", "pvc": {"existingClaim": "archives"}}})
    pod = one(objects, "Deployment")["spec"]["template"]["spec"]
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert volumes["models"]["persistentVolumeClaim"] == {"claimName": "archives"}
    assert volumes["stores"]["persistentVolumeClaim"] == {"claimName": f"{FULLNAME}-stores"}
    (claim,) = find(objects, "PersistentVolumeClaim")
    assert claim["metadata"]["name"] == f"{FULLNAME}-stores"


def test_gpu_option_requests_gpus_and_tells_torchserve(chart):
    objects, _ = render(chart, VALUE_SETS["gpu"])
    pod = one(objects, "Deployment")["spec"]["template"]["spec"]
    limits = container(pod, "torchserve")["resources"]["limits"]
    assert limits["nvidia.com/gpu"] == 2 and limits["memory"] == "8Gi"
    config = one(objects, "ConfigMap", f"{FULLNAME}-torchserve")["data"]["config.properties"]
    assert properties(config)["number_of_gpu"] == "2"
    default, _ = render(chart, {})
    assert "nvidia.com/gpu" not in container(one(default, "Deployment")["spec"]["template"]["spec"],
                                             "torchserve")["resources"]["limits"]


def properties(text):
    """Java-properties semantics for simple key=value lines: the last entry wins."""
    pairs = [line.split("=", 1) for line in text.splitlines() if "=" in line and not line.lstrip().startswith("#")]
    return {key.strip(): value.strip() for key, value in pairs}


def test_torchserve_logs_with_the_package_log_config(chart):
    objects, _ = render(chart, {})
    shipped = one(objects, "ConfigMap", f"{FULLNAME}-torchserve")["data"]["log4j2.xml"]
    assert shipped.strip() == (ROOT / "explainserve" / "sidecar" / "log4j2.xml").read_text().strip()
    assert '<Root level="warn">' in shipped and '<Logger name="ACCESS_LOG" level="off"/>' in shipped


def test_torchserve_config_is_the_deploy_file_with_secure_settings(chart):
    objects, _ = render(chart, {})
    config = one(objects, "ConfigMap", f"{FULLNAME}-torchserve")["data"]["config.properties"]
    assert config.startswith((ROOT / "deploy" / "config.properties").read_text())
    settings = properties(config)
    # TorchServe answers only inside the pod: everything from outside goes through the sidecar
    assert settings["grpc_inference_address"] == "127.0.0.1"
    assert settings["inference_address"] == "http://127.0.0.1:8080"
    assert settings["grpc_management_address"] == "127.0.0.1"
    assert settings["disable_token_authorization"] == "false"
    assert settings["metrics_mode"] == "prometheus"
    assert int(settings["max_request_size"]) > 6553500 and int(settings["max_response_size"]) > 6553500
    assert settings["management_address"].startswith("http://127.0.0.1:")
    assert settings["enable_model_api"] == "false"
    # the frontend's JVM runs as it does locally (sidecar.torchserve), where its CPU was measured
    assert settings["vmargs"] == JVM_ARGS
    local = properties(TorchServeConfig(model_store=Path("store"), models={}, workdir=Path("work")).properties())
    assert local["vmargs"] == JVM_ARGS


def test_service_exposes_the_explain_api_and_metrics_and_torchserve_grpc_only_on_request(chart):
    objects, _ = render(chart, {})
    ports = {p["name"]: p["port"] for p in one(objects, "Service")["spec"]["ports"]}
    assert ports == {"grpc": 50051, "metrics": 9095, "ts-metrics": 8082}
    objects, _ = render(chart, {"torchserve": {"directAccess": True}})
    ports = {p["name"]: p["port"] for p in one(objects, "Service")["spec"]["ports"]}
    assert ports["ts-grpc"] == 7070
    config = one(objects, "ConfigMap", f"{FULLNAME}-torchserve")["data"]["config.properties"]
    assert properties(config)["grpc_inference_address"] == "0.0.0.0"  # opened only on request
    # every Service targetPort names a port of a container
    pod = one(objects, "Deployment")["spec"]["template"]["spec"]
    named = {p["name"] for c in containers(pod) for p in c.get("ports", [])}
    assert {p["targetPort"] for p in one(objects, "Service")["spec"]["ports"]} <= named


def test_network_policy_admits_clients_and_prometheus_only(chart):
    objects, _ = render(chart, VALUE_SETS["network-policy"])
    policy = one(objects, "NetworkPolicy")
    api, metrics = policy["spec"]["ingress"]
    assert {p["port"] for p in api["ports"]} == {50051, 7070}
    assert {p["port"] for p in metrics["ports"]} == {9095, 8082}
    assert metrics["from"][0]["namespaceSelector"]["matchLabels"] == {"kubernetes.io/metadata.name": "monitoring"}
    (default,) = find(render(chart, {})[0], "NetworkPolicy")  # on by default
    assert {p["port"] for p in default["spec"]["ingress"][0]["ports"]} == {50051}
    assert not find(render(chart, {"networkPolicy": {"enabled": False}})[0], "NetworkPolicy")


def test_autoscaling(chart):
    objects, _ = render(chart, VALUE_SETS["hpa-off"])
    assert not find(objects, "HorizontalPodAutoscaler")
    assert one(objects, "Deployment")["spec"]["replicas"] == 3
    objects, _ = render(chart, VALUE_SETS["hpa-inflight"])
    hpa = one(objects, "HorizontalPodAutoscaler")
    assert hpa["apiVersion"] == "autoscaling/v2"
    (metric,) = hpa["spec"]["metrics"]
    assert metric["type"] == "Pods"
    assert metric["pods"]["metric"]["name"] == "explainserve_inflight_requests"
    assert metric["pods"]["target"] == {"type": "AverageValue", "averageValue": "2"}
    assert "replicas" not in one(objects, "Deployment")["spec"]
    (metric,) = one(render(chart, {})[0], "HorizontalPodAutoscaler")["spec"]["metrics"]
    assert metric["resource"]["name"] == "cpu"
    assert one(objects, "PodDisruptionBudget")["spec"]["minAvailable"] == 1


def test_prometheus_rule_is_the_promtool_tested_file(chart):
    objects, _ = render(chart, {})
    rule = one(objects, "PrometheusRule")
    assert rule["spec"] == yaml.safe_load((ROOT / "deploy" / "prometheus" / "rules.yml").read_text())


def test_dashboard_configmap_holds_the_dashboard_for_grafana(chart):
    objects, _ = render(chart, {})
    config_map = one(objects, "ConfigMap", f"{FULLNAME}-dashboard")
    assert config_map["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert json.loads(config_map["data"]["explainserve.json"]) == json.loads(
        (ROOT / "deploy" / "grafana" / "explainserve.json").read_text())


def test_monitoring_objects_can_be_switched_off(chart):
    objects, _ = render(chart, {"monitoring": {"serviceMonitor": {"enabled": False},
                                               "prometheusRule": {"enabled": False},
                                               "grafanaDashboard": {"enabled": False}}})
    kinds = {o["kind"] for o in objects}
    assert not kinds & {"ServiceMonitor", "PrometheusRule"}
    assert not find(objects, "ConfigMap", f"{FULLNAME}-dashboard")


def test_distribution_build_is_an_indexed_job_then_a_merge_job(chart):
    objects, notes = render(chart, VALUE_SETS["distributions"])
    build = one(objects, "Job", f"{FULLNAME}-distributions-build")
    merge = one(objects, "Job", f"{FULLNAME}-distributions-merge")
    assert build["spec"]["completionMode"] == "Indexed"
    assert build["spec"]["completions"] == 3 and build["spec"]["parallelism"] == 2
    (worker,) = build["spec"]["template"]["spec"]["containers"]
    assert worker["command"] == ["explainserve"]
    args = worker["args"]
    assert args[0] == "build-distributions"
    assert "--shard=$(JOB_COMPLETION_INDEX)" in args and "--num-shards=3" in args
    assert "--out=/stores/.shards/demo_image/$(JOB_COMPLETION_INDEX)" in args
    assert {"--model=image", "--data=fashion-scenes", "--name=demo_image"} <= set(args)
    # one build time for every shard, so that the merge is byte-identical to an unsharded build
    (build_time,) = [a for a in args if a.startswith("--build-time=")]
    assert re.fullmatch(r"--build-time=\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ", build_time)
    (merger,) = merge["spec"]["template"]["spec"]["containers"]
    assert merger["args"][:5] == ["merge-distributions", "/stores/.shards/demo_image/0", "/stores/.shards/demo_image/1",
                                  "/stores/.shards/demo_image/2", "--out=/stores/demo_image"]
    assert {"--model=image", "--data=fashion-scenes", "--name=demo_image"} <= set(merger["args"])
    # Helm runs hooks by weight and waits for each Job: the merge comes after the build.
    weight = {job["metadata"]["name"]: int(job["metadata"]["annotations"]["helm.sh/hook-weight"])
              for job in (build, merge)}
    assert weight[merge["metadata"]["name"]] > weight[build["metadata"]["name"]]
    # Both write the claim the serving pods read.
    serving = one(objects, "Deployment")["spec"]["template"]["spec"]["volumes"]
    claim = next(v for v in serving if v["name"] == "stores")["persistentVolumeClaim"]["claimName"]
    for job in (build, merge):
        volumes = {v["name"]: v for v in job["spec"]["template"]["spec"]["volumes"]}
        assert volumes["stores"]["persistentVolumeClaim"]["claimName"] == claim
        assert volumes["data"]["persistentVolumeClaim"] == {"claimName": "training-images", "readOnly": True}
    assert "distributions-build (3 shards)" in notes


def test_distribution_jobs_read_a_file_source_on_the_data_claim(chart):
    objects, _ = render(chart, VALUE_SETS["your-data"])
    for step in ("build", "merge"):
        job = one(objects, "Job", f"{FULLNAME}-distributions-{step}")
        (container,) = job["spec"]["template"]["spec"]["containers"]
        assert {"--data=imagefolder:/data/catalogue/v2", "--val-fraction=0.1", "--max-bad-fraction=0.02",
                "--model=/models/resnet50.mar", "--name=resnet50"} <= set(container["args"])
        mounts = {m["name"]: m for m in container["volumeMounts"]}
        assert mounts["data"] == {"name": "data", "mountPath": "/data", "readOnly": True}
        assert "--val-limit=5000" in container["args"]  # the merge calibrates on the same val samples
        assert ("--limit=50000" in container["args"]) == (step == "build")  # merge-distributions has no --limit
    build = one(objects, "Job", f"{FULLNAME}-distributions-build")
    assert "--out=/stores/.shards/resnet50/$(JOB_COMPLETION_INDEX)" in build["spec"]["template"]["spec"]["containers"][0]["args"]


@pytest.mark.parametrize("values, message", [
    ({"distributions": {"build": {"enabled": True, "data": "manifest:rows.csv"}}},
     "reads files: set distributions.build.dataClaim"),
    ({"distributions": {"build": {"enabled": True}}, "stores": {"source": "initContainer",
      "initContainer": {"image": "x"}}}, "distributions.build.enabled needs stores.source: pvc"),
    ({"models": {"source": "initContainer"}}, "models.initContainer.image is required"),
])
def test_inconsistent_values_fail_with_a_message(chart, values, message):
    with pytest.raises(helm_python.HelmRenderError, match=re.escape(message)):
        render(chart, values)


@pytest.mark.parametrize("values, message", [
    ({"replicaCount": "two"}, "at '/replicaCount': got string, want integer"),
    ({"replicas": 2}, "additional properties 'replicas' not allowed"),
    ({"sidecar": {"port": 70000}}, "at '/sidecar/port': maximum"),
    ({"autoscaling": {"metric": "gpu"}}, "at '/autoscaling/metric': value must be one of 'inflight', 'cpu'"),
    ({"torchserve": {"resources": {"limits": {"memory": "lots"}}}}, "at '/torchserve/resources/limits/memory'"),
    ({"models": {"source": "s3"}}, "at '/models/source'"),
])
def test_schema_rejects_nonsense_with_a_readable_message(chart, values, message):
    with pytest.raises(helm_python.HelmValuesError) as caught:
        chart.validate_schema(values)
    assert message in str(caught.value)
    with pytest.raises(helm_python.HelmValuesError):
        render(chart, values)


def test_disabling_token_auth_needs_insecure_and_then_warns(chart):
    with pytest.raises(helm_python.HelmRenderError, match="set insecure: true"):
        render(chart, {"torchserve": {"tokenAuthorization": False}})
    objects, notes = render(chart, VALUE_SETS["insecure"])
    assert notes.startswith("WARNING: TorchServe's token authorisation is DISABLED")
    config = one(objects, "ConfigMap", f"{FULLNAME}-torchserve")["data"]["config.properties"]
    assert properties(config)["disable_token_authorization"] == "true"
    pod = one(objects, "Deployment")["spec"]["template"]["spec"]
    assert not any(a.startswith("--token-file") for a in container(pod, "sidecar")["args"])
    _, secure_notes = render(chart, {})
    assert "WARNING" not in secure_notes
    assert "50051" in secure_notes and "port-forward" in secure_notes


def test_values_keys_are_camel_case(chart):
    free_form = {"labels", "matchLabels", "annotations", "extraConfig"}  # Kubernetes / TorchServe keys inside

    def keys(tree):
        if isinstance(tree, dict):
            for key, value in tree.items():
                yield key
                if key not in free_form:
                    yield from keys(value)
    found = list(keys(chart.values))
    assert "replicaCount" in found and "grafana_dashboard" not in found
    for key in found:
        assert re.fullmatch(r"[a-z][a-zA-Z0-9]*", key), key


def test_dockerfile_runs_as_an_unprivileged_user_and_installs_like_the_readme():
    dockerfile = (ROOT / "deploy" / "Dockerfile").read_text()
    instructions = [line for line in dockerfile.splitlines() if line and not line.startswith(("#", " "))]
    user = [line.split()[1] for line in instructions if line.startswith("USER ")]
    assert user and user[-1].split(":")[0] not in {"0", "root"}
    assert instructions[-1].startswith(("CMD", "ENTRYPOINT")) or "USER" in instructions[-3]
    assert "&& make install" in dockerfile, "the image installs the way the README does"
    assert "EXPLAINSERVE_PROFILE=serve" in dockerfile, "without the test tools"
    # make image-test builds it on a local Debian base; by default it is the public Python image
    assert instructions[0] == "ARG BASE=python:3.11-slim-bookworm" and instructions[1] == "FROM ${BASE}"
    # the chart's probe script lives where the image puts the repository
    assert "WORKDIR /opt/explainserve" in dockerfile and "COPY . ." in dockerfile
    assert (ROOT / "deploy" / "torchserve_ping.py").exists()
    assert "/opt/explainserve/.venv/bin" in dockerfile


def load_image_smoke():
    spec = importlib.util.spec_from_file_location("image_smoke", ROOT / "tests" / "image" / "smoke.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def flag_names(argv):
    return sorted(arg.split("=")[0] for arg in argv if arg.startswith("--"))


def test_the_image_smoke_test_starts_the_pod_as_the_chart_does(chart):
    """tests/image/smoke.py (run inside the image by make image-test) mirrors the default
    Deployment: TorchServe's command, arguments, environment and working directory, the
    sidecar's flags, and which mounts are writable."""
    smoke = load_image_smoke()
    pod = one(render(chart, {})[0], "Deployment")["spec"]["template"]["spec"]
    torchserve, sidecar = container(pod, "torchserve"), container(pod, "sidecar")
    assert torchserve["command"] + torchserve["args"] == smoke.TORCHSERVE_COMMAND + smoke.torchserve_args("/config")
    assert {e["name"]: e["value"] for e in torchserve["env"]} == smoke.TORCHSERVE_ENV
    assert torchserve["workingDir"] == str(smoke.KEY_DIR)
    ports = dict.fromkeys(("grpc", "metrics", "health", "7070", "7071"), 1)
    assert flag_names(sidecar["command"] + sidecar["args"]) == flag_names(smoke.sidecar_args(ports))
    assert f"--drain-seconds={smoke.DRAIN_SECONDS}" in sidecar["args"]
    assert f"--auth-keys={smoke.AUTH_DIR}/api-keys.json" in sidecar["args"]
    assert f"--tls-cert={smoke.TLS_DIR}/tls.crt" in sidecar["args"]
    writable = {m["mountPath"] for c in (torchserve, sidecar) for m in c["volumeMounts"] if not m.get("readOnly")}
    assert writable == set(smoke.WRITABLE_MOUNTS)
    grace = pod["terminationGracePeriodSeconds"]
    assert grace >= smoke.DRAIN_SECONDS + smoke.TORCHSERVE_STOP_SECONDS


# Every value set, and per-class metrics on, so that each optional sidecar flag is rendered.
COMMAND_VALUE_SETS = [*VALUE_SETS.values(), {"sidecar": {"metricsPerClass": True}}]


@pytest.fixture(scope="module")
def chart_commands(chart):
    """{sub-command: [argv after `explainserve`, ...]} of every explainserve container the chart renders."""
    commands = {}
    for values in COMMAND_VALUE_SETS:
        objects, _ = render(chart, values)
        for c in (c for pod in pod_specs(objects) for c in containers(pod)):
            if c.get("command", [None])[0] == "explainserve":
                argv = [a.replace("$(JOB_COMPLETION_INDEX)", "0") for a in c["command"][1:] + c.get("args", [])]
                commands.setdefault(argv[0], []).append(argv)
    return commands


@pytest.mark.parametrize("command, flags", [
    ("sidecar", {"--store-dir", "--token-file", "--metrics-per-class", "--tls-cert", "--tls-key", "--tls-client-ca",
                 "--auth-keys", "--allow-unauthenticated", "--reflection", "--health-listen", "--drain-seconds",
                 "--max-concurrent-requests", "--max-queued-requests", "--max-connection-age"}),
    ("build-distributions", {"--shard", "--num-shards", "--val-fraction", "--max-bad-fraction", "--limit", "--val-limit"}),
    ("merge-distributions", {"--val-fraction", "--max-bad-fraction", "--val-limit"}),
])
def test_the_cli_accepts_every_flag_the_chart_passes(chart_commands, command, flags):
    """Each rendered command line parses with the real `explainserve` parser, and every --flag
    is one of the sub-command's own options, spelled in full (argparse would take a prefix)."""
    import argparse

    from explainserve.cli import build_parser

    parser = build_parser()
    subparsers = next(action for action in parser._actions if isinstance(action, argparse._SubParsersAction))
    known = {option for action in subparsers.choices[command]._actions for option in action.option_strings}
    passed = set()
    for argv in chart_commands[command]:
        used = {arg.split("=", 1)[0] for arg in argv[1:] if arg.startswith("--")}
        assert used <= known, f"`explainserve {command}` does not accept {sorted(used - known)}"
        assert parser.parse_args(argv).command == command
        passed |= used
    assert flags <= passed, f"the chart never passes {sorted(flags - passed)} to `explainserve {command}`"


def test_the_packaged_chart_carries_the_linked_files(tmp_path):
    """files/ links to deploy/; `helm package` must store their contents, not the links."""
    archive = helm_python.package(str(CHART), destination=str(tmp_path))
    with helm_python.Chart.load(archive) as packaged:
        objects, _ = render(packaged, {})
    rule = one(objects, "PrometheusRule")
    assert rule["spec"] == yaml.safe_load((ROOT / "deploy" / "prometheus" / "rules.yml").read_text())
    config = one(objects, "ConfigMap", f"{FULLNAME}-torchserve")["data"]["config.properties"]
    assert config.startswith((ROOT / "deploy" / "config.properties").read_text())


def chart_without_schema(tmp_path):
    """The chart without values.schema.json, to reach the templates' own checks."""
    import shutil

    copy = tmp_path / "explainserve"
    shutil.copytree(CHART, copy)  # follows files/ links
    (copy / "values.schema.json").unlink()
    return helm_python.Chart.load(str(copy))


def test_the_sidecar_serves_tls_and_api_keys_from_secrets(chart):
    objects, notes = render(chart, {})
    pod = one(objects, "Deployment")["spec"]["template"]["spec"]
    sidecar = container(pod, "sidecar")
    args = sidecar["args"]
    assert {"--tls-cert=/etc/explainserve/tls/tls.crt", "--tls-key=/etc/explainserve/tls/tls.key",
            "--auth-keys=/etc/explainserve/auth/api-keys.json"} <= set(args)
    assert "--allow-unauthenticated" not in args and "--reflection" not in args  # reflection off in the chart
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert volumes["tls"]["secret"]["secretName"] == f"{FULLNAME}-tls"
    assert volumes["api-keys"]["secret"]["secretName"] == f"{FULLNAME}-api-keys"
    mounts = {m["name"]: m for m in sidecar["volumeMounts"]}
    for name, path in (("tls", "/etc/explainserve/tls"), ("api-keys", "/etc/explainserve/auth")):
        # mounted whole, read-only: a subPath mount would never see a rotated Secret
        assert mounts[name] == {"name": name, "mountPath": path, "readOnly": True}
    assert "tls" not in {m["name"] for m in container(pod, "torchserve")["volumeMounts"]}
    assert not find(objects, "Certificate")
    assert f"create secret tls {FULLNAME}-tls" in notes and "explainserve api-key --name" in notes
    assert "WARNING" not in notes


def test_cert_manager_issues_the_certificate_and_mutual_tls_uses_its_ca(chart):
    objects, notes = render(chart, VALUE_SETS["cert-manager-mtls"])
    certificate = one(objects, "Certificate")
    assert certificate["apiVersion"] == "cert-manager.io/v1"
    assert certificate["spec"]["secretName"] == f"{FULLNAME}-tls"
    assert certificate["spec"]["issuerRef"] == {"name": "internal-ca", "kind": "Issuer", "group": "cert-manager.io"}
    assert f"{FULLNAME}.{NAMESPACE}.svc" in certificate["spec"]["dnsNames"]
    assert certificate["spec"]["privateKey"]["rotationPolicy"] == "Always"
    pod = one(objects, "Deployment")["spec"]["template"]["spec"]
    assert "--tls-client-ca=/etc/explainserve/client-ca/ca.crt" in container(pod, "sidecar")["args"]
    client_ca = next(v for v in pod["volumes"] if v["name"] == "client-ca")["secret"]
    assert client_ca == {"secretName": f"{FULLNAME}-tls", "items": [{"key": "ca.crt", "path": "ca.crt"}]}
    assert "cert-manager issues Secret" in notes
    with pytest.raises(helm_python.HelmRenderError, match="issuerRef.name is required"):
        render(chart, {"sidecar": {"tls": {"certManager": {"enabled": True}}}})


@pytest.mark.parametrize("values, setting", [
    ({"sidecar": {"tls": {"enabled": False}}}, "sidecar.tls.enabled: false"),
    ({"sidecar": {"auth": {"enabled": False}}}, "sidecar.auth.enabled: false"),
    ({"torchserve": {"extraConfig": {"disable_token_authorization": "true"}}},
     "torchserve.extraConfig.disable_token_authorization"),
    ({"torchserve": {"extraConfig": {"disable_token_authorization": True}}},
     "torchserve.extraConfig.disable_token_authorization"),
])
def test_security_can_only_be_switched_off_with_insecure(chart, tmp_path, values, setting):
    with pytest.raises(helm_python.HelmValuesError):  # the schema refuses it ...
        chart.validate_schema(values)
    with chart_without_schema(tmp_path) as bare:  # ... and so do the templates, should the schema be skipped
        with pytest.raises(helm_python.HelmRenderError, match=re.escape(setting) + ".*set insecure: true"):
            render(bare, values)
    objects, notes = render(chart, {**values, "insecure": True})
    assert "WARNING" in notes


def test_extra_config_can_neither_inject_lines_nor_switch_token_auth_off_quietly(chart, tmp_path):
    injected = {"torchserve": {"extraConfig": {"job_queue_size": "100\ndisable_token_authorization=true"}}}
    with pytest.raises(helm_python.HelmValuesError):
        chart.validate_schema(injected)
    with chart_without_schema(tmp_path) as bare:
        with pytest.raises(helm_python.HelmRenderError, match="values one line"):
            render(bare, injected)
    objects, notes = render(chart, {"insecure": True, "torchserve": {"extraConfig": {"disable_token_authorization": "true"}}})
    config = one(objects, "ConfigMap", f"{FULLNAME}-torchserve")["data"]["config.properties"]
    assert properties(config)["disable_token_authorization"] == "true"
    pod = one(objects, "Deployment")["spec"]["template"]["spec"]
    assert not any(a.startswith("--token-file") for a in container(pod, "sidecar")["args"])  # agrees with TorchServe
    assert notes.startswith("WARNING: TorchServe's token authorisation is DISABLED")
    objects, _ = render(chart, {"torchserve": {"extraConfig": {"job_queue_size": 100, "disable_token_authorization": "false"}}})
    config = one(objects, "ConfigMap", f"{FULLNAME}-torchserve")["data"]["config.properties"]
    assert properties(config)["job_queue_size"] == "100"


def test_two_replicas_spread_over_nodes_and_zones_with_a_disruption_budget(chart):
    objects, _ = render(chart, {})
    assert one(objects, "HorizontalPodAutoscaler")["spec"]["minReplicas"] == 2
    assert one(objects, "PodDisruptionBudget")["spec"]["minAvailable"] == 1
    pod = one(objects, "Deployment")["spec"]["template"]["spec"]
    selector = {"app.kubernetes.io/name": "explainserve", "app.kubernetes.io/instance": RELEASE}
    spread = {c["topologyKey"]: c for c in pod["topologySpreadConstraints"]}
    assert set(spread) == {"kubernetes.io/hostname", "topology.kubernetes.io/zone"}
    assert all(c["labelSelector"]["matchLabels"] == selector and c["maxSkew"] == 1 for c in spread.values())
    (preferred,) = pod["affinity"]["podAntiAffinity"]["preferredDuringSchedulingIgnoredDuringExecution"]
    assert preferred["podAffinityTerm"] == {"topologyKey": "kubernetes.io/hostname", "labelSelector": {"matchLabels": selector}}
    fixed, _ = render(chart, {"autoscaling": {"enabled": False}})
    assert one(fixed, "Deployment")["spec"]["replicas"] == 2
    # a user's affinity is kept, and the anti-affinity added to it
    node_affinity = {"requiredDuringSchedulingIgnoredDuringExecution": {"nodeSelectorTerms": [
        {"matchExpressions": [{"key": "pool", "operator": "In", "values": ["cpu"]}]}]}}
    objects, _ = render(chart, {"affinity": {"nodeAffinity": node_affinity}})
    affinity = one(objects, "Deployment")["spec"]["template"]["spec"]["affinity"]
    assert affinity["nodeAffinity"] == node_affinity and "podAntiAffinity" in affinity


def test_stop_order_and_grace_period_agree(chart):
    objects, _ = render(chart, {})
    pod = one(objects, "Deployment")["spec"]["template"]["spec"]
    sidecar, torchserve = container(pod, "sidecar"), container(pod, "torchserve")
    assert sidecar["lifecycle"]["preStop"]["exec"]["command"] == ["sleep", "5"]
    assert "--drain-seconds=30" in sidecar["args"]
    # TorchServe keeps answering until the sidecar's wait and drain are over
    assert torchserve["lifecycle"]["preStop"]["exec"]["command"] == ["sleep", "35"]
    assert pod["terminationGracePeriodSeconds"] == 5 + 30 + 15
    objects, _ = render(chart, {"sidecar": {"drainSeconds": 100}, "terminationGracePeriodSeconds": 200})
    assert one(objects, "Deployment")["spec"]["template"]["spec"]["terminationGracePeriodSeconds"] == 200
    with pytest.raises(helm_python.HelmRenderError, match="terminationGracePeriodSeconds 20 is shorter than"):
        render(chart, {"terminationGracePeriodSeconds": 20})


def test_alertmanager_config_example_routes_the_alerts_to_the_webhook(chart):
    objects, _ = render(chart, {})
    assert not find(objects, "AlertmanagerConfig")  # an example: off until given a receiver
    url = "https://hooks.example.org/explainserve"
    objects, _ = render(chart, {"monitoring": {"alertmanagerConfig": {"enabled": True, "webhookURL": url}}})
    config = one(objects, "AlertmanagerConfig")
    assert config["apiVersion"] == "monitoring.coreos.com/v1alpha1"
    route = config["spec"]["route"]
    assert route["matchers"] == [{"name": "alertname", "matchType": "=~", "value": "Explainserve.*"}]
    assert {r["name"] for r in config["spec"]["receivers"]} == {route["receiver"]} | {
        r["receiver"] for r in route["routes"]}
    assert config["spec"]["receivers"][0]["webhookConfigs"] == [{"url": url, "sendResolved": True}]
    # the same routing as deploy/alertmanager/alertmanager.yml, which the end-to-end test loads
    plain = yaml.safe_load((ROOT / "deploy" / "alertmanager" / "alertmanager.yml").read_text())["route"]
    assert route["groupBy"] == plain["group_by"] and route["repeatInterval"] == plain["repeat_interval"]
    with pytest.raises(Exception, match="webhookURL"):
        render(chart, {"monitoring": {"alertmanagerConfig": {"enabled": True}}})


def test_runbook_links_point_where_the_runbook_is_hosted(chart):
    hosted = "https://git.example.org/ml/explainserve/blob/main/docs/RUNBOOK.md"
    objects, _ = render(chart, {"monitoring": {"prometheusRule": {"runbookURL": hosted}}})
    alerts = [r for g in one(objects, "PrometheusRule")["spec"]["groups"] for r in g["rules"] if "alert" in r]
    assert len(alerts) >= 10
    for alert in alerts:
        assert alert["annotations"]["runbook_url"] == f"{hosted}#{alert['alert'].lower()}"
