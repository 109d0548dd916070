#!/usr/bin/env python3
"""Test client for the kernel tests, demo and benchmarks. Standard library only.

    python testkit/balancing_testkit/client.py MODE HOST PORT [--count N] [--family 4|6|mapped] [--timeout S]
        [--details]

Modes (every mode prints exactly one JSON object as the last line of stdout and exits 0, also when
connections fail; exit status 2 means bad arguments):

  tcp              N sequential connects; read the backend's line; close.
  udp-unconnected  one socket; N x (sendto HOST:PORT, recvfrom the reply).
  udp-connected    N x (new socket, connect, send, recv); ``--reuse`` = one connected socket for all N.
  getpeername      like tcp (default N=1) and also reports ``peername``/``sockname`` of the first success.
  loop             connect repeatedly (``--proto tcp|udp``) until SIGTERM/SIGINT, ``--duration`` or
                   ``--count``;
                   prints ``READY`` on stdout after the first attempt, then the JSON object at the end.

``--family mapped`` uses an AF_INET6 socket towards ``::ffff:HOST`` (HOST must be IPv4).

Common JSON keys: mode, family, target [ip, port], attempts, ok, failed,
  errors {NAME: n}     connect-phase errors by errno name (EHOSTUNREACH, ECONNREFUSED, EPERM, ...),
                       later phases prefixed ("send:", "recv:"); a timeout is "TIMEOUT", an EOF before
                       the reply "recv:EOF";
  backends {name: n}   who answered;
  seen_by_backend      sorted unique client IPs as the backends reported them;
  peernames            (tcp/udp-connected) sorted unique [ip, port] from getpeername();
  reply_sources        (udp) sorted unique [ip, port] as returned by recvfrom();
  latency_us           {n, min, mean, p50, p90, p99, max} of connect() (udp-unconnected: sendto->reply);
  self                 {pid, cgroup (v2 path), netns (inode)} of the client process;
  elapsed_s            wall time of the whole run;
  details              (with --details) one record per attempt.
"""

from __future__ import annotations

import argparse
import errno
import ipaddress
import json
import os
import signal
import socket
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from types import FrameType
from typing import Any


def errname(exc: BaseException) -> str:
    if isinstance(exc, TimeoutError) and getattr(exc, "errno", None) in (None, 0):
        return "TIMEOUT"
    if isinstance(exc, OSError) and exc.errno is not None:
        return errno.errorcode.get(exc.errno, f"E{exc.errno}")
    return type(exc).__name__


def addr_pair(addr: Any) -> list[Any]:
    return [str(addr[0]).split("%", 1)[0], int(addr[1])]


def resolve_target(host: str, port: int, family: str) -> tuple[socket.AddressFamily, tuple[Any, ...]]:
    ip = ipaddress.ip_address(host)
    if family == "4":
        if ip.version != 4:
            raise ValueError(f"--family 4 needs an IPv4 HOST, got {host}")
        return socket.AF_INET, (str(ip), port)
    if family == "6":
        if ip.version != 6:
            raise ValueError(f"--family 6 needs an IPv6 HOST, got {host}")
        return socket.AF_INET6, (str(ip), port, 0, 0)
    # mapped
    if ip.version == 4:
        return socket.AF_INET6, (f"::ffff:{ip}", port, 0, 0)
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return socket.AF_INET6, (f"::ffff:{ip.ipv4_mapped}", port, 0, 0)
    raise ValueError(f"--family mapped needs an IPv4 (or ::ffff:) HOST, got {host}")


def self_info() -> dict[str, Any]:
    cgroup = ""
    try:
        with open("/proc/self/cgroup") as f:
            for line in f:
                if line.startswith("0::"):
                    cgroup = line[3:].strip()
    except OSError:
        pass
    return {"pid": os.getpid(), "cgroup": cgroup, "netns": os.stat("/proc/self/ns/net").st_ino}


def stats_us(samples: list[float]) -> dict[str, float] | None:
    if not samples:
        return None
    s = sorted(samples)
    n = len(s)

    def pct(p: float) -> float:
        return round(s[min(n - 1, int(p * n))] * 1e6, 1)

    return {
        "n": n,
        "min": round(s[0] * 1e6, 1),
        "mean": round(sum(s) / n * 1e6, 1),
        "p50": pct(0.50),
        "p90": pct(0.90),
        "p99": pct(0.99),
        "max": round(s[-1] * 1e6, 1),
    }


def parse_reply(data: bytes) -> tuple[str, list[Any] | None]:
    parts = data.decode(errors="replace").strip().split()
    if len(parts) >= 3:
        try:
            return parts[0], [parts[1], int(parts[2])]
        except ValueError:
            pass
    return (parts[0] if parts else "?"), None


