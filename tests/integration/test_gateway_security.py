"""TLS, mutual TLS and API keys on a real gateway in front of the shared fault TorchServe, with
real certificates made here (`cryptography`): handshakes, refusals, and rotation of keys and
certificates without a restart."""

from __future__ import annotations

import json
import os
import socket
import ssl
import subprocess
import sys
from pathlib import Path

import grpc
import pytest
from cryptography import x509
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from explainserve.client import ExplainClient, ExplainError
from explainserve.sidecar.auth import key_sha256, new_key
from explainserve.sidecar.torchserve import free_port
from support.certificates import CertificateAuthority
from support.fault_load import MODEL
from support.serving_harness import health, random_image, start_gateway, stop_gateway, wait_for
from test_sidecar_anomaly import metric_value, metrics_text

pytest_plugins = ["support.fault_harness"]
pytestmark = [pytest.mark.integration, pytest.mark.timeout(240)]


def write_keys(path: Path, entries: list[dict]) -> None:
    """Replace the keys file in one rename, as a Secret update does."""
    temporary = path.with_suffix(".tmp")
    temporary.write_text(json.dumps({"keys": entries}))
    os.replace(temporary, path)


def tls_health(target: str, ca: Path, client=None):
    """The gateway's server-wide health over TLS with no API key; None when the handshake fails."""
    credentials = grpc.ssl_channel_credentials(ca.read_bytes(), *((client.key.read_bytes(), client.cert.read_bytes())
                                                                   if client else ()))
    with grpc.secure_channel(target, credentials) as channel:
        try:
            return health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5).status
        except grpc.RpcError:
            return None


def served_serial(port: int, ca: Path) -> int:
    """Serial number of the certificate a new TLS connection to the gateway is shown."""
    context = ssl.create_default_context(cafile=str(ca))
    context.set_alpn_protocols(["h2"])
    with socket.create_connection(("127.0.0.1", port), timeout=10) as plain:
        with context.wrap_socket(plain, server_hostname="localhost") as secure:
            return x509.load_der_x509_certificate(secure.getpeercert(binary_form=True)).serial_number


def refusal(client: ExplainClient, **fields) -> ExplainError:
    with pytest.raises(ExplainError) as refused:
        client.explain(random_image(3), model=fields.pop("model", MODEL), timeout=30, **fields)
    return refused.value


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    folder = tmp_path_factory.mktemp("pki")
    ca, other = CertificateAuthority(folder, "test"), CertificateAuthority(folder, "stranger")
    return {"ca": ca, "other": other, "server": ca.issue("gateway", server=True),
            "client": ca.issue("client", server=False), "stranger": other.issue("stranger-client", server=False)}


def gateway(fault_stack, workdir: Path, *flags: str):
    torchserve = fault_stack.torchserve
    process, target, metrics_url = start_gateway(workdir, torchserve.grpc_target, torchserve.management_target,
                                                 token_file=torchserve.key_file, extra_args=flags)
    return process, target, metrics_url


