"""Event records: the JSON schema built from a decoded ring-buffer event, its client and its owner."""

from __future__ import annotations

import ipaddress
import json

from balancing.datapath import abi
from balancing.events import record
from balancing.events.attribution import ClientPod
from balancing.model.desired import Owner

UID = "3f1c9a2e-8b7d-4c1e-9f00-123456789abc"
CID = "0123456789abcdef" * 4
EPOCH_NS = 1_767_323_045_123_456_789  # 2026-01-02T03:04:05.123456789Z


def raw_event(
    *,
    orig: tuple[str, int] = ("10.96.0.10", 80),
    backend: tuple[str, int] | None = ("10.244.1.5", 8080),
    hook: int = 1,
    proto: int = 6,
    result: int = 1,
    ts: int = 5_000_000_000,
) -> bytes:
    be_addr = abi.pack_addr(ipaddress.ip_address(backend[0])) if backend else bytes(16)
    return abi.EVENT.packer.pack(
        ts,
        5678,
        4097,
        8193,
        1234,
        17,
        abi.pack_addr(ipaddress.ip_address(orig[0])),
        be_addr,
        abi.pack_port(orig[1]),
        abi.pack_port(backend[1] if backend else 0),
        hook,
        proto,
        result,
        0,
        b"curl".ljust(16, b"\0"),
        bytes(16),  # client_addr (north-south only)
        abi.pack_port(0),
        0,
        0,
    )


def build(raw: bytes, pod: ClientPod | None = None, owner: Owner | None = None) -> dict[str, object]:
    return record.build(abi.Event.unpack(raw), pod, owner, EPOCH_NS - 5_000_000_000)


def test_a_translated_event_from_a_pod_container() -> None:
    pod = ClientPod(UID, "default", "client-0", "main", CID)
    data = build(raw_event(), pod, Owner("Service", "default", "web", "http"))
    assert data == {
        "time": "2026-01-02T03:04:05.123456789Z",
        "hook": "connect4",
        "protocol": "TCP",
        "result": "translated",
        "reason": "a backend slot of the primary tier",
        "client": {
            "pid": 1234,
            "command": "curl",
            "cgroupId": 5678,
            "netnsCookie": 4097,
            "socketCookie": 8193,
            "pod": {"namespace": "default", "name": "client-0", "container": "main", "uid": UID},
        },
        "frontend": "10.96.0.10:80",
        "backend": "10.244.1.5:8080",
        "owner": {"kind": "Service", "namespace": "default", "name": "web", "portName": "http"},
        "serviceId": 17,
    }
    assert list(data) == [
        "time",
        "hook",
        "protocol",
        "result",
        "reason",
        "client",
        "frontend",
        "backend",
        "owner",
        "serviceId",
    ]


def test_a_refused_event_from_the_host_without_owner() -> None:
    data = build(raw_event(backend=None, result=8, hook=3, proto=17))
    assert data["client"] == {
        "pid": 1234,
        "command": "curl",
        "cgroupId": 5678,
        "netnsCookie": 4097,
        "socketCookie": 8193,
        "host": True,
    }
    assert (data["hook"], data["protocol"], data["result"]) == ("sendmsg4", "UDP", "refused")
    assert data["reason"] == "no usable backend: connection refused"
    assert data["backend"] is None and data["owner"] is None


def test_ipv6_addresses_are_bracketed() -> None:
    data = build(raw_event(orig=("fd00:96::10", 443), backend=("fd00:244::1:2", 8443), hook=2))
    assert (data["frontend"], data["backend"], data["hook"]) == (
        "[fd00:96::10]:443",
        "[fd00:244::1:2]:8443",
        "connect6",
    )


def test_v4_mapped_addresses_show_as_ipv4() -> None:
    assert build(raw_event(hook=2))["frontend"] == "10.96.0.10:80"


def test_unknown_pod_and_unknown_numbers_stay_visible() -> None:
    data = build(raw_event(proto=99, result=42), ClientPod(UID, None, None, CID, CID))
    assert data["protocol"] == "99"
    assert (data["result"], data["reason"]) == ("42", "result 42")
    client = data["client"]
    assert isinstance(client, dict)
    assert client["pod"] == {"namespace": None, "name": None, "container": CID, "uid": UID}


def test_every_result_has_a_reason() -> None:
    assert set(record.REASONS) == set(abi.RESULTS.values())


def test_policy_owner_is_cluster_scoped() -> None:
    owner = Owner("LocalRedirectPolicy", "", "dns-cache", "dns")
    assert build(raw_event(result=4), None, owner)["owner"] == {
        "kind": "LocalRedirectPolicy",
        "namespace": "",
        "name": "dns-cache",
        "portName": "dns",
    }


def test_encoding_is_one_compact_json_line() -> None:
    data = build(raw_event())
    rec = record.encode(data)
    assert rec.line.endswith(b"\n") and rec.line.count(b"\n") == 1
    assert b", " not in rec.line and json.loads(rec.line) == data
    assert rec.data is data


def test_time_keeps_nanoseconds_and_leading_zeros() -> None:
    assert record.rfc3339_ns(0) == "1970-01-01T00:00:00.000000000Z"
    assert record.rfc3339_ns(EPOCH_NS) == "2026-01-02T03:04:05.123456789Z"
    assert record.rfc3339_ns(1_000_000_007) == "1970-01-01T00:00:01.000000007Z"
