"""A tiny asyncio HTTP/1.1 server: one request per connection, headers and body bounded, never blocking.

``serve(handle, host, port, ssl=None, max_body=0)`` answers each request with ``handle(method, path, body)``
→ ``(status, content type, payload)``; the path comes without its query string. A malformed request gets
400, a body over ``max_body`` 413 (requests with a body are refused unless ``max_body`` allows them), a
client that stalls is dropped after ``timeout`` seconds. Used by the agent's health endpoints
(``balancing.health``, also the Services' health-check node ports) and the controller's webhook server
(``balancing.controller.server``).
"""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import Callable

__all__ = ["REASONS", "Handle", "serve"]

Handle = Callable[[str, str, bytes], tuple[int, str, bytes]]  # (method, path, body) → (code, type, payload)

REASONS = {200: "OK", 400: "Bad Request", 404: "Not Found", 405: "Method Not Allowed",
           413: "Payload Too Large", 503: "Service Unavailable"}  # fmt: skip
_MAX_HEADERS = 100


async def _read_request(reader: asyncio.StreamReader, max_body: int) -> tuple[str, str, bytes] | int:
    """``(method, path, body)``, or the status to answer a malformed request with."""
    parts = (await reader.readline()).decode(errors="replace").split()
    if len(parts) < 2:
        return 400
    length = 0
    for _ in range(_MAX_HEADERS):
        header = await reader.readline()
        if header in (b"\r\n", b"\n", b""):
            break
        name, _, value = header.decode(errors="replace").partition(":")
        if name.strip().lower() == "content-length":
            if not value.strip().isdigit():
                return 400
            length = int(value.strip())
    else:
        return 400
    if length > max_body:
        return 413
    body = await reader.readexactly(length) if length else b""
    return parts[0].upper(), parts[1].split("?")[0], body


async def _serve_one(
    handle: Handle, max_body: int, timeout: float, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
) -> None:
    try:
        request = await asyncio.wait_for(_read_request(reader, max_body), timeout)
        if isinstance(request, int):
            code, ctype = request, "application/json"
            payload = f'{{"error": "{REASONS[request]}"}}'.encode()
        else:
            code, ctype, payload = handle(*request)
        writer.write(
            f"HTTP/1.1 {code} {REASONS.get(code, 'Error')}\r\nContent-Type: {ctype}\r\n"
            "X-Content-Type-Options: nosniff\r\n"
            f"Content-Length: {len(payload)}\r\nConnection: close\r\n\r\n".encode()
            + payload
        )
        await writer.drain()
    except (TimeoutError, ConnectionError, asyncio.IncompleteReadError, ssl.SSLError):
        pass
    finally:
        writer.close()


async def serve(
    handle: Handle,
    host: str,
    port: int,
    *,
    ssl_context: ssl.SSLContext | None = None,
    max_body: int = 0,
    timeout: float = 5.0,
) -> asyncio.Server:
    """Start serving on ``host:port`` (port 0: any free port); HTTPS with ``ssl_context``."""
    return await asyncio.start_server(
        lambda r, w: _serve_one(handle, max_body, timeout, r, w),
        host,
        port,
        ssl=ssl_context,
        ssl_handshake_timeout=timeout if ssl_context is not None else None,
    )