def test_tls_and_api_keys(fault_stack, pki, tmp_path):
    ca, server = pki["ca"].cert, pki["server"]
    keys_file = tmp_path / "keys.json"
    alice, limited, later = new_key(), new_key(), new_key()
    write_keys(keys_file, [{"name": "alice", "sha256": key_sha256(alice)},
                           {"name": "limited", "sha256": key_sha256(limited), "models": ["another_model"]}])
    probes = f"127.0.0.1:{free_port()}"
    process, target, metrics_url = gateway(fault_stack, tmp_path, "--tls-cert", str(server.cert), "--tls-key",
                                           str(server.key), "--auth-keys", str(keys_file), "--health-listen", probes)
    try:
        wait_for(lambda: tls_health(target, ca) == health_pb2.HealthCheckResponse.SERVING, timeout=60)  # health is open
        # the plaintext probe port answers health alone: the kubelet's probes, which cannot speak TLS
        assert health(probes) == health(probes, "liveness") == health_pb2.HealthCheckResponse.SERVING
        with ExplainClient(probes, token=alice) as on_probe_port:
            assert refusal(on_probe_port).code == grpc.StatusCode.UNIMPLEMENTED
        with ExplainClient(target, tls_ca=ca, token=alice) as client:
            assert len(client.explain(random_image(1), model=MODEL, timeout=60).classes) == 5  # the TLS handshake
        with ExplainClient(target) as plaintext:  # a client without TLS cannot talk to it
            assert refusal(plaintext).code == grpc.StatusCode.UNAVAILABLE
        with ExplainClient(target, tls_ca=pki["other"].cert, token=alice) as wrong_ca:  # nor one trusting another CA
            assert refusal(wrong_ca).code == grpc.StatusCode.UNAVAILABLE

        before = metrics_text(metrics_url)
        with ExplainClient(target, tls_ca=ca, token="") as anonymous:
            missing = refusal(anonymous)
        assert missing.code == grpc.StatusCode.UNAUTHENTICATED and "authorization: Bearer" in missing.details
        with ExplainClient(target, tls_ca=ca, token=new_key()) as guessed:
            assert refusal(guessed).code == grpc.StatusCode.PERMISSION_DENIED
        with ExplainClient(target, tls_ca=ca, token=limited) as client:
            denied = refusal(client)
            assert denied.code == grpc.StatusCode.PERMISSION_DENIED and "'limited' may not call model(s) ['tiny_image']" in denied.details
            with pytest.raises(ExplainError) as scored:
                client.score([0.0] * 512, model=MODEL, predicted_class=0, timeout=30)
            assert scored.value.code == grpc.StatusCode.PERMISSION_DENIED
        after = metrics_text(metrics_url)
        counted = {reason: metric_value(after, "explainserve_refused_requests_total", reason=reason)
                   - metric_value(before, "explainserve_refused_requests_total", reason=reason)
                   for reason in ("unauthenticated", "permission_denied")}
        assert counted == {"unauthenticated": 1, "permission_denied": 3}, counted

        with grpc.secure_channel(target, grpc.ssl_channel_credentials(ca.read_bytes())) as channel:  # off by default
            stub = reflection_pb2_grpc.ServerReflectionStub(channel)
            with pytest.raises(grpc.RpcError) as reflected:
                list(stub.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=5))
            assert reflected.value.code() == grpc.StatusCode.UNIMPLEMENTED

        # Rotation without a restart: alice's key is revoked and another takes its place ...
        write_keys(keys_file, [{"name": "later", "sha256": key_sha256(later)}])
        with ExplainClient(target, tls_ca=ca, token=alice) as revoked:
            assert refusal(revoked).code == grpc.StatusCode.PERMISSION_DENIED
        with ExplainClient(target, tls_ca=ca, token=later) as client:
            assert len(client.explain(random_image(2), model=MODEL, timeout=60).classes) == 5
        # ... and a file that does not parse keeps the keys in use.
        keys_file.write_text("{not json")
        with ExplainClient(target, tls_ca=ca, token=later) as client:
            assert len(client.explain(random_image(2), model=MODEL, timeout=60).classes) == 5

        # The certificate too: a renewed one is shown to new connections.
        port = int(target.rsplit(":", 1)[1])
        assert served_serial(port, ca) == server.serial
        renewed = pki["ca"].issue("gateway-renewed", server=True)
        os.replace(renewed.cert, server.cert)
        os.replace(renewed.key, server.key)
        assert wait_for(lambda: served_serial(port, ca) == renewed.serial, timeout=10)
        with ExplainClient(target, tls_ca=ca, token=later) as client:
            assert len(client.explain(random_image(4), model=MODEL, timeout=60).classes) == 5
        assert process.poll() is None
    finally:
        stop_gateway(process)
    log = (tmp_path / "gateway.log").read_text()
    assert alice not in log and later not in log  # keys are never logged
    assert "keeping the 1 keys in use" in log and "TLS certificate re-read" in log


def test_mutual_tls_refuses_clients_without_a_certificate_from_its_ca(fault_stack, pki, tmp_path):
    ca, server, client_cert = pki["ca"].cert, pki["server"], pki["client"]
    process, target, _ = gateway(fault_stack, tmp_path, "--tls-cert", str(server.cert), "--tls-key", str(server.key),
                                 "--tls-client-ca", str(ca), "--allow-unauthenticated")
    try:
        wait_for(lambda: tls_health(target, ca, client_cert) == health_pb2.HealthCheckResponse.SERVING, timeout=60)
        with ExplainClient(target, tls_ca=ca, tls_client_cert=client_cert.cert, tls_client_key=client_cert.key) as client:
            assert len(client.explain(random_image(5), model=MODEL, timeout=60).classes) == 5
        with ExplainClient(target, tls_ca=ca) as no_certificate:
            assert refusal(no_certificate).code == grpc.StatusCode.UNAVAILABLE
        stranger = pki["stranger"]
        with ExplainClient(target, tls_ca=ca, tls_client_cert=stranger.cert, tls_client_key=stranger.key) as other:
            assert refusal(other).code == grpc.StatusCode.UNAVAILABLE
        assert tls_health(target, ca) is None  # without a client certificate not even health answers
    finally:
        stop_gateway(process)


def test_an_exposed_gateway_without_keys_refuses_to_start(tmp_path):
    nowhere = f"127.0.0.1:{free_port()}"
    started = subprocess.run([sys.executable, "-m", "explainserve.cli", "sidecar", "--listen", f"0.0.0.0:{free_port()}",
                              "--torchserve", nowhere, "--torchserve-management", nowhere],
                             capture_output=True, text=True, timeout=60)
    assert started.returncode == 2
    assert "no --auth-keys is given: any caller would be served" in started.stderr
