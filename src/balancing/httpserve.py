"""A tiny asyncio HTTP/1.1 server: one request per connection, every resource it holds bounded.

``serve(handle, host, port, ...)`` answers each request with ``handle(method, path, body)`` → ``(status,
content type, payload)``; the path comes without its query string. Every request gets an answer:

- 400 for a malformed request line or header, 411 for a body without ``Content-Length`` (chunked), 413 for
  a body over ``max_body`` (requests with a body are refused unless ``max_body`` allows them), 414 for a
  request line and 431 for headers over ``max_header_bytes`` (or more than 100 header lines), 503 when the
  bodies being read would hold more than ``body_budget`` bytes at once; ``Expect: 100-continue`` is honoured;
- 500 when ``handle`` raises, with one log line (never a traceback).

Bounds: at most ``max_connections`` connections at once, counted from accept to the socket's close (a TLS
handshake and a graceful close included); one over the cap is closed at once without reading it (plain HTTP:
after a 503). The stream reader's buffer is ``max_header_bytes``; the body is read only up to its declared
length. The TLS handshake, reading the request, writing the answer and closing each take at most
``timeout`` seconds: a client that stalls or never reads its answer is dropped; the server shutting down
(its tasks cancelled) drops its connections quietly. Used by the agent's health endpoints
(``balancing.agent.health``, also the Services' health-check node ports) and the controller's webhook server
(``balancing.controller.server``).
"""

from __future__ import annotations

import asyncio
import logging
import re
import ssl
from collections.abc import Callable

__all__ = ["REASONS", "Handle", "serve"]

log = logging.getLogger(__name__)

Handle = Callable[[str, str, bytes], tuple[int, str, bytes]]  # (method, path, body) → (code, type, payload)

REASONS = {200: "OK", 400: "Bad Request", 404: "Not Found", 405: "Method Not Allowed", 411: "Length Required",
           413: "Payload Too Large", 414: "URI Too Long", 431: "Request Header Fields Too Large",
           500: "Internal Server Error", 503: "Service Unavailable"}  # fmt: skip
MAX_HEADERS = 100
_REQUEST_LINE = re.compile(rb"([A-Z]{1,20}) (/[\x21-\x7e]*) HTTP/1\.[01]\r?\n")
_HEADER = re.compile(rb"([!#$%&'*+.^_`|~0-9A-Za-z-]+):[ \t]*(.*?)[ \t]*\r?\n")
_CONNECTION_ERRORS = (ConnectionError, TimeoutError, asyncio.IncompleteReadError, ssl.SSLError)


class _Refused(Exception):
    """The request is answered with ``status`` without going further."""

    def __init__(self, status: int) -> None:
        super().__init__(status)
        self.status = status


