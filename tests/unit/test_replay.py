"""The datapath replay (``balancing trace``'s logic) against maps the real writer programmed in memory.

One frontend of each kind: plain, empty (refuse), session affinity, a policy's fallback tier with a
skipRedirectFromBackend client, the loop guard, QoS; and the inconsistencies a crash could leave. The kernel
counterpart (tests/kernel/test_trace.py) checks the verdicts against the backends real clients reach.
"""

from __future__ import annotations

import ipaddress

import pytest

from balancing.datapath import abi
from balancing.datapath import replay as replay_module
from balancing.datapath.maps import FakeMaps
from balancing.datapath.replay import Caller, Trace, mix_cookie, replay
from balancing.datapath.writer import MapWriter
from balancing.model.desired import (
    Backend,
    BackendPod,
    DesiredState,
    Frontend,
    FrontendKey,
    Owner,
    PodRef,
    Protocol,
)

NOW = 10_000 * 1_000_000_000
SVC = Owner("Service", "default", "web", "http")
LRP = Owner("LocalRedirectPolicy", "", "node-local-dns")
A, B, C = (Backend(ipaddress.ip_address(f"10.244.0.{i}"), 8080) for i in (1, 2, 3))
V6 = Backend(ipaddress.ip_address("fd00:244::1"), 8080)
POD_A = PodRef("default", "pod-a", "aaaa")
CGROUP_A = 777


def key(text: str = "10.96.0.10", port: int = 80, proto: Protocol = Protocol.TCP) -> FrontendKey:
    return FrontendKey(ipaddress.ip_address(text), port, proto)


def program(frontends: dict[FrontendKey, Frontend]) -> tuple[FakeMaps, MapWriter]:
    io = FakeMaps()
    writer = MapWriter(io, lambda pod: [CGROUP_A] if pod == POD_A else [])
    writer.sync(DesiredState(frontends))
    return io, writer


def lrp(
    primary: list[Backend], fallback: list[Backend] | None, *, skip: bool = False, qos: int = 0
) -> Frontend:
    pods = tuple(BackendPod(POD_A, b) for b in primary if b == A)
    return Frontend(
        LRP,
        tuple(primary),
        fallback=None if fallback is None else tuple(fallback),
        backend_pods=pods,
        skip_redirect_from_backends=skip,
        qos_limit=qos,
    )


def run(io: FakeMaps, k: FrontendKey | None = None, **caller: int) -> Trace:
    return replay(io, k or key(), Caller(now_ns=NOW, **caller))  # type: ignore[arg-type]


def picks(t: Trace) -> dict[Backend | None, float]:
    out: dict[Backend | None, float] = {}
    for o in t.outcomes:
        out[o.backend] = out.get(o.backend, 0.0) + o.probability
    return out


def test_not_a_frontend_passes_untranslated() -> None:
    io, _ = program({key(): Frontend(SVC, (A,))})
    t = run(io, key("10.96.0.99"))
    assert t.action == "pass" and t.svc_id is None and t.decided_by == "not-a-frontend"
    assert t.deterministic and t.outcomes == []
    assert "untranslated" in t.notes[0]


def test_plain_tcp_frontend_is_random_over_its_slots() -> None:
    io, writer = program({key(): Frontend(SVC, (A, B, C))})
    t = run(io)
    assert t.svc_id == writer.svc_id(key())
    assert t.action == "translate" and t.decided_by == "random" and not t.deterministic
    assert picks(t) == pytest.approx({A: 1 / 3, B: 1 / 3, C: 1 / 3})
    assert {o.result for o in t.outcomes} == {"translated"} and {o.tier for o in t.outcomes} == {"primary"}
    assert t.primary is not None and [s.backend for s in t.primary.slots] == [A, B, C]


def test_single_backend_is_deterministic() -> None:
    io, _ = program({key(): Frontend(SVC, (B,))})
    t = run(io)
    assert t.deterministic and [(o.backend, o.slot, o.result) for o in t.outcomes] == [(B, 1, "translated")]


def test_empty_frontend_refuses() -> None:
    io, _ = program({key(): Frontend(SVC, ())})
    t = run(io)
    assert t.action == "refuse" and t.decided_by == "no-primary-backend" and t.deterministic
    assert [(o.result, o.backend) for o in t.outcomes] == [("refused", None)]


def test_udp_depends_on_the_socket_unless_its_cookie_is_given() -> None:
    k = key(proto=Protocol.UDP, port=53)
    io, _ = program({k: Frontend(SVC, (A, B, C))})
    t = run(io, k)
    assert t.decided_by == "socket-cookie" and len(t.outcomes) == 3
    assert any("depends on the socket" in n for n in t.notes)
    for cookie in (1, 4097, 123456789):
        pinned = run(io, k, socket_cookie=cookie)
        assert pinned.deterministic
        assert pinned.outcomes[0].slot == mix_cookie(cookie) % 3 + 1


