"""Smoke test of the container image, run inside it as uid 10001 (tests/image/Containerfile).

It starts the pod's two containers the way the chart does (helm/explainserve; a unit test in
tests/unit/test_helm_chart.py checks that the commands, flags, environment and writable mounts
below match the rendered Deployment):

1. the CLI archives the demo image model into /models and the demo store is published
   atomically into /stores, as a distribution Job's merge would;
2. TorchServe under tini, with the chart's config.properties and log4j2.xml (token
   authorisation on, every API on 127.0.0.1), its keys written to /run/torchserve; the chart's
   probe script must pass;
3. the gateway with TLS, API keys and TorchServe's inference key, ready only once the model's
   worker is; ``explainserve explain`` over TLS with the key answers, scored against the
   published store, and a call without a key is UNAUTHENTICATED;
4. SIGTERM: TorchServe (through tini) and the gateway (after its drain) exit within the
   chart's grace period;
5. TorchServe, the gateway and the client wrote nothing outside the volumes the chart mounts
   writable (/tmp, /run/torchserve): the root filesystem can be read-only.

Ports are free loopback ports rather than the chart's fixed ones (the build shares the host's
network). Prints ``image_smoke: ...`` lines and exits 0, or raises.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

CHART_FILES = Path("/opt/explainserve/helm/explainserve/files")  # what the chart's ConfigMap holds
PROBE_SCRIPT = "/opt/explainserve/deploy/torchserve_ping.py"
TLS_DIR, AUTH_DIR = Path("/etc/explainserve/tls"), Path("/etc/explainserve/auth")
KEY_DIR = Path("/run/torchserve")
MODEL = "demo_image"
# As in the chart's Deployment: TorchServe's container.
TORCHSERVE_COMMAND = ["tini", "-g", "--", "torchserve"]
TORCHSERVE_ENV = {"HOME": "/tmp", "LOG_LOCATION": "/tmp/torchserve-logs", "METRICS_LOCATION": "/tmp/torchserve-logs"}
# The serving pod's writable volumes. /config, /models, /stores and the Secrets are mounted
# read-only; the smoke writes /models, /stores and the API-key file before it starts the
# pod's processes, standing in for the claims' Jobs and the Secret.
WRITABLE_MOUNTS = ("/tmp", str(KEY_DIR))
# The grace period allows TorchServe this long to stop after preStop and the drain (values.yaml:
# terminationGracePeriodSeconds).
TORCHSERVE_STOP_SECONDS = 15
DRAIN_SECONDS = 30


def torchserve_args(config: Path | str) -> list[str]:
    """TorchServe's arguments, ``config`` the folder of config.properties and log4j2.xml."""
    return ["--foreground", "--ts-config", f"{config}/config.properties", "--log-config", f"{config}/log4j2.xml",
            "--model-store", "/models", "--models", "all", "--ncs"]


def sidecar_args(ports: dict[str, int]) -> list[str]:
    """The chart's sidecar flags (default values), on loopback ports."""
    return [f"--listen=127.0.0.1:{ports['grpc']}", f"--metrics-port={ports['metrics']}",
            "--metrics-address=127.0.0.1", f"--torchserve=127.0.0.1:{ports['7070']}",
            f"--torchserve-management=127.0.0.1:{ports['7071']}", "--store-dir=/stores",
            f"--token-file={KEY_DIR}/key_file.json", f"--health-listen=127.0.0.1:{ports['health']}",
            f"--tls-cert={TLS_DIR}/tls.crt", f"--tls-key={TLS_DIR}/tls.key",
            f"--auth-keys={AUTH_DIR}/api-keys.json", "--max-concurrent-requests=4", "--max-queued-requests=4",
            "--max-connection-age=300", f"--drain-seconds={DRAIN_SECONDS}"]


def say(message: str) -> None:
    print(f"image_smoke: {message}", flush=True)


def run(*argv: str, env: dict | None = None) -> str:
    """Run a command, fail with its output unless it exits 0; returns its stdout."""
    done = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=600)
    assert done.returncode == 0, f"{' '.join(argv)} exited {done.returncode}:\n{done.stdout}\n{done.stderr}"
    return done.stdout


def chart_config(work: Path, ports: dict[str, int]) -> Path:
    """A folder standing in for the chart's ConfigMap: its log4j2.xml, and its config.properties
    with the fixed ports replaced by free loopback ones."""
    folder = work / "config"
    folder.mkdir()
    shutil.copy(CHART_FILES / "log4j2.xml", folder)
    text = (CHART_FILES / "config.properties").read_text().replace("0.0.0.0", "127.0.0.1")
    for fixed in ("8080", "8081", "8082", "7070", "7071"):
        text, count = re.subn(rf"(?m)(:|_port=){fixed}$", rf"\g<1>{ports[fixed]}", text)
        assert count == 1, f"port {fixed} not found exactly once in the chart's config.properties"
    (folder / "config.properties").write_text(text + f"initial_worker_port={ports['workers']}\n")
    return folder


