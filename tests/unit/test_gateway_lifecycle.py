"""A Gateway that was never started can be stopped (a signal may arrive before start() ran)."""

from __future__ import annotations

import asyncio

from explainserve.sidecar.server import Gateway, GatewayConfig


def test_stop_before_start_does_nothing():
    gateway = Gateway(GatewayConfig())
    asyncio.run(gateway.stop(grace=0))
    assert gateway.server is None and gateway.inflight() == 0