@dataclass
class Tally:
    details_wanted: bool
    attempts: int = 0
    ok: int = 0
    errors: Counter[str] = field(default_factory=Counter)
    backends: Counter[str] = field(default_factory=Counter)
    seen: set[str] = field(default_factory=set)
    peernames: set[tuple[str, int]] = field(default_factory=set)
    reply_sources: set[tuple[str, int]] = field(default_factory=set)
    latencies: list[float] = field(default_factory=list)
    details: list[dict[str, Any]] = field(default_factory=list)
    first: dict[str, Any] | None = None

    def record(self, rec: dict[str, Any]) -> None:
        self.attempts += 1
        if rec.get("error"):
            self.errors[rec["error"]] += 1
        else:
            self.ok += 1
            if self.first is None:
                self.first = rec
        if rec.get("backend"):
            self.backends[rec["backend"]] += 1
        if rec.get("backend_saw"):
            self.seen.add(rec["backend_saw"][0])
        if rec.get("peername"):
            self.peernames.add(tuple(rec["peername"]))
        if rec.get("reply_from"):
            self.reply_sources.add(tuple(rec["reply_from"]))
        if rec.get("latency") is not None:
            self.latencies.append(rec.pop("latency"))
            if self.details_wanted:
                rec["latency_us"] = round(self.latencies[-1] * 1e6, 1)
        if self.details_wanted:
            self.details.append(rec)

    def result(self, mode: str, family: str, target: tuple[Any, ...]) -> dict[str, Any]:
        out: dict[str, Any] = {
            "mode": mode,
            "family": family,
            "target": addr_pair(target),
            "attempts": self.attempts,
            "ok": self.ok,
            "failed": self.attempts - self.ok,
            "errors": dict(sorted(self.errors.items())),
            "backends": dict(sorted(self.backends.items())),
            "seen_by_backend": sorted(self.seen),
            "peernames": sorted([list(p) for p in self.peernames]),
            "reply_sources": sorted([list(p) for p in self.reply_sources]),
            "latency_us": stats_us(self.latencies),
            "self": self_info(),
        }
        if self.details_wanted:
            out["details"] = self.details
        return out


def recv_line(sock: socket.socket) -> bytes:
    buf = b""
    while b"\n" not in buf:
        chunk = sock.recv(4096)
        if not chunk:
            break
        buf += chunk
    return buf


def tcp_once(family: socket.AddressFamily, target: tuple[Any, ...], timeout: float) -> dict[str, Any]:
    rec: dict[str, Any] = {}
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.settimeout(timeout)
        t0 = time.perf_counter()
        try:
            sock.connect(target)
        except OSError as exc:
            rec["error"] = errname(exc)
            return rec
        rec["latency"] = time.perf_counter() - t0
        rec["sockname"] = addr_pair(sock.getsockname())
        try:
            rec["peername"] = addr_pair(sock.getpeername())
        except OSError as exc:
            rec["error"] = "getpeername:" + errname(exc)
            return rec
        try:
            data = recv_line(sock)
        except OSError as exc:
            rec["error"] = "recv:" + errname(exc)
            return rec
        if not data:
            rec["error"] = "recv:EOF"
            return rec
        rec["backend"], rec["backend_saw"] = parse_reply(data)
        return rec
    finally:
        sock.close()


def udp_connected_once(
    sock: socket.socket | None, family: socket.AddressFamily, target: tuple[Any, ...], timeout: float
) -> tuple[dict[str, Any], socket.socket | None]:
    """One request on `sock` (connecting a new socket first if None). Returns the record and the socket."""
    rec: dict[str, Any] = {}
    if sock is None:
        sock = socket.socket(family, socket.SOCK_DGRAM)
        sock.settimeout(timeout)
        try:
            sock.connect(target)
        except OSError as exc:
            sock.close()
            rec["error"] = errname(exc)
            return rec, None
    t0 = time.perf_counter()
    try:
        rec["sockname"] = addr_pair(sock.getsockname())
        rec["peername"] = addr_pair(sock.getpeername())
    except OSError as exc:
        rec["error"] = "getpeername:" + errname(exc)
        return rec, sock
    try:
        sock.send(b"ping")
    except OSError as exc:
        rec["error"] = "send:" + errname(exc)
        return rec, sock
    try:
        data, src = sock.recvfrom(65536)
    except OSError as exc:
        rec["error"] = "recv:" + errname(exc)
        return rec, sock
    rec["latency"] = time.perf_counter() - t0
    rec["reply_from"] = addr_pair(src)
    rec["backend"], rec["backend_saw"] = parse_reply(data)
    return rec, sock


def run_tcp(args: argparse.Namespace, family: socket.AddressFamily, target: tuple[Any, ...]) -> Tally:
    tally = Tally(args.details)
    for _ in range(args.count):
        tally.record(tcp_once(family, target, args.timeout))
        if args.interval:
            time.sleep(args.interval)
    return tally


def run_udp_connected(
    args: argparse.Namespace, family: socket.AddressFamily, target: tuple[Any, ...]
) -> Tally:
    tally = Tally(args.details)
    sock: socket.socket | None = None
    try:
        for _ in range(args.count):
            rec, sock = udp_connected_once(sock if args.reuse else None, family, target, args.timeout)
            tally.record(rec)
            if not args.reuse and sock is not None:
                sock.close()
                sock = None
            if args.interval:
                time.sleep(args.interval)
    finally:
        if sock is not None:
            sock.close()
    return tally