def publish_demo_store() -> str:
    """Publish the package's demo store at /stores/<MODEL>; returns its sha256."""
    from explainserve.anomaly.publish import publishing
    from explainserve.anomaly.store import load_store
    from explainserve.commands.archive import demo_store

    folder, _, _ = demo_store("image")
    with publishing(Path("/stores") / MODEL) as version:
        shutil.copytree(folder, version, dirs_exist_ok=True)
    return load_store(Path("/stores") / MODEL).sha256


def wait_for(what: str, ready, process: subprocess.Popen, log: Path, timeout: float) -> float:
    """Poll ``ready()`` until true; returns the seconds it took. Fails if ``process`` exits."""
    start = time.monotonic()
    while not ready():
        assert process.poll() is None, f"{what}: exited {process.returncode}\n{log.read_text()[-4000:]}"
        assert time.monotonic() - start < timeout, f"{what}: not ready in {timeout:.0f} s\n{log.read_text()[-4000:]}"
        time.sleep(1)
    return time.monotonic() - start


# Sessions started here. A build step shares the host's process table, so whatever is left of
# them when the smoke fails is killed: tini puts TorchServe in a process group of its own, but
# every process it starts stays in the session.
STARTED: list[subprocess.Popen] = []


def start(argv: list[str], log: Path, **popen) -> subprocess.Popen:
    with open(log, "wb") as out:
        STARTED.append(subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, start_new_session=True, **popen))
    return STARTED[-1]


def session_members(session: int) -> list[int]:
    """Live (not zombie) processes of ``session``."""
    members = []
    for entry in os.scandir("/proc"):
        try:
            fields = Path(entry.path, "stat").read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if entry.name.isdigit() and fields[0] != "Z" and int(fields[3]) == session:
            members.append(int(entry.name))
    return members


def kill_sessions() -> None:
    for process in STARTED:
        for pid in session_members(process.pid):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


def stop(process: subprocess.Popen, what: str, within: float) -> float:
    """SIGTERM ``process`` alone (as the kubelet signals a container's PID 1); returns how long
    it took until neither it nor anything it started runs."""
    start_time = time.monotonic()
    process.send_signal(signal.SIGTERM)
    try:
        code = process.wait(within)
    except subprocess.TimeoutExpired:
        raise AssertionError(f"{what} did not exit within {within} s of SIGTERM") from None
    assert code in (0, 128 + signal.SIGTERM, -signal.SIGTERM), f"{what} exited {code} after SIGTERM"
    while left := session_members(process.pid):
        assert time.monotonic() - start_time < within, f"{what}: processes {left} still run {within} s after SIGTERM"
        time.sleep(0.2)
    return time.monotonic() - start_time


def written_outside(allowed: tuple[str, ...], since: float) -> list[str]:
    """Paths outside ``allowed`` (and the kernel's /proc, /sys, /dev) that this user may write
    and that were created or changed after ``since``."""
    skip = {*allowed, "/proc", "/sys", "/dev"}
    changed, pending = [], ["/"]
    while pending:
        try:
            entries = list(os.scandir(pending.pop()))
        except PermissionError:  # a folder uid 10001 cannot enter, nor so write into
            continue
        for entry in entries:
            if entry.path in skip:
                continue
            info = entry.stat(follow_symlinks=False)
            # what uid 10001 cannot write was changed by the build's root (buildah mounts in /run)
            if max(info.st_mtime, info.st_ctime) > since and os.access(entry.path, os.W_OK, follow_symlinks=False):
                changed.append(entry.path)
            if entry.is_dir(follow_symlinks=False):
                pending.append(entry.path)
    return changed


def explain_over_tls(ports: dict[str, int], image: Path, token: str) -> str:
    """``explainserve explain`` as a client would call the Service; returns its output."""
    return run("explainserve", "explain", str(image), "--model", MODEL, "--method", "grad_cam",
               "--target", f"127.0.0.1:{ports['grpc']}", "--tls-ca", str(TLS_DIR / "tls.crt"),
               env={**os.environ, "EXPLAINSERVE_TOKEN": token})