class _Server:
    def __init__(
        self,
        handle: Handle,
        ssl_context: ssl.SSLContext | None,
        *,
        max_body: int,
        body_budget: int,
        timeout: float,
        max_connections: int,
        max_header_bytes: int,
    ) -> None:
        self.handle = handle
        self.ssl_context = ssl_context
        self.max_body = max_body
        self.body_budget = body_budget
        self.timeout = timeout
        self.max_connections = max_connections
        self.max_header_bytes = max_header_bytes
        self.connections = 0
        self.bodies = 0  # bytes of bodies being read or handled

    async def connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self.connections >= self.max_connections:
            if self.ssl_context is None:
                writer.write(_answer(503, *_error(503), head_only=False))
            writer.close()  # plain: the 503 is in the socket's buffer already; TLS: nothing to say
            return
        self.connections += 1
        try:
            if await self._serve(reader, writer) and await self._closed(writer):
                return
        except (*_CONNECTION_ERRORS, asyncio.CancelledError):
            pass  # a client gone or stalled, or the server shutting down: the connection goes, quietly
        except Exception as exc:  # a connection never ends in a traceback
            log.error("serving a connection failed: %s: %s", type(exc).__name__, exc)
        finally:
            self.connections -= 1
        writer.transport.abort()  # the socket is closed on the loop's next turn

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> bool:
        """Serve the one request; whether the answer went out (so the connection may close gracefully)."""
        if self.ssl_context is not None:
            await writer.start_tls(self.ssl_context, ssl_handshake_timeout=self.timeout)
        reserved = 0
        try:
            try:
                async with asyncio.timeout(self.timeout):
                    method, path, length = await self._read_head(reader, writer)
                    if length:
                        if self.bodies + length > self.body_budget:
                            raise _Refused(503)
                        reserved = length
                        self.bodies += length
                    body = await reader.readexactly(length) if length else b""
            except _Refused as refused:
                return await self._send(writer, _answer(refused.status, *_error(refused.status)))
            if method is None:
                return False  # connected and closed without a word (a TCP probe): nothing to answer
            code, ctype, payload = self._handled(method, path, body)
            return await self._send(writer, _answer(code, ctype, payload, head_only=method == "HEAD"))
        finally:
            self.bodies -= reserved

    async def _read_head(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> tuple[str | None, str, int]:
        """``(method, path, body length)``; ``method`` None when the client sent nothing at all."""
        line = await _line(reader, 414)
        if not line:
            return None, "", 0
        request = _REQUEST_LINE.fullmatch(line)
        if request is None:
            raise _Refused(400)
        headers = await self._headers(reader, len(line))
        length = _content_length(headers)
        if length > self.max_body:
            raise _Refused(413)
        if length and headers.get("expect", "").lower() == "100-continue":
            writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
        return request[1].decode(), request[2].decode().split("?")[0], length

    async def _headers(self, reader: asyncio.StreamReader, size: int) -> dict[str, str]:
        headers: dict[str, str] = {}
        for _ in range(MAX_HEADERS + 1):
            line = await _line(reader, 431)
            size += len(line)
            if size > self.max_header_bytes:
                raise _Refused(431)
            if line in (b"\r\n", b"\n"):
                return headers
            header = _HEADER.fullmatch(line)
            if header is None:  # no colon, a space before it, obsolete folding, or no line end (EOF)
                raise _Refused(400)
            name, value = header[1].decode().lower(), header[2].decode("latin-1")
            if name in headers and name == "content-length" and headers[name] != value:
                raise _Refused(400)
            headers[name] = value
        raise _Refused(431)

    def _handled(self, method: str, path: str, body: bytes) -> tuple[int, str, bytes]:
        try:
            return self.handle(method, path, body)
        except Exception as exc:  # one line, a 500, and the server goes on
            log.error("%s %s failed: %s: %s", method, path, type(exc).__name__, exc)
            return 500, *_error(500)

    async def _send(self, writer: asyncio.StreamWriter, data: bytes) -> bool:
        writer.write(data)
        await asyncio.wait_for(writer.drain(), self.timeout)
        return True

    async def _closed(self, writer: asyncio.StreamWriter) -> bool:
        """Close gracefully (TLS sends its close_notify); whether that ended within the timeout."""
        writer.close()
        try:
            await asyncio.wait_for(writer.wait_closed(), self.timeout)
        except TimeoutError:
            return False
        except (ConnectionError, ssl.SSLError):
            pass
        return True


async def _line(reader: asyncio.StreamReader, too_long: int) -> bytes:
    """One line (with its end; without one at EOF); over the reader's limit: refused with ``too_long``."""
    try:
        return await reader.readuntil(b"\n")
    except asyncio.IncompleteReadError as exc:
        return exc.partial
    except asyncio.LimitOverrunError:
        raise _Refused(too_long) from None


def _content_length(headers: dict[str, str]) -> int:
    if "transfer-encoding" in headers:
        raise _Refused(411)
    value = headers.get("content-length", "0")
    if not value.isascii() or not value.isdigit():
        raise _Refused(400)
    if len(value) > 18:
        raise _Refused(413)
    return int(value)


def _error(code: int) -> tuple[str, bytes]:
    return "application/json", f'{{"error": "{REASONS[code]}"}}'.encode()


def _answer(code: int, ctype: str, payload: bytes, *, head_only: bool = False) -> bytes:
    head = (
        f"HTTP/1.1 {code} {REASONS.get(code, 'Error')}\r\nContent-Type: {ctype}\r\n"
        "X-Content-Type-Options: nosniff\r\n"
        f"Content-Length: {len(payload)}\r\nConnection: close\r\n\r\n"
    )
    return head.encode() + (b"" if head_only else payload)


async def serve(
    handle: Handle,
    host: str,
    port: int,
    *,
    ssl_context: ssl.SSLContext | None = None,
    max_body: int = 0,
    body_budget: int | None = None,
    timeout: float = 5.0,
    max_connections: int = 64,
    max_header_bytes: int = 16 * 1024,
) -> asyncio.Server:
    """Start serving on ``host:port`` (port 0: any free port); HTTPS with ``ssl_context``. ``body_budget``
    defaults to four bodies of ``max_body``."""
    server = _Server(
        handle,
        ssl_context,
        max_body=max_body,
        body_budget=4 * max_body if body_budget is None else body_budget,
        timeout=timeout,
        max_connections=max_connections,
        max_header_bytes=max_header_bytes,
    )
    return await asyncio.start_server(server.connection, host, port, limit=max_header_bytes)
