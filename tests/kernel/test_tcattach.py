"""TC attachment on the real kernel: tcx links and clsact filters pinned, swapped, moved and detached.

Each test owns two network namespaces of a ``Topology`` joined by a veth pair: ``tcv0`` (10.199.0.1) in the
"node" namespace, where the attaching thread runs as the agent does, and ``tcv1`` (10.199.0.2) in the
"peer". The programs are tiny SCHED_CLS objects compiled here (the real nodeport.o is tested elsewhere), in
two variants that differ in code, so their tags differ, and that each count the packets they see in a map
of their own. UDP datagrams echoed across the veth are the traffic. Everything (namespaces with their
devices and filters, the bpffs directory with its pins and thus its links) goes with the topology.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import socket
import struct
import subprocess
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from balancing import errors
from balancing.datapath import libbpf, tcattach
from balancing.datapath.tcattach import Direction, Mechanism
from balancing_testkit.topology import Topology, in_netns, ip_batch, netns_path

NODE_IP, PEER_IP = "10.199.0.1", "10.199.0.2"
DEVICE = "tcv0"
MODES: list[Mechanism] = ["tcx", "clsact"]

COUNTER = """
#include <linux/bpf.h>
#include <linux/pkt_cls.h>
#include <bpf/bpf_helpers.h>

char LICENSE[] SEC("license") = "GPL";

struct {
    __uint(type, BPF_MAP_TYPE_ARRAY);
    __uint(max_entries, 2);
    __type(key, __u32);
    __type(value, __u64);
} tc_packets SEC(".maps");

SEC("tc")
int tc_count(struct __sk_buff *skb)
{
    __u32 slot = VARIANT;
    __u64 *n = bpf_map_lookup_elem(&tc_packets, &slot);

    if (n)
        __sync_fetch_and_add(n, 1);
    return TC_ACT_OK;
}
"""


def _tcx_or_skip(mode: Mechanism) -> None:
    if mode == "tcx" and not tcattach.tcx_supported():
        pytest.skip("this kernel has no tcx (Linux >= 6.6)")


@pytest.fixture(scope="module")
def variants(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """The counter program built twice: variant 0 counts in slot 0, variant 1 in slot 1."""
    d = tmp_path_factory.mktemp("tcprogs")
    src = d / "counter.c"
    src.write_text(COUNTER)
    arch = subprocess.run(["gcc", "-print-multiarch"], check=True, capture_output=True, text=True).stdout
    cflags = ["-O2", "-g", "-Wall", "-Werror", "-target", "bpf", f"-I/usr/include/{arch.strip()}"]
    objects = []
    for variant in (0, 1):
        obj = d / f"counter{variant}.o"
        subprocess.run(["clang", *cflags, f"-DVARIANT={variant}", "-c", str(src), "-o", str(obj)], check=True)
        objects.append(obj)
    return objects[0], objects[1]


@dataclass(frozen=True)
class Prog:
    fd: int
    id: int
    map_fd: int
    slot: int

    def packets(self) -> int:
        raw = libbpf.map_lookup(self.map_fd, struct.pack("=I", self.slot), 8)
        assert raw is not None
        return int(struct.unpack("=Q", raw)[0])


@contextlib.contextmanager
def loaded(path: Path, slot: int) -> Iterator[Prog]:
    obj = libbpf.object_open(str(path))
    try:
        libbpf.object_load(obj)
        fd = libbpf.program_fd(next(libbpf.programs(obj)))
        info = libbpf.ProgInfo()
        libbpf.obj_get_info(fd, info)
        yield Prog(fd, int(info.id), libbpf.map_fd(next(libbpf.maps(obj))), slot)
    finally:
        libbpf.object_close(obj)


@dataclass
class Net:
    node: str
    peer: str
    links: Path

    def pin(self, program: str = "tc_count", device: str = DEVICE) -> Path:
        return self.links / tcattach.pin_name(program, device)

    def ifindex(self, device: str = DEVICE) -> int:
        with in_netns(self.node):
            return tcattach.ifindex_of(device)

    def attach(
        self, prog: Prog, direction: Direction = "ingress", *, mode: Mechanism, device: str = DEVICE
    ) -> str:
        with in_netns(self.node):
            ifindex = tcattach.ifindex_of(device)
            return tcattach.attach(prog.fd, ifindex, direction, self.pin(device=device), mode=mode)

    def detach(self, device: str = DEVICE) -> None:
        with in_netns(self.node):
            tcattach.detach(self.pin(device=device))

    def attached(self, device: str = DEVICE) -> tcattach.AttachInfo | None:
        with in_netns(self.node):
            return tcattach.attached(self.pin(device=device))

    def add_veth(self, device: str = DEVICE, peer_device: str = "tcv1") -> None:
        ip_batch(self.node, [f"link add {device} type veth peer name {peer_device} netns {self.peer}"])
        ip_batch(self.node, [f"addr add {NODE_IP}/24 dev {device}", f"link set {device} up"])
        ip_batch(self.peer, [f"addr add {PEER_IP}/24 dev {peer_device}", f"link set {peer_device} up"])

    def tc(self, *args: str) -> Any:
        out = subprocess.run(
            ["nsenter", f"--net={netns_path(self.node)}", "tc", "-j", *args],
            check=True,
            capture_output=True,
            text=True,
        ).stdout
        return json.loads(out) if out.strip() else []

    def filters(self, direction: Direction, device: str = DEVICE) -> list[dict[str, Any]]:
        """The filters with a program on the device's clsact hook (``tc filter show``)."""
        shown = self.tc("filter", "show", "dev", device, direction)
        return [f for f in shown if "options" in f]

    def has_clsact(self, device: str = DEVICE) -> bool:
        return any(q.get("kind") == "clsact" for q in self.tc("qdisc", "show", "dev", device))