def check_explain(ports: dict[str, int], token: str, store_sha: str, work: Path) -> None:
    import grpc
    from PIL import Image

    from explainserve.client import ExplainClient, ExplainError
    from explainserve.data.scenes import FashionScenes

    image = work / "scene.png"
    Image.fromarray(FashionScenes("test", seed=3, size=1, image_size=64)[0]["image"]).save(image)
    output = explain_over_tls(ports, image, token)
    say("explain over TLS: " + " | ".join(line.strip() for line in output.splitlines()[:3]))
    assert "anomaly: OK" in output, output
    target, ca = f"127.0.0.1:{ports['grpc']}", TLS_DIR / "tls.crt"
    with ExplainClient(target, tls_ca=ca, token=token) as client:
        result = client.explain(image.read_bytes(), model=MODEL, methods=["grad_cam"], timeout=120)
    assert result.anomaly.store_sha256 == store_sha, (result.anomaly.store_sha256, store_sha)
    assert result.maps["grad_cam"].heatmap.shape == (64, 64), result.maps["grad_cam"].heatmap.shape
    with ExplainClient(target, tls_ca=ca, token="") as client:
        try:
            client.explain(image.read_bytes(), model=MODEL, timeout=30)
            raise AssertionError("a call without an API key was answered")
        except ExplainError as error:
            assert error.code == grpc.StatusCode.UNAUTHENTICATED, error


def main() -> int:
    from explainserve.sidecar.torchserve import free_port

    assert os.getuid() == 10001, f"run as uid 10001, not {os.getuid()}"
    try:
        Path("/opt/explainserve/written").touch()
        raise AssertionError("uid 10001 can write the installation")
    except PermissionError:
        pass
    work = Path("/tmp/smoke")
    work.mkdir()
    ports = {name: free_port() for name in ("8080", "8081", "8082", "7070", "7071", "workers", "grpc", "metrics",
                                            "health")}
    say(run("explainserve", "--help").splitlines()[0])
    key, entry = run("explainserve", "api-key", "--name", "image-smoke", "--model", MODEL).splitlines()
    (AUTH_DIR / "api-keys.json").write_text(json.dumps({"keys": [json.loads(entry)]}))
    say(run("explainserve", "archive", "--demo", "image", "--export-path", "/models").strip().splitlines()[-1])
    store_sha = publish_demo_store()
    say(f"store published: /stores/{MODEL} -> {os.readlink(f'/stores/{MODEL}')} sha256 {store_sha[:12]}")

    config = chart_config(work, ports)
    since = time.time()
    try:
        serve_and_stop(work, ports, config, key, store_sha, since)
    except BaseException:
        kill_sessions()
        for log in sorted(work.glob("*.log")) + sorted(Path(TORCHSERVE_ENV["LOG_LOCATION"]).glob("*.log")):
            print(f"--- {log} (end)\n{log.read_text(errors='replace')[-3000:]}", flush=True)
        raise
    say("ok")
    return 0


def serve_and_stop(work: Path, ports: dict[str, int], config: Path, key: str, store_sha: str, since: float) -> None:
    """Start TorchServe and the gateway as the chart does, explain, stop them, check the writes."""
    from explainserve.sidecar.local import wait_serving

    torchserve = start(TORCHSERVE_COMMAND + torchserve_args(config), work / "torchserve.log",
                       cwd=KEY_DIR, env={**os.environ, **TORCHSERVE_ENV})
    probe = [sys.executable, PROBE_SCRIPT, "--url", f"http://127.0.0.1:{ports['8080']}/ping",
             "--key-file", str(KEY_DIR / "key_file.json")]
    took = wait_for("TorchServe", lambda: subprocess.run(probe, capture_output=True).returncode == 0,
                    torchserve, work / "torchserve.log", timeout=600)
    say(f"TorchServe healthy under tini after {took:.0f} s (the chart's probe script passes with the key)")
    sidecar = start(["explainserve", "sidecar", *sidecar_args(ports)], work / "sidecar.log", env=os.environ)
    started = time.monotonic()
    wait_serving(f"127.0.0.1:{ports['health']}", 600, sidecar, service="explainserve.v1.Explainer")
    # TorchServe pings Healthy while its worker still loads (it imports torch from the image's
    # files, which nothing has read yet: a minute on a loaded machine); the gateway is ready
    # only once the model has a READY worker.
    ready = f'explainserve_torchserve_workers{{model="{MODEL}",status="READY"}} 1.0'
    metrics = urllib.request.urlopen(f"http://127.0.0.1:{ports['metrics']}/metrics", timeout=5).read().decode()
    assert ready in metrics, "the gateway was ready before the model's worker"
    say(f"gateway SERVING on its health port after {time.monotonic() - started:.0f} s, with {MODEL}'s worker READY")
    check_explain(ports, key, store_sha, work)

    say(f"gateway exited {stop(sidecar, 'the gateway', DRAIN_SECONDS + 5):.1f} s after SIGTERM")
    say(f"TorchServe exited {stop(torchserve, 'tini/TorchServe', TORCHSERVE_STOP_SECONDS):.1f} s after SIGTERM to tini")
    changed = written_outside(WRITABLE_MOUNTS, since)
    assert not changed, f"written outside the writable mounts: {changed[:20]}"
    say(f"TorchServe, the gateway and the client wrote nothing outside {', '.join(WRITABLE_MOUNTS)}")


if __name__ == "__main__":
    sys.exit(main())
