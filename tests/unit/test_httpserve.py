"""balancing.httpserve: the small HTTP server behind the agent's health endpoints and the webhooks: every
request answered with its status, handler failures as 500 with one log line. The bounds (connections,
slow clients, memory) are in ``test_server_bounds.py``."""

from __future__ import annotations

import asyncio
import logging

import pytest

from balancing import httpserve


def echo(method: str, path: str, body: bytes) -> tuple[int, str, bytes]:
    if path == "/boom":
        raise RuntimeError("the handler has a bug")
    return 200, "text/plain", f"{method} {path} {len(body)}".encode()


async def exchange(raw: bytes, *, max_body: int = 10, timeout: float = 1.0, eof: bool = True) -> bytes:
    """The answer to ``raw`` (sent, then the sending side shut down with ``eof``)."""
    server = await httpserve.serve(echo, "127.0.0.1", 0, max_body=max_body, timeout=timeout)
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", server.sockets[0].getsockname()[1])
        try:
            writer.write(raw)
            if eof:
                writer.write_eof()
            await writer.drain()
            return await asyncio.wait_for(reader.read(), 5)
        finally:
            writer.close()
    finally:
        server.close()
        await server.wait_closed()


LONG = b"x" * (17 * 1024)
HALF = b"X: " + b"y" * 9000 + b"\r\n"  # two of them: each line fits, the head does not


@pytest.mark.asyncio
@pytest.mark.parametrize(
    ("raw", "status", "ends"),
    [
        (b"GET /x?y=1 HTTP/1.1\r\nHost: a\r\n\r\n", b"200 OK", b"GET /x 0"),
        (b"POST /x HTTP/1.1\r\nContent-Length: 4\r\n\r\nabcd", b"200 OK", b"POST /x 4"),
        (b"POST /x HTTP/1.0\nContent-Length:4\n\nabcd", b"200 OK", b"POST /x 4"),
        (b"POST /x HTTP/1.1\r\nContent-Length: 11\r\n\r\n", b"413 Payload Too Large", b'Too Large"}'),
        (b"POST /x HTTP/1.1\r\nContent-Length: " + b"9" * 40 + b"\r\n\r\n", b"413 Payload Too Large", b"}"),
        (b"POST /x HTTP/1.1\r\nContent-Length: x\r\n\r\n", b"400 Bad Request", b'"Bad Request"}'),
        (b"POST /x HTTP/1.1\r\nContent-Length: \xc2\xb2\r\n\r\n", b"400 Bad Request", b"}"),
        (b"POST /x HTTP/1.1\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\nab", b"400 Bad Request", b"}"),
        (
            b"POST /x HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n1\r\na\r\n0\r\n\r\n",
            b"411 Length Required",
            b"",
        ),
        (b"garbage\r\n\r\n", b"400 Bad Request", b'"Bad Request"}'),
        (b"GET / HTTP/1.1\r\nno colon here\r\n\r\n", b"400 Bad Request", b"}"),
        (b"GET / HTTP/1.1\r\nX : y\r\n\r\n", b"400 Bad Request", b"}"),
        (b"GET / HTTP/1.1\r\nX: y\r\n folded\r\n\r\n", b"400 Bad Request", b"}"),
        (b"GET / HTTP/1.1\r\nX: y", b"400 Bad Request", b"}"),  # the client half-closes mid-header
        (b"GET /" + LONG + b" HTTP/1.1\r\n\r\n", b"414 URI Too Long", b"}"),
        (b"GET / HTTP/1.1\r\nX: " + LONG + b"\r\n\r\n", b"431 Request Header Fields Too Large", b"}"),
        (b"GET / HTTP/1.1\r\n" + HALF + HALF + b"\r\n", b"431 Request Header Fields Too Large", b"}"),
        (b"GET / HTTP/1.1\r\n" + b"X: y\r\n" * 101 + b"\r\n", b"431 Request Header Fields Too Large", b"}"),
        (b"HEAD /x HTTP/1.1\r\n\r\n", b"200 OK", b"\r\n\r\n"),
    ],
)
async def test_requests_and_refusals(raw: bytes, status: bytes, ends: bytes) -> None:
    answer = await exchange(raw)
    assert answer.startswith(b"HTTP/1.1 " + status + b"\r\n") and answer.endswith(ends)
    assert b"\r\nConnection: close\r\n" in answer


@pytest.mark.asyncio
async def test_expect_continue_is_honoured() -> None:
    answer = await exchange(b"POST /x HTTP/1.1\r\nContent-Length: 2\r\nExpect: 100-continue\r\n\r\nab")
    assert answer.startswith(b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\n")
    assert answer.endswith(b"POST /x 2")


@pytest.mark.asyncio
async def test_a_handler_failure_is_a_500_and_one_log_line(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.ERROR, logger="balancing.httpserve"):
        answer = await exchange(b"GET /boom HTTP/1.1\r\n\r\n")
    assert answer.startswith(b"HTTP/1.1 500 Internal Server Error\r\n")
    [record] = caplog.records
    assert "GET /boom failed: RuntimeError: the handler has a bug" in record.getMessage()
    assert record.exc_info is None and "Traceback" not in caplog.text


@pytest.mark.asyncio
async def test_a_stalled_client_is_dropped() -> None:
    assert await exchange(b"GET / HTTP/1.1\r\n", timeout=0.2, eof=False) == b""


@pytest.mark.asyncio
async def test_a_silent_connection_gets_no_answer() -> None:
    assert await exchange(b"") == b""