def test_replay_results_are_the_datapaths_forward_results() -> None:
    """A replay ends in one of the results the forward hooks count (every one but the reverse hooks' and
    north-south's)."""
    mod = replay_module
    names = {mod.TRANSLATED, mod.AFFINITY, mod.LOOP_NEXT, mod.SKIP, mod.LOOP, mod.QOS, mod.EMPTY, mod.REFUSED}
    north_south = {abi.RESULTS[r] for r in (abi.RES_NS_LOCAL, abi.RES_NS_SNAT, *abi.NS_DROPS)}
    assert names == set(abi.RESULTS.values()) - {abi.RESULTS[abi.RES_REVERSED]} - north_south


def test_mix_cookie_is_the_datapaths_hash() -> None:
    assert mix_cookie(1) == 0x9E3779B9
    assert mix_cookie(1 << 40) == ((0x9E3779B97F4A7C15 << 40) & ((1 << 64) - 1)) >> 32


def _affinity_record(io: FakeMaps, cookie: int, svc_id: int, backend_id: int, last_used: int) -> None:
    k = abi.AFF_KEY.packer.pack(cookie, svc_id, 0)
    io.update(abi.MAP_AFFINITY, [(k, abi.AFF_VAL.packer.pack(last_used, backend_id, 0))])


def test_affinity_record_decides_while_valid() -> None:
    io, writer = program({key(): Frontend(SVC, (A, B, C), affinity_timeout=30)})
    svc_id = writer.svc_id(key())
    assert svc_id is not None
    b_id = writer._backend_ids[abi.pack_backend(B.ip, B.port, Protocol.TCP)]
    _affinity_record(io, 4242, svc_id, b_id, NOW - 5 * 10**9)
    t = run(io, netns_cookie=4242)
    assert t.decided_by == "affinity" and t.mode == "affinity" and t.deterministic
    assert [(o.backend, o.result, o.slot) for o in t.outcomes] == [(B, "affinity", None)]
    assert t.affinity is not None and t.affinity.used and t.affinity.age_ns == 5 * 10**9
    # another namespace has no record: random, and a record gets written
    other = run(io, netns_cookie=1)
    assert other.decided_by == "random" and other.affinity is None
    assert any("writes a new affinity record" in n for n in other.notes)
    # unknown namespace: said so
    assert any("namespace is unknown" in n for n in run(io).notes)


def test_affinity_record_expired_or_of_a_departed_backend_is_ignored() -> None:
    io, writer = program({key(): Frontend(SVC, (A, B, C), affinity_timeout=30)})
    svc_id = writer.svc_id(key())
    assert svc_id is not None
    b_id = writer._backend_ids[abi.pack_backend(B.ip, B.port, Protocol.TCP)]
    _affinity_record(io, 4242, svc_id, b_id, NOW - 31 * 10**9)
    t = run(io, netns_cookie=4242)
    assert t.decided_by == "random" and t.affinity is not None and t.affinity.expired and not t.affinity.used
    io.delete(abi.MAP_AFFINITY_MATCH, [abi.pack_affinity_match(svc_id, b_id)])
    _affinity_record(io, 4242, svc_id, b_id, NOW - 10**9)
    t = run(io, netns_cookie=4242)
    assert t.affinity is not None and not t.affinity.matched and t.decided_by == "random"


def test_skip_redirect_from_backend_sends_the_backend_pod_to_the_fallback() -> None:
    io, _ = program({key(): lrp([A, B], [C], skip=True)})
    t = run(io, cgroup_id=CGROUP_A)
    assert t.client_rule is not None and t.client_rule.skip and t.client_rules == 1
    assert t.decided_by == "skip-redirect-from-backend" and t.deterministic
    assert [(o.backend, o.tier, o.result) for o in t.outcomes] == [
        (C, "fallback", "fallback_skip_redirect_from_backend")
    ]
    other = run(io, cgroup_id=CGROUP_A + 1)
    assert other.client_rule is None and other.decided_by == "random" and set(picks(other)) == {A, B}
    unknown = run(io)
    assert any("cgroup is unknown" in n for n in unknown.notes)


def test_loop_guard_with_two_backends_always_takes_the_other() -> None:
    io, _ = program({key(): lrp([A, B], [C])})
    t = run(io, cgroup_id=CGROUP_A)
    assert t.decided_by == "loop-guard" and t.deterministic and picks(t) == {B: pytest.approx(1.0)}
    assert {o.result for o in t.outcomes} == {"translated", "loop_guard_next"}
    assert t.primary is not None and [s.own for s in t.primary.slots] == [True, False]


