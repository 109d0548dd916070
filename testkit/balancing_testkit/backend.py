#!/usr/bin/env python3
"""Tiny TCP/UDP test backend ("pod") for the kernel tests, demo and benchmarks. Standard library only.

    python testkit/balancing_testkit/backend.py --name pod-a --port 8080 [--udp-port 8080] [--addr ::]

TCP: on every accepted connection send one line ``<name> <peer_ip> <peer_port>\\n`` and close
(``--keep-open``: after the line, echo whatever the client sends until it closes).
UDP: answer each datagram with ``<name> <peer_ip> <peer_port>`` to its sender.

``peer_ip`` is what the backend's kernel reports as the remote address, with IPv4-mapped IPv6
(``::ffff:a.b.c.d``) shown as plain IPv4, so it is the client's real source address in either case.

By default it listens on 0.0.0.0 and on :: (IPV6_V6ONLY) separately. ``--addr ::`` alone gives one
dual-stack socket per port, serving IPv4 and IPv6. ``--port``/``--udp-port``/``--addr`` may be repeated.
``--udp-port`` defaults to the TCP ports; ``--no-udp``/``--no-tcp`` switch a protocol off.

Prints ``READY`` on stdout once every socket is listening; exits 0 on SIGTERM/SIGINT.
"""

from __future__ import annotations

import argparse
import errno
import ipaddress
import selectors
import signal
import socket
import sys
from types import FrameType


def _norm_ip(ip: str) -> str:
    ip = ip.split("%", 1)[0]
    try:
        addr = ipaddress.ip_address(ip)
    except ValueError:
        return ip
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        return str(addr.ipv4_mapped)
    return str(addr)


def _reply(name: str, peer: tuple[object, ...]) -> bytes:
    return f"{name} {_norm_ip(str(peer[0]))} {peer[1]}".encode()


def _bind(addr: str, port: int, kind: socket.SocketKind, dual_stack: bool) -> socket.socket:
    family = socket.AF_INET6 if ":" in addr else socket.AF_INET
    sock = socket.socket(family, kind)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0 if dual_stack else 1)
        sock.bind((addr, port))
        if kind == socket.SOCK_STREAM:
            sock.listen(4096)
        sock.setblocking(False)
    except OSError as exc:
        sock.close()
        proto = "tcp" if kind == socket.SOCK_STREAM else "udp"
        raise SystemExit(f"backend: cannot listen on {proto} [{addr}]:{port}: {exc}") from exc
    return sock


class Server:
    def __init__(self, name: str, keep_open: bool) -> None:
        self.name = name
        self.keep_open = keep_open
        self.sel = selectors.DefaultSelector()

    def add_listener(self, sock: socket.socket) -> None:
        handler = self._on_accept if sock.type == socket.SOCK_STREAM else self._on_datagram
        self.sel.register(sock, selectors.EVENT_READ, handler)

    def _on_accept(self, lsock: socket.socket) -> None:
        for _ in range(64):  # drain a burst of pending connections
            try:
                conn, peer = lsock.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:  # e.g. ECONNABORTED, EMFILE: report and keep serving
                print(f"backend {self.name}: accept: {exc}", file=sys.stderr, flush=True)
                return
            line = _reply(self.name, peer) + b"\n"
            try:
                conn.setblocking(True)
                conn.settimeout(2.0)
                conn.sendall(line)
            except OSError:
                conn.close()
                continue
            if self.keep_open:
                conn.setblocking(False)
                self.sel.register(conn, selectors.EVENT_READ, self._on_echo)
            else:
                conn.close()

    def _on_echo(self, conn: socket.socket) -> None:
        try:
            data = conn.recv(65536)
            if data:
                conn.setblocking(True)
                conn.settimeout(2.0)
                conn.sendall(data)
                conn.setblocking(False)
                return
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            pass
        self.sel.unregister(conn)
        conn.close()

    def _on_datagram(self, usock: socket.socket) -> None:
        for _ in range(256):
            try:
                _data, peer = usock.recvfrom(65536)
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:  # ICMP errors queued on the socket: ignore, keep serving
                if exc.errno not in (errno.ECONNREFUSED, errno.EHOSTUNREACH, errno.ENETUNREACH):
                    print(f"backend {self.name}: recvfrom: {exc}", file=sys.stderr, flush=True)
                continue
            try:
                usock.sendto(_reply(self.name, peer), peer)
            except OSError as exc:
                print(f"backend {self.name}: sendto {peer}: {exc}", file=sys.stderr, flush=True)

    def serve_forever(self) -> None:
        while True:
            for key, _mask in self.sel.select():
                key.data(key.fileobj)


def _stop(_signum: int, _frame: FrameType | None) -> None:
    raise SystemExit(0)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--name", required=True, help="name put in every reply")
    ap.add_argument("--port", type=int, action="append", help="TCP port (repeatable; default 8080)")
    ap.add_argument("--udp-port", type=int, action="append", help="UDP port (repeatable; default: --port)")
    ap.add_argument(
        "--addr",
        action="append",
        help="listen address (repeatable; default 0.0.0.0 and ::; '::' alone = dual)",
    )
    ap.add_argument("--no-udp", action="store_true")
    ap.add_argument("--no-tcp", action="store_true")
    ap.add_argument(
        "--keep-open", action="store_true", help="TCP: after the line, echo until the peer closes"
    )
    args = ap.parse_args(argv)

    signal.signal(signal.SIGTERM, _stop)
    signal.signal(signal.SIGINT, _stop)

    tcp_ports: list[int] = [] if args.no_tcp else (args.port or [8080])
    udp_ports: list[int] = [] if args.no_udp else (args.udp_port or args.port or [8080])
    addrs: list[str] = args.addr or ["0.0.0.0", "::"]
    dual_stack = args.addr is not None and all(":" in a for a in addrs) and "::" in addrs and len(addrs) == 1

    server = Server(args.name, args.keep_open)
    for addr in addrs:
        for port in tcp_ports:
            server.add_listener(_bind(addr, port, socket.SOCK_STREAM, dual_stack))
        for port in udp_ports:
            server.add_listener(_bind(addr, port, socket.SOCK_DGRAM, dual_stack))
    print("READY", flush=True)
    try:
        server.serve_forever()
    except SystemExit as exc:
        return int(exc.code or 0)
    return 0


if __name__ == "__main__":
    sys.exit(main())
