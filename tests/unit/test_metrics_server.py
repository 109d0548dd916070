"""The metrics server bounds its cost: at most ``max_connections`` scrapes at once (more are closed unread),
and a client that stalls mid-request is dropped after the idle timeout. Loopback only, bounded loops."""

from __future__ import annotations

import socket
import time
import urllib.request

import pytest

from balancing.metrics import Metrics, control


def idle_connection(port: int) -> socket.socket:
    s = socket.create_connection(("127.0.0.1", port), timeout=5)
    s.sendall(b"GET /metrics HTTP/1.1\r\nHost: x\r\n")  # half a request, never finished
    return s


def closed_by_peer(s: socket.socket, within: float) -> bool:
    s.settimeout(within)
    try:
        return s.recv(1) == b""
    except TimeoutError:
        return False
    except ConnectionResetError:
        return True


def test_connections_over_the_cap_are_closed_and_stalled_ones_dropped(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(control._QuietHandler, "timeout", 0.5)
    server = Metrics(process=False).serve("127.0.0.1", 0, max_connections=2)
    held: list[socket.socket] = []
    try:
        held = [idle_connection(server.port) for _ in range(2)]
        time.sleep(0.1)  # both accepted and holding their slots
        extra = idle_connection(server.port)
        held.append(extra)
        assert closed_by_peer(extra, 2.0)  # over the cap: closed unread
        assert all(closed_by_peer(s, 3.0) for s in held[:2])  # stalled: dropped after the idle timeout
        with urllib.request.urlopen(f"http://127.0.0.1:{server.port}/metrics", timeout=5) as r:
            assert r.status == 200 and b"balancing_" in r.read()  # the slots came back
    finally:
        for s in held:
            s.close()
        server.close()