def test_loop_guard_with_only_its_own_backend_uses_the_fallback_or_refuses() -> None:
    io, _ = program({key(): lrp([A], [C]), key(port=81): lrp([A], None)})
    t = run(io, cgroup_id=CGROUP_A)
    assert [(o.backend, o.result) for o in t.outcomes] == [(C, "fallback_loop_guard")]
    refused = run(io, key(port=81), cgroup_id=CGROUP_A)
    assert refused.action == "refuse" and refused.decided_by == "loop-guard"


def test_empty_primary_with_fallback_is_fallback_no_primary_backend() -> None:
    io, _ = program({key(): lrp([], [B])})
    t = run(io)
    assert t.decided_by == "no-primary-backend"
    assert [(o.backend, o.result) for o in t.outcomes] == [(B, "fallback_no_primary_backend")]


def _qos_state(io: FakeMaps, svc_id: int, limit: int, count: int, window_ns: int) -> None:
    io.update(abi.MAP_QOS, [(abi.pack_qos_key(svc_id), abi.QOS_VAL.packer.pack(limit, count, window_ns))])


def test_qos_limit_reached_uses_the_fallback_and_is_read_only() -> None:
    io, writer = program({key(): lrp([A], [C], qos=10)})
    svc_id = writer.svc_id(key())
    assert svc_id is not None
    _qos_state(io, svc_id, 10, 10, NOW - 5 * 10**8)
    before = dict(io.data[abi.MAP_QOS])
    t = run(io)
    assert t.qos is not None and t.qos.exceeded and not t.qos.expired
    assert t.decided_by == "qos-limit" and [(o.backend, o.result) for o in t.outcomes] == [
        (C, "fallback_qos")
    ]
    assert io.data[abi.MAP_QOS] == before, "the replay never writes"
    _qos_state(io, svc_id, 10, 3, NOW - 5 * 10**8)
    under = run(io)
    assert under.qos is not None and not under.qos.exceeded and picks(under) == {A: 1.0}
    assert any("counts as 4 of 10" in n for n in under.notes)
    _qos_state(io, svc_id, 10, 10, NOW - 2 * 10**9)
    expired = run(io)
    assert expired.qos is not None and expired.qos.expired and picks(expired) == {A: 1.0}


def test_missing_slot_entry_falls_through_like_the_datapath() -> None:
    io, _ = program({key(): lrp([A, B], [C])})
    io.delete(abi.MAP_SERVICES, [abi.svc_key(key().ip, 80, Protocol.TCP, 2).pack()])
    t = run(io)
    assert t.action == "translate" and picks(t) == pytest.approx({A: 0.5, C: 0.5})
    assert {o.result for o in t.outcomes if o.backend == C} == {"fallback_loop_guard"}
    assert any("slot 2" in n and "missing" in n for n in t.notes)


def test_ipv6_backend_on_an_ipv4_socket_is_refused() -> None:
    io, _ = program({key(): Frontend(SVC, (V6,))})
    assert run(io).action == "refuse"
    assert replay(io, key(), Caller(ipv4_socket=False, now_ns=NOW)).action == "translate"


def test_ipv6_frontend() -> None:
    k = key("fd00:96::10")
    io, _ = program({k: Frontend(SVC, (V6,))})
    t = run(io, k)
    assert t.deterministic and t.outcomes[0].backend == V6


def test_socket_lb_exclusions_pass_untranslated() -> None:
    """The config's flags and the skip map, as the hooks check them once the address is a frontend."""
    io, _ = program({key(): Frontend(SVC, (A, B))})
    cookie_host, cookie_pod = 11, 22
    config = abi.CONFIG.packer.pack(0, 0, 0, 0, cookie_host, 0, 0)
    io.data[abi.MAP_CONFIG] = {abi.CONFIG_KEY: abi.with_config_flags(config, abi.CFG_F_SKIP)}
    io.data[abi.MAP_SKIP] = {abi.pack_skip_key(CGROUP_A): abi.SKIP_VALUE}
    excluded = replay(io, key(), Caller(cgroup_id=CGROUP_A, now_ns=NOW))
    assert excluded.action == "pass" and excluded.decided_by == "socket-lb-excluded" and not excluded.outcomes
    assert replay(io, key(), Caller(cgroup_id=CGROUP_A + 1, now_ns=NOW)).action == "translate"
    io.data[abi.MAP_CONFIG] = {abi.CONFIG_KEY: abi.with_config_flags(config, abi.CFG_F_HOST_NS_ONLY)}
    assert replay(io, key(), Caller(netns_cookie=cookie_pod, now_ns=NOW)).action == "pass"
    assert replay(io, key(), Caller(netns_cookie=cookie_host, now_ns=NOW)).action == "translate"
