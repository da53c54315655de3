"""A Gateway that was never started can be stopped (a signal may arrive before start() ran), and
one that exits while starting is reported with the end of its log."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from explainserve.sidecar.local import start_gateway, wait_serving
from explainserve.sidecar.server import Gateway, GatewayConfig
from explainserve.sidecar.torchserve import log_tail


def test_stop_before_start_does_nothing():
    gateway = Gateway(GatewayConfig())
    asyncio.run(gateway.stop(grace=0))
    assert gateway.server is None and gateway.inflight() == 0


def test_a_gateway_that_exits_at_start_is_reported_with_the_end_of_its_log(tmp_path):
    # Unreachable TorchServe targets are fine: the flag is refused before anything connects.
    process, target, _ = start_gateway(tmp_path, "127.0.0.1:9", "127.0.0.1:9", extra_args=("--drain-seconds", "-1"))
    with pytest.raises(RuntimeError) as raised:
        wait_serving(target, timeout=60, process=process)
    message = str(raised.value)
    assert message.startswith("the gateway exited with code 2; the end of ")
    assert "explainserve sidecar: error: --drain-seconds must be 0 or positive seconds" in message


def test_an_unreadable_log_is_named_instead():
    assert log_tail(Path("/nonexistent/gateway.log")).startswith("(its log /nonexistent/gateway.log cannot be read: ")