def tcx_links() -> dict[int, int]:
    """Every tcx link of the machine, as bpftool lists them: link id -> prog id."""
    out = subprocess.run(["bpftool", "-j", "link", "list"], check=True, capture_output=True, text=True).stdout
    return {
        link["id"]: link["prog_id"]
        for link in json.loads(out or "[]")
        if link.get("type") in (libbpf.BPF_LINK_TYPE_TCX, "tcx")
    }


def tcx_link_id(pin: Path) -> int:
    fd = libbpf.obj_get(str(pin))
    try:
        info = libbpf.TcxLinkInfo()
        libbpf.obj_get_info(fd, info)
        return int(info.id)
    finally:
        os.close(fd)


@pytest.fixture
def net(topology: Topology) -> Net:
    n = Net(topology.add_netns("node"), topology.add_netns("peer"), topology.bpffs / "links")
    n.links.mkdir(parents=True)
    n.add_veth()
    return n


class Echo:
    """A UDP echo server in the node namespace and a client in the peer's: each exchange crosses tcv0's
    ingress (the request) and egress (the reply)."""

    def __init__(self, net: Net) -> None:
        with in_netns(net.node):
            self.server = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.server.bind((NODE_IP, 0))
        self.server.settimeout(0.2)
        with in_netns(net.peer):
            self.client = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.client.settimeout(1.0)
        self.client.connect(self.server.getsockname())
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while not self._stop.is_set():
            try:
                data, addr = self.server.recvfrom(64)
            except TimeoutError:
                continue
            self.server.sendto(data, addr)

    def exchange(self, count: int) -> int:
        """Send ``count`` datagrams one after the other; how many came back."""
        return sum(self._round_trip(i) for i in range(count))

    def exchange_until(self, stop: threading.Event) -> tuple[int, int]:
        """Exchange datagrams one after the other until ``stop`` is set: (sent, came back)."""
        sent = answered = 0
        while not stop.is_set():
            answered += self._round_trip(sent)
            sent += 1
        return sent, answered

    def _round_trip(self, i: int) -> bool:
        payload = i.to_bytes(4, "big")
        self.client.send(payload)
        try:
            return self.client.recv(64) == payload
        except TimeoutError:
            return False

    def close(self) -> None:
        self._stop.set()
        self._thread.join()
        self.server.close()
        self.client.close()


@pytest.fixture
def echo(net: Net) -> Iterator[Echo]:
    e = Echo(net)
    yield e
    e.close()


# --- the mechanism and the ABI -------------------------------------------------------------------------


