"""Start and stop a local TorchServe with a generated ``config.properties``.

Each instance gets its own folder (config, logs, pid file) so several can run side by side:
TorchServe keeps its pid file in ``$TMPDIR``, which we point at that folder.
"""

from __future__ import annotations

import collections
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import grpc

from explainserve.wire import MAX_MESSAGE_BYTES


# Warnings and errors only (see the file): TorchServe's own per-request logging costs CPU.
LOG_CONFIG = Path(__file__).with_name("log4j2.xml")
# The frontend's JVM: the serial collector (no concurrent GC threads competing with the workers
# for a few cores) and the quick C1 compiler only (the frontend forwards bytes; C2's compilations
# cost more CPU than its faster code saved). TorchServe's CPU per direct Predictions call of the
# demo model, the two JVMs side by side (bench notes in docs/TUNING.md): 4.4 -> 2.7 ms.
JVM_ARGS = "-XX:+UseSerialGC -XX:TieredStopAtLevel=1"


# The ports free_port handed out lately. The kernel picks a port for bind(("", 0)) at random,
# so a few picks in a row repeat one now and then (8 picks: 7 windows of 2,500 here), and the
# second server started on it fails to listen; a port handed out is not handed out again.
HANDED_OUT: collections.deque[int] = collections.deque(maxlen=2048)
HANDED_OUT_LOCK = threading.Lock()


def free_port() -> int:
    """A loopback TCP port that nothing listens on now, and that this process has not been
    handed lately (the caller's server binds it later)."""
    with HANDED_OUT_LOCK:
        while True:
            with socket.socket() as probe_socket:
                probe_socket.bind(("127.0.0.1", 0))
                port = probe_socket.getsockname()[1]
            if port not in HANDED_OUT:
                HANDED_OUT.append(port)
                return port


def log_tail(path: Path, lines: int = 20) -> str:
    """The last ``lines`` lines of the log file ``path``, or a note that it cannot be read."""
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError as error:
        return f"(its log {path} cannot be read: {error})"


@dataclass
class TorchServeConfig:
    """Ports and options of one local TorchServe; ports of 0 are chosen free."""

    model_store: Path
    models: dict[str, str]  # model name -> archive file name in model_store
    workdir: Path
    grpc_inference_port: int = 7070
    grpc_management_port: int = 7071
    inference_port: int = 0
    management_port: int = 0
    metrics_port: int = 0
    # Workers listen on Unix sockets /tmp/.ts.sock.<port>: a per-instance port keeps
    # TorchServes started side by side apart.
    worker_port: int = 0
    disable_token_auth: bool = False
    env: dict[str, str] = field(default_factory=dict)
    # TorchServe's log4j2 configuration; None: its built-in one (about two dozen lines per request).
    log_config: Path | None = LOG_CONFIG

    def __post_init__(self):
        for name in ("grpc_inference_port", "grpc_management_port", "inference_port", "management_port", "metrics_port",
                     "worker_port"):
            if getattr(self, name) == 0:
                setattr(self, name, free_port())

    def properties(self) -> str:
        lines = {
            "inference_address": f"http://127.0.0.1:{self.inference_port}",
            "management_address": f"http://127.0.0.1:{self.management_port}",
            "metrics_address": f"http://127.0.0.1:{self.metrics_port}",
            "grpc_inference_address": "127.0.0.1",
            "grpc_management_address": "127.0.0.1",
            "grpc_inference_port": self.grpc_inference_port,
            "grpc_management_port": self.grpc_management_port,
            "initial_worker_port": self.worker_port,
            "metrics_mode": "prometheus",
            "vmargs": JVM_ARGS,
            "enable_model_api": "false",
            "disable_token_authorization": str(self.disable_token_auth).lower(),
            "install_py_dep_per_model": "false",
            "max_request_size": MAX_MESSAGE_BYTES,
            "max_response_size": MAX_MESSAGE_BYTES,
            "default_workers_per_model": 1,
            "model_store": self.model_store,
            "load_models": ",".join(f"{name}={mar}" for name, mar in self.models.items()),
        }
        return "".join(f"{key}={value}\n" for key, value in lines.items())


