"""deploy/config.properties runs a real TorchServe with token authorisation on, and the
chart's probe script (deploy/torchserve_ping.py) passes against it only with the key.

TorchServe is started exactly as the chart starts it (--foreground --ts-config ...
--models all --ncs, working directory = where key_file.json lands), on free loopback
ports instead of the fixed ones.
"""
import datetime
import importlib.util
import json
import os
import re
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from explainserve.sidecar.torchserve import free_port, stop_process_group

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"
pytestmark = pytest.mark.integration

spec = importlib.util.spec_from_file_location("torchserve_ping", DEPLOY / "torchserve_ping.py")
torchserve_ping = importlib.util.module_from_spec(spec)
spec.loader.exec_module(torchserve_ping)


def with_free_ports(text):
    """deploy/config.properties with each fixed port replaced by a free one; returns (text, ports)."""
    ports = {}
    for fixed in (8080, 8081, 8082, 7070, 7071):
        ports[fixed] = free_port()
        text, count = re.subn(rf"(?m)(:|_port=){fixed}$", rf"\g<1>{ports[fixed]}", text)
        assert count == 1, f"port {fixed} not found exactly once in config.properties"
    return text, ports


def http_get(url, key=None):
    """(status, body) of a GET, also for error statuses."""
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    try:
        with urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=5) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as error:
        return error.code, error.read().decode()


@pytest.fixture(scope="module")
def torchserve(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("torchserve")
    config, ports = with_free_ports((DEPLOY / "config.properties").read_text())
    (workdir / "config.properties").write_text(config + f"initial_worker_port={free_port()}\n")
    (workdir / "models").mkdir()
    env = {**os.environ, "TMPDIR": str(workdir), "LOG_LOCATION": str(workdir / "logs"),
           "METRICS_LOCATION": str(workdir / "logs")}
    command = [str(Path(sys.executable).with_name("torchserve")), "--foreground", "--ts-config",
               str(workdir / "config.properties"), "--model-store", str(workdir / "models"), "--models", "all", "--ncs"]
    with open(workdir / "torchserve.out", "wb") as log:
        process = subprocess.Popen(command, cwd=workdir, env=env, stdout=log, stderr=subprocess.STDOUT,
                                   start_new_session=True)
    ping_url = f"http://127.0.0.1:{ports[8080]}/ping"
    try:
        deadline = time.monotonic() + 120
        while not (workdir / "key_file.json").exists() or http_get_or_none(ping_url) is None:
            assert process.poll() is None, (workdir / "torchserve.out").read_text()[-3000:]
            assert time.monotonic() < deadline, "TorchServe did not start in 120 s"
            time.sleep(0.5)
        yield {"workdir": workdir, "ports": ports, "ping": ping_url}
    finally:
        stop_process_group(process.pid)
        process.wait()


def http_get_or_none(url):
    try:
        return http_get(url)
    except OSError:
        return None


def keys(torchserve):
    return json.loads((torchserve["workdir"] / "key_file.json").read_text())


def test_keys_are_written_to_the_working_directory_and_do_not_expire_in_a_pods_life(torchserve):
    stored = keys(torchserve)
    assert {"management", "inference", "API"} <= stored.keys()
    # "2036-11-19T04:05:14.198029314Z": UTC, nanoseconds; seconds are enough here
    expiry = datetime.datetime.fromisoformat(stored["inference"]["expiration time"][:19] + "+00:00")
    assert expiry - datetime.datetime.now(datetime.timezone.utc) > datetime.timedelta(days=365)


def test_ping_without_the_key_is_refused(torchserve):
    status, body = http_get(torchserve["ping"])
    assert status == 400 and "InvalidKeyException" in body


def test_probe_script_passes_with_the_key_file(torchserve):
    key_file = torchserve["workdir"] / "key_file.json"
    assert torchserve_ping.ping(torchserve["ping"], str(key_file)) is None
    assert torchserve_ping.main(["--url", torchserve["ping"], "--key-file", str(key_file)]) == 0


def test_probe_script_fails_with_a_wrong_key_or_no_key_file(torchserve, tmp_path):
    wrong = tmp_path / "key_file.json"
    wrong.write_text(json.dumps({"inference": {"key": "not-the-key"}}))
    reason = torchserve_ping.ping(torchserve["ping"], str(wrong))
    assert reason and "400" in reason
    reason = torchserve_ping.ping(torchserve["ping"], str(tmp_path / "missing.json"))
    assert reason and "missing.json" in reason
    assert torchserve_ping.main(["--url", torchserve["ping"], "--key-file", str(wrong)]) == 1


def test_probe_script_fails_when_nothing_listens(tmp_path):
    key_file = tmp_path / "key_file.json"
    key_file.write_text(json.dumps({"inference": {"key": "k"}}))
    reason = torchserve_ping.ping(f"http://127.0.0.1:{free_port()}/ping", str(key_file), timeout=2)
    assert reason and "refused" in reason.lower()


def test_metrics_are_served_in_prometheus_format_without_a_key(torchserve):
    status, body = http_get(f"http://127.0.0.1:{torchserve['ports'][8082]}/metrics")
    assert status == 200 and "# TYPE" in body


def test_management_api_needs_the_management_key(torchserve):
    url = f"http://127.0.0.1:{torchserve['ports'][8081]}/models"
    assert http_get(url)[0] == 400
    status, body = http_get(url, keys(torchserve)["management"]["key"])
    assert status == 200 and json.loads(body) == {"models": []}