def test_the_constants_are_the_kernels() -> None:
    dump = subprocess.run(
        ["bpftool", "btf", "dump", "file", "/sys/kernel/btf/vmlinux"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout

    def value(name: str) -> int | None:
        m = re.search(rf"'{name}' val=(\d+)", dump)
        return int(m.group(1)) if m else None

    assert tcattach.tcx_supported() == (value("BPF_TCX_INGRESS") is not None)
    if tcattach.tcx_supported():
        assert value("BPF_TCX_INGRESS") == libbpf.BPF_TCX_INGRESS
        assert value("BPF_TCX_EGRESS") == libbpf.BPF_TCX_EGRESS
        assert value("BPF_LINK_TYPE_TCX") == libbpf.BPF_LINK_TYPE_TCX
    assert value("BPF_PROG_TYPE_SCHED_CLS") == libbpf.BPF_PROG_TYPE_SCHED_CLS


def test_pin_names() -> None:
    assert tcattach.pin_name("bl_ns_ingress", "eth0") == "bl_ns_ingress@eth0"
    assert tcattach.pin_name("bl_ns_egress", "bond0.100") == "bl_ns_egress@bond0:100"
    bad = [
        ("bl_ns_ingress", "a/b"),
        ("", "eth0"),
        ("bl_ns_ingress", ".."),
        ("p", ""),
        ("p", "a:b"),
        ("a.b", "x"),
    ]
    for program, device in bad:
        with pytest.raises(ValueError):
            tcattach.pin_name(program, device)


# --- attach, swap, detach ------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", MODES)
def test_attach_swap_detach(mode: Mechanism, net: Net, echo: Echo, variants: tuple[Path, Path]) -> None:
    _tcx_or_skip(mode)
    with loaded(variants[0], 0) as a, loaded(variants[1], 1) as b:
        assert net.attach(a, mode=mode) == "attached"
        info = net.attached()
        assert info == tcattach.AttachInfo(net.ifindex(), "ingress", a.id, mode) and info.live
        if mode == "tcx":
            link_id = tcx_link_id(net.pin())
            assert tcx_links()[link_id] == a.id
        else:
            [shown] = net.filters("ingress")
            assert shown["options"]["prog"]["id"] == a.id and shown["options"]["direct-action"]
            assert shown["pref"] == tcattach.CLSACT_PRIORITY
            assert int(shown["options"]["handle"], 16) == tcattach.CLSACT_HANDLE
        assert echo.exchange(20) == 20
        assert a.packets() >= 20  # the requests (and maybe ARP)

        assert net.attach(a, mode=mode) == "unchanged"
        assert net.attach(b, mode=mode) == "swapped"
        info = net.attached()
        assert info is not None and info.prog_id == b.id
        if mode == "tcx":
            assert tcx_link_id(net.pin()) == link_id  # the same link, now running b
            assert tcx_links()[link_id] == b.id
        else:
            assert [f["options"]["prog"]["id"] for f in net.filters("ingress")] == [b.id]
        before_a = a.packets()
        assert echo.exchange(20) == 20
        assert b.packets() >= 20 and a.packets() == before_a

        net.detach()
        assert not net.pin().exists() and not net.pin().is_symlink() and net.attached() is None
        if mode == "tcx":
            assert link_id not in tcx_links()
        else:
            assert net.filters("ingress") == [] and not net.has_clsact()  # the qdisc was ours
        before_b = b.packets()
        assert echo.exchange(5) == 5
        assert b.packets() == before_b
        net.detach()  # twice is fine
    assert list(net.links.iterdir()) == []


@pytest.mark.parametrize("mode", MODES)
def test_traffic_flows_while_programs_are_swapped(
    mode: Mechanism, net: Net, echo: Echo, variants: tuple[Path, Path]
) -> None:
    _tcx_or_skip(mode)
    with loaded(variants[0], 0) as a, loaded(variants[1], 1) as b:
        assert net.attach(a, mode=mode) == "attached"
        stop, results = threading.Event(), []
        sender = threading.Thread(target=lambda: results.append(echo.exchange_until(stop)))
        sender.start()
        try:
            for swap in range(40):
                assert net.attach(b if swap % 2 == 0 else a, mode=mode) == "swapped"
                time.sleep(0.005)
        finally:
            stop.set()
            sender.join()
        [(sent, answered)] = results
        assert answered == sent > 100, results
        assert a.packets() > 0 and b.packets() > 0
        net.detach()


# --- moves ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", MODES)
def test_a_recreated_device_gets_the_program_moved(
    mode: Mechanism, net: Net, echo: Echo, variants: tuple[Path, Path]
) -> None:
    """The device is deleted and created again with the same name: a new ifindex. A tcx link outlives its
    device (defunct, ifindex 0); a clsact filter goes with it. Either way the pin moves to the new device."""
    _tcx_or_skip(mode)
    with loaded(variants[0], 0) as a:
        assert net.attach(a, mode=mode) == "attached"
        old_index = net.ifindex()
        old_link = tcx_link_id(net.pin()) if mode == "tcx" else None
        ip_batch(net.node, [f"link del {DEVICE}"])
        stale = net.attached()
        assert stale is not None and not stale.live
        net.add_veth()
        assert net.ifindex() != old_index
        assert net.attach(a, mode=mode) == "moved"
        info = net.attached()
        assert info == tcattach.AttachInfo(net.ifindex(), "ingress", a.id, mode)
        assert sorted(p.name for p in net.links.iterdir()) == [net.pin().name]  # no temporary pin left
        if old_link is not None:
            assert old_link not in tcx_links()
        before = a.packets()
        assert echo.exchange(10) == 10
        assert a.packets() >= before + 10
        net.detach()


@pytest.mark.parametrize("mode", MODES)
def test_a_renamed_device_loses_the_program_to_its_successor(
    mode: Mechanism, net: Net, variants: tuple[Path, Path]
) -> None:
    """tcv0 is renamed away and a new tcv0 appears: the pin tc_count@tcv0 moves to the new device, and the
    old device, still there under its new name, is left without our program (nor, with clsact, our qdisc)."""
    _tcx_or_skip(mode)
    with loaded(variants[0], 0) as a:
        assert net.attach(a, "egress", mode=mode) == "attached"
        old_index = net.ifindex()
        ip_batch(net.node, [f"link set {DEVICE} name tcv0old"])
        ip_batch(net.node, [f"link add {DEVICE} type veth peer name tcv2 netns {net.peer}"])
        assert net.attach(a, "egress", mode=mode) == "moved"
        info = net.attached()
        assert info is not None and info.ifindex == net.ifindex() != old_index and info.direction == "egress"
        if mode == "tcx":
            assert list(tcx_links().values()).count(a.id) == 1
        else:
            assert net.filters("egress", "tcv0old") == [] and not net.has_clsact("tcv0old")
            assert [f["options"]["prog"]["id"] for f in net.filters("egress")] == [a.id]
        net.detach()


def test_a_change_of_mechanism_moves_make_before_break(net: Net, variants: tuple[Path, Path]) -> None:
    _tcx_or_skip("tcx")
    with loaded(variants[0], 0) as a:
        assert net.attach(a, mode="tcx") == "attached"
        link_id = tcx_link_id(net.pin())
        assert net.attach(a, mode="clsact") == "moved"
        assert link_id not in tcx_links()
        assert [f["options"]["prog"]["id"] for f in net.filters("ingress")] == [a.id]
        assert net.attach(a, mode="tcx") == "moved"
        assert net.filters("ingress") == [] and not net.has_clsact()
        assert tcx_links()[tcx_link_id(net.pin())] == a.id
        net.detach()


def test_a_temporary_pin_left_by_a_crash_is_discarded(net: Net, variants: tuple[Path, Path]) -> None:
    _tcx_or_skip("tcx")
    with loaded(variants[0], 0) as a:
        tmp = net.pin().with_name(f"new:{net.pin().name}")
        with in_netns(net.node):
            assert tcattach.attach(a.fd, net.ifindex(), "ingress", tmp, mode="tcx") == "attached"
        leftover = tcx_link_id(tmp)
        assert net.attach(a, mode="tcx") == "attached"
        assert not tmp.exists() and leftover not in tcx_links()
        net.detach()


@pytest.mark.parametrize("mode", MODES)
def test_a_device_name_with_a_dot(mode: Mechanism, net: Net, variants: tuple[Path, Path]) -> None:
    """A VLAN's name (eth0.100) has a dot, which bpffs refuses in pin names: pin_name writes it as a colon."""
    _tcx_or_skip(mode)
    ip_batch(net.node, ["link add tcv0.7 type veth peer name tcp7", "link set tcv0.7 up"])
    with loaded(variants[0], 0) as a:
        assert net.attach(a, device="tcv0.7", mode=mode) == "attached"
        assert net.pin(device="tcv0.7").name == "tc_count@tcv0:7"
        info = net.attached("tcv0.7")
        assert info is not None and info.ifindex == net.ifindex("tcv0.7") and info.prog_id == a.id
        net.detach("tcv0.7")
    assert list(net.links.iterdir()) == []


# --- clsact: the shared qdisc --------------------------------------------------------------------------


def test_clsact_qdisc_goes_with_the_last_of_our_filters(net: Net, variants: tuple[Path, Path]) -> None:
    with loaded(variants[0], 0) as a:
        with in_netns(net.node):
            index = net.ifindex()
            ingress, egress = net.links / "in@tcv0", net.links / "out@tcv0"
            assert tcattach.attach(a.fd, index, "ingress", ingress, mode="clsact") == "attached"
            assert tcattach.attach(a.fd, index, "egress", egress, mode="clsact") == "attached"
            tcattach.detach(ingress)
            assert net.has_clsact() and len(net.filters("egress")) == 1 and net.filters("ingress") == []
            tcattach.detach(egress)
        assert not net.has_clsact()


def test_clsact_leaves_what_others_put_there(net: Net, variants: tuple[Path, Path]) -> None:
    """A qdisc someone else created stays; so does one we created once someone else filters on it."""
    foreign = ["filter", "add", "dev", DEVICE, "ingress", "pref", "1", "u32", "match", "u32", "0", "0"]
    with loaded(variants[0], 0) as a:
        net.tc("qdisc", "add", "dev", DEVICE, "clsact")
        assert net.attach(a, mode="clsact") == "attached"
        net.detach()
        assert net.has_clsact()  # not ours to remove
        net.tc("qdisc", "del", "dev", DEVICE, "clsact")

        assert net.attach(a, "egress", mode="clsact") == "attached"  # this time the qdisc is ours
        net.tc(*foreign)
        net.detach()
        assert net.has_clsact() and net.filters("egress") == []
        assert {f["kind"] for f in net.tc("filter", "show", "dev", DEVICE, "ingress")} == {"u32"}


def test_a_deleted_clsact_qdisc_is_attached_again(net: Net, variants: tuple[Path, Path]) -> None:
    with loaded(variants[0], 0) as a:
        assert net.attach(a, mode="clsact") == "attached"
        net.tc("qdisc", "del", "dev", DEVICE, "clsact")
        info = net.attached()
        assert info is not None and info.prog_id == 0 and not info.live
        assert net.attach(a, mode="clsact") == "attached"
        info = net.attached()
        assert info is not None and info.prog_id == a.id
        net.detach()
        assert not net.has_clsact()


def test_a_clsact_record_is_detached_only_from_its_network_namespace(
    net: Net, variants: tuple[Path, Path]
) -> None:
    """Its ifindex means another device elsewhere: from the host's namespace, detach refuses, saying why."""
    with loaded(variants[0], 0) as a:
        assert net.attach(a, mode="clsact") == "attached"
        with pytest.raises(errors.DeviceError) as info:
            tcattach.detach(net.pin())  # this thread is in the host's namespace
        assert info.value.device == DEVICE and "network namespace" in str(info.value)
        assert net.pin().is_symlink() and len(net.filters("ingress")) == 1
        net.detach()
        assert net.filters("ingress") == [] and not net.pin().is_symlink()


# --- errors --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", MODES)
def test_a_missing_device_is_a_device_error_naming_it(
    mode: Mechanism, net: Net, variants: tuple[Path, Path]
) -> None:
    _tcx_or_skip(mode)
    with in_netns(net.node):
        with pytest.raises(errors.DeviceError) as info:
            tcattach.ifindex_of("tcnone0")
        assert info.value.device == "tcnone0" and "tcnone0" in str(info.value)
        with loaded(variants[0], 0) as a, pytest.raises(errors.DeviceError) as attach_error:
            tcattach.attach(a.fd, 9999, "ingress", net.pin(device="tcnone0"), mode=mode)
    assert "ifindex 9999" in str(attach_error.value)
    assert list(net.links.iterdir()) == []