class TorchServe:
    """A TorchServe process started by us, in the foreground of its own process group."""

    def __init__(self, config: TorchServeConfig):
        self.config = config
        self.process: subprocess.Popen | None = None
        self._log_start = 0
        config.workdir.mkdir(parents=True, exist_ok=True)
        self.log_path = config.workdir / "torchserve.out"

    @property
    def grpc_target(self) -> str:
        return f"127.0.0.1:{self.config.grpc_inference_port}"

    @property
    def management_target(self) -> str:
        return f"127.0.0.1:{self.config.grpc_management_port}"

    @property
    def key_file(self) -> Path | None:
        """Where TorchServe writes its keys (its working directory), None without token authorisation."""
        return None if self.config.disable_token_auth else self.config.workdir / "key_file.json"

    def start(self) -> "TorchServe":
        config = self.config
        properties = config.workdir / "config.properties"
        properties.write_text(config.properties())
        env = {**os.environ, "TMPDIR": str(config.workdir), "LOG_LOCATION": str(config.workdir / "logs"),
               "METRICS_LOCATION": str(config.workdir / "logs"), **config.env}
        command = [str(Path(sys.executable).with_name("torchserve")), "--start", "--foreground", "--ncs",
                   "--ts-config", str(properties), "--model-store", str(config.model_store)]
        if config.disable_token_auth:
            command.append("--disable-token-auth")
        if config.log_config is not None:
            command += ["--log-config", str(config.log_config)]
        with open(self.log_path, "ab") as log:
            self._log_start = log.tell()  # output of earlier runs in the same folder is not ours
            self.process = subprocess.Popen(command, cwd=config.workdir, env=env, stdout=log,
                                            stderr=subprocess.STDOUT, start_new_session=True)
        return self

    def wait_ready(self, models: list[str] | None = None, timeout: float = 120.0) -> None:
        """Block until TorchServe answers its ping and every model has a READY worker."""
        from explainserve._generated import management_pb2, management_pb2_grpc

        from .keys import KeyFile, KeyFileError

        keys = KeyFile(self.key_file) if self.key_file else None
        deadline = time.monotonic() + timeout
        models = list(self.config.models) if models is None else models
        with grpc.insecure_channel(self.management_target) as channel:
            stub = management_pb2_grpc.ManagementAPIsServiceStub(channel)
            pending = set(models)
            log_offset = self._log_start
            while pending:
                if self.process is not None and self.process.poll() is not None:
                    raise RuntimeError(f"TorchServe exited with code {self.process.returncode}; log: {self.log_path}")
                with open(self.log_path, "rb") as log:  # a handler that cannot load is retried forever
                    log.seek(log_offset)
                    new_output = log.read()
                    log_offset += len(new_output)
                if b"Load model failed" in new_output:
                    raise RuntimeError(f"TorchServe could not load a model:\n{self.log_tail(30)}")
                if time.monotonic() > deadline:
                    raise TimeoutError(f"TorchServe models {sorted(pending)} not ready after {timeout} s; log: {self.log_path}")
                for name in list(pending):
                    try:
                        answer = stub.DescribeModel(management_pb2.DescribeModelRequest(model_name=name), timeout=5,
                                                    metadata=keys.metadata("management") if keys else None)
                    except (grpc.RpcError, KeyFileError):  # not up yet, or its keys not written yet
                        continue
                    workers = json.loads(answer.msg)[0].get("workers", [])
                    if any(worker.get("status") == "READY" for worker in workers):
                        pending.discard(name)
                time.sleep(0.5)

    def stop(self, timeout: float = 20.0) -> None:
        """Stop the process group we started (TorchServe's frontend and its workers)."""
        if self.process is None or self.process.poll() is not None:
            return
        os.killpg(self.process.pid, signal.SIGTERM)
        try:
            self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            pass
        try:  # workers left behind, or a frontend that ignored SIGTERM
            os.killpg(self.process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.process.wait()

    def log_tail(self, lines: int = 80) -> str:
        """The last lines of TorchServe's output and model log, for failure reports."""
        texts = []
        for path in (self.log_path, self.config.workdir / "logs" / "model_log.log"):
            if path.exists():
                texts.append(f"==> {path} <==\n" + log_tail(path, lines))
        return "\n".join(texts)


def stop_process_group(pid: int, timeout: float = 20.0) -> bool:
    """SIGTERM the process group led by ``pid`` (started with start_new_session by a process
    that has exited since), SIGKILL it after ``timeout`` seconds; False if it was gone."""
    try:
        os.killpg(pid, signal.SIGTERM)
    except ProcessLookupError:
        return False
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            os.killpg(pid, 0)
        except ProcessLookupError:
            return True
        time.sleep(0.1)
    try:
        os.killpg(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    return True