def run_udp_unconnected(
    args: argparse.Namespace, family: socket.AddressFamily, target: tuple[Any, ...]
) -> Tally:
    tally = Tally(args.details)
    with socket.socket(family, socket.SOCK_DGRAM) as sock:
        sock.settimeout(args.timeout)
        for i in range(args.count):
            rec: dict[str, Any] = {}
            t0 = time.perf_counter()
            try:
                sock.sendto(f"ping {i}".encode(), target)
            except OSError as exc:
                rec["error"] = errname(exc)
                tally.record(rec)
                continue
            try:
                data, src = sock.recvfrom(65536)
            except OSError as exc:
                rec["error"] = "recv:" + errname(exc)
                tally.record(rec)
                continue
            rec["latency"] = time.perf_counter() - t0
            rec["reply_from"] = addr_pair(src)
            rec["backend"], rec["backend_saw"] = parse_reply(data)
            tally.record(rec)
            if args.interval:
                time.sleep(args.interval)
    return tally


_stop_requested = False


def _request_stop(_signum: int, _frame: FrameType | None) -> None:
    global _stop_requested  # noqa: PLW0603
    _stop_requested = True


def run_loop(
    args: argparse.Namespace, family: socket.AddressFamily, target: tuple[Any, ...]
) -> tuple[Tally, dict[str, Any]]:
    signal.signal(signal.SIGTERM, _request_stop)
    signal.signal(signal.SIGINT, _request_stop)
    tally = Tally(args.details)
    timeline: list[list[Any]] = []
    start = time.monotonic()
    deadline = start + args.duration if args.duration else None
    ready_printed = False
    while not _stop_requested:
        if deadline is not None and time.monotonic() >= deadline:
            break
        if args.count_given and tally.attempts >= args.count:
            break
        if args.proto == "tcp":
            rec = tcp_once(family, target, args.timeout)
        else:
            rec, sock = udp_connected_once(None, family, target, args.timeout)
            if sock is not None:
                sock.close()
        if rec.get("error") and len(timeline) < args.max_timeline:
            timeline.append([round(time.monotonic() - start, 6), rec["error"]])
        tally.record(rec)
        if not ready_printed:
            print("READY", flush=True)
            ready_printed = True
        if args.interval:
            time.sleep(args.interval)
    elapsed = time.monotonic() - start
    extra = {
        "proto": args.proto,
        "duration_s": round(elapsed, 3),
        "rate_per_s": round(tally.attempts / elapsed, 1) if elapsed > 0 else 0.0,
        "error_timeline": timeline,
    }
    return tally, extra


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("mode", choices=["tcp", "udp-unconnected", "udp-connected", "getpeername", "loop"])
    ap.add_argument("host", help="IP literal (IPv4 for --family 4/mapped, IPv6 for --family 6)")
    ap.add_argument("port", type=int)
    ap.add_argument("--family", choices=["4", "6", "mapped"], default=None, help="default: from HOST")
    ap.add_argument("--count", type=int, default=None, help="attempts (default 1; loop: unlimited)")
    ap.add_argument("--timeout", type=float, default=2.0, help="per-operation socket timeout, seconds")
    ap.add_argument("--interval", type=float, default=0.0, help="sleep between attempts, seconds")
    ap.add_argument("--details", action="store_true", help="include one record per attempt")
    ap.add_argument("--reuse", action="store_true", help="udp-connected: one socket for all datagrams")
    ap.add_argument("--proto", choices=["tcp", "udp"], default="tcp", help="loop: protocol")
    ap.add_argument("--duration", type=float, default=0.0, help="loop: stop after this many seconds")
    ap.add_argument("--max-timeline", type=int, default=200, help="loop: keep at most this many error events")
    args = ap.parse_args(argv)

    args.count_given = args.count is not None
    if args.count is None:
        args.count = 1
    if args.count < 0:
        ap.error("--count must be >= 0")
    family_opt = args.family or ("6" if ":" in args.host else "4")
    try:
        family, target = resolve_target(args.host, args.port, family_opt)
    except ValueError as exc:
        ap.error(str(exc))

    extra: dict[str, Any] = {}
    t_start = time.perf_counter()
    if args.mode in ("tcp", "getpeername"):
        tally = run_tcp(args, family, target)
    elif args.mode == "udp-connected":
        tally = run_udp_connected(args, family, target)
    elif args.mode == "udp-unconnected":
        tally = run_udp_unconnected(args, family, target)
    else:
        tally, extra = run_loop(args, family, target)

    out = tally.result(args.mode, family_opt, target)
    out["elapsed_s"] = round(time.perf_counter() - t_start, 6)
    out.update(extra)
    if args.mode == "getpeername":
        first = tally.first or {}
        out["peername"] = first.get("peername")
        out["sockname"] = first.get("sockname")
        out["backend"] = first.get("backend")
        out["error"] = next(iter(tally.errors), None)
    sys.stdout.write(json.dumps(out, sort_keys=False) + "\n")
    sys.stdout.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main())
