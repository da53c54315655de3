"""free_port never hands out a port twice in a row of 2,048 picks: the kernel's random picks for
bind(0) repeat among 2,000 (about 140 repeated pairs expected from ~14,000 odd ports), and a
second server on a repeated port could not listen."""

from __future__ import annotations

import socket

from explainserve.sidecar.torchserve import HANDED_OUT, free_port


def test_two_thousand_picks_are_distinct_and_free():
    ports = [free_port() for _ in range(2000)]
    assert len(set(ports)) == len(ports)
    assert list(HANDED_OUT)[-2000:] == ports
    with socket.socket() as server:  # the last one is free to listen on
        server.bind(("127.0.0.1", ports[-1]))
        server.listen()
