"""balancing.httpserve: the small HTTP server behind the agent's health endpoints and the webhooks."""

from __future__ import annotations

import asyncio

import pytest

from balancing import httpserve


def echo(method: str, path: str, body: bytes) -> tuple[int, str, bytes]:
    return 200, "text/plain", f"{method} {path} {len(body)}".encode()


async def exchange(raw: bytes, *, max_body: int = 10, timeout: float = 1.0) -> bytes:
    server = await httpserve.serve(echo, "127.0.0.1", 0, max_body=max_body, timeout=timeout)
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", server.sockets[0].getsockname()[1])
        writer.write(raw)
        await writer.drain()
        answer = await asyncio.wait_for(reader.read(), 5)
        writer.close()
        return answer
    finally:
        server.close()
        await server.wait_closed()


@pytest.mark.asyncio
@pytest.mark.parametrize(
    ("raw", "status", "ends"),
    [
        (b"GET /x?y=1 HTTP/1.1\r\nHost: a\r\n\r\n", b"200 OK", b"GET /x 0"),
        (b"POST /x HTTP/1.1\r\nContent-Length: 4\r\n\r\nabcd", b"200 OK", b"POST /x 4"),
        (
            b"POST /x HTTP/1.1\r\nContent-Length: 11\r\n\r\n",
            b"413 Payload Too Large",
            b'"Payload Too Large"}',
        ),
        (b"POST /x HTTP/1.1\r\nContent-Length: x\r\n\r\n", b"400 Bad Request", b'"Bad Request"}'),
        (b"garbage\r\n\r\n", b"400 Bad Request", b'"Bad Request"}'),
        (b"GET / HTTP/1.1\r\n" + b"X: y\r\n" * 101 + b"\r\n", b"400 Bad Request", b'"Bad Request"}'),
    ],
)
async def test_requests_and_refusals(raw: bytes, status: bytes, ends: bytes) -> None:
    answer = await exchange(raw)
    assert answer.startswith(b"HTTP/1.1 " + status + b"\r\n") and answer.endswith(ends)
    assert b"\r\nConnection: close\r\n" in answer


@pytest.mark.asyncio
async def test_a_stalled_client_is_dropped() -> None:
    assert await exchange(b"GET / HTTP/1.1\r\n", timeout=0.2) == b""
