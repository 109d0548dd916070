"""balancing.httpserve's bounds under load: the connection cap holds (counted through TLS handshakes too) and
comes back, a client that never reads its answer is dropped after the timeout, bodies in flight stay within
their budget. Loopback only; every connection is closed."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import ssl
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from balancing import httpserve
from balancing.controller import load_or_generate

BIG = 16 * 1024 * 1024


def handle(method: str, path: str, body: bytes) -> tuple[int, str, bytes]:
    if path == "/big":
        return 200, "application/octet-stream", b"x" * BIG
    return 200, "text/plain", f"{method} {path} {len(body)}".encode()


@contextlib.asynccontextmanager
async def serving(**options: Any) -> AsyncIterator[int]:
    server = await httpserve.serve(handle, "127.0.0.1", 0, **options)
    try:
        yield server.sockets[0].getsockname()[1]
    finally:
        server.close()
        await server.wait_closed()


async def get(port: int, path: str = "/healthz", ssl_context: ssl.SSLContext | None = None) -> bytes:
    reader, writer = await asyncio.open_connection(
        "127.0.0.1", port, ssl=ssl_context, server_hostname="webhook.local" if ssl_context else None
    )
    try:
        writer.write(f"GET {path} HTTP/1.1\r\n\r\n".encode())
        await writer.drain()
        return await asyncio.wait_for(reader.read(), 5)
    finally:
        writer.close()


async def refused(port: int) -> bool:
    """A request is refused: a 503, or closed unanswered (the refusal's close crossed the request)."""
    try:
        answer = await get(port)
    except ConnectionError:
        return True
    return answer == b"" or answer.startswith(b"HTTP/1.1 503 ")


async def answer_within(reader: asyncio.StreamReader, seconds: float) -> bytes | None:
    """What the server sent before closing, or None if it still holds the connection after ``seconds``."""
    try:
        return await asyncio.wait_for(reader.read(), seconds)
    except TimeoutError:
        return None
    except ConnectionError:
        return b""


@pytest.mark.asyncio
async def test_connections_over_the_cap_are_refused_at_once_and_the_cap_comes_back() -> None:
    async with serving(max_connections=5, timeout=3.0) as port:
        connections: list[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = []
        try:
            for _ in range(4):  # 200 idle connections, 50 at a time (the listen backlog is 100)
                connections += await asyncio.gather(
                    *(asyncio.open_connection("127.0.0.1", port) for _ in range(50))
                )
            answers = await asyncio.gather(*(answer_within(r, 1.0) for r, _ in connections))
            held = [a for a in answers if a is None]
            refused = [a for a in answers if a is not None]
            assert len(held) == 5
            assert all(a.startswith(b"HTTP/1.1 503 ") or a == b"" for a in refused)
            assert any(a.startswith(b"HTTP/1.1 503 ") for a in refused)
        finally:
            for _, writer in connections:
                writer.close()
        await asyncio.sleep(0.1)  # the held ones end with their clients: the cap is free again
        assert (await get(port)).endswith(b"GET /healthz 0")


@pytest.mark.asyncio
async def test_a_client_that_never_reads_is_dropped_after_the_timeout() -> None:
    async with serving(max_connections=1, timeout=0.5) as port:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sock.setblocking(False)
        try:
            await asyncio.get_running_loop().sock_connect(sock, ("127.0.0.1", port))
            await asyncio.get_running_loop().sock_sendall(sock, b"GET /big HTTP/1.1\r\n\r\n")
            await asyncio.sleep(0.1)
            assert await refused(port), "the slow reader holds the only slot"
            await asyncio.sleep(0.8)  # past the write timeout: dropped
            assert (await get(port)).startswith(b"HTTP/1.1 200 ")
        finally:
            sock.close()


@pytest.mark.asyncio
async def test_a_client_that_stalls_mid_request_is_dropped_after_the_timeout() -> None:
    async with serving(max_connections=1, timeout=0.3) as port:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        try:
            writer.write(b"GET / HTTP/1.1\r\nHost: a\r\n")
            await writer.drain()
            assert await answer_within(reader, 2.0) == b""
            assert (await get(port)).startswith(b"HTTP/1.1 200 ")
        finally:
            writer.close()


@pytest.mark.asyncio
async def test_bodies_in_flight_stay_within_their_budget() -> None:
    async with serving(max_body=100, body_budget=150, timeout=2.0) as port:
        first = await asyncio.open_connection("127.0.0.1", port)
        second = await asyncio.open_connection("127.0.0.1", port)
        try:
            head = b"POST /x HTTP/1.1\r\nContent-Length: 100\r\n\r\n"
            first[1].write(head)  # the body follows later: its 100 bytes are reserved meanwhile
            await first[1].drain()
            await asyncio.sleep(0.1)
            second[1].write(head + b"y" * 100)
            await second[1].drain()
            assert (await answer_within(second[0], 2.0) or b"").startswith(b"HTTP/1.1 503 ")
            first[1].write(b"z" * 100)
            await first[1].drain()
            assert (await answer_within(first[0], 2.0) or b"").endswith(b"POST /x 100")
        finally:
            first[1].close()
            second[1].close()
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        try:
            writer.write(b"POST /x HTTP/1.1\r\nContent-Length: 100\r\n\r\n" + b"w" * 100)
            await writer.drain()
            assert (await answer_within(reader, 2.0) or b"").endswith(b"POST /x 100"), "the budget came back"
        finally:
            writer.close()


@pytest.mark.asyncio
async def test_tls_handshakes_count_against_the_cap_and_stalled_ones_are_dropped(tmp_path: Path) -> None:
    bundle = tmp_path / "ca.crt"
    context = load_or_generate(None, None, dns_names=["webhook.local"], cert_dir=tmp_path, ca_bundle=bundle)
    client = ssl.create_default_context(cafile=str(bundle))
    async with serving(ssl_context=context, max_connections=3, timeout=0.5) as port:
        assert (await get(port, ssl_context=client)).endswith(b"GET /healthz 0")
        silent = [await asyncio.open_connection("127.0.0.1", port) for _ in range(3)]  # no ClientHello
        try:
            await asyncio.sleep(0.1)
            with pytest.raises((ConnectionError, ssl.SSLError)):
                await get(port, ssl_context=client)  # over the cap: closed before any handshake
            await asyncio.sleep(0.8)  # the silent ones time out in their handshake
            assert (await get(port, ssl_context=client)).endswith(b"GET /healthz 0")
        finally:
            for _, writer in silent:
                writer.close()
