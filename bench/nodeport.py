"""NodePort baselines: new connections from an external client, straight to the pods, through a
kube-proxy-shaped iptables NodePort, and through Balancing's TC path, side by side in one run.

Every case gets its own north-south topology (``testkit/balancing_testkit/nstopology.py``: client, router,
node-a with two pods, node-b with one), so rules or programs of one case never sit in another's path
(iptables-legacy tables, once made, stay in a namespace until it goes; conntrack stays on with them). Each pod
runs the C probe's server on ``BENCH_PORT`` (reads a request, answers ``<pod> <client ip> <client port>``,
closes). The cases:

- ``direct``: the client connects to the pods' own addresses (plain routing through the router and the
  node), round-robin over all of them;
- ``iptables-nft`` / ``iptables-legacy`` (``--iptables``) with N Services (``--services``): node-a's rules
  as kube-proxy (iptables mode) writes them, loaded with ``iptables-restore``: nat PREROUTING ->
  KUBE-SERVICES (one cluster-IP rule per Service, then ``--dst-type LOCAL`` -> KUBE-NODEPORTS) ->
  KUBE-EXT (eTP Cluster: KUBE-MARK-MASQ) -> KUBE-SVC (``statistic --mode random`` over the three pods) ->
  KUBE-SEP (DNAT), MASQUERADE ``--random-fully`` in POSTROUTING for the marked packets, kube-proxy's filter
  chains (KUBE-FORWARD: INVALID dropped, marked or established accepted). The measured Service is the
  LAST one in both KUBE-SERVICES and KUBE-NODEPORTS (NodePort ``NODE_PORT``), so the chain walk shows; the
  N-1 others are decoys with one endpoint each, the first 2,767 with NodePorts of their own (the rest of
  the default range). The client connects to node-a's address, port ``NODE_PORT``;
- ``tc`` with N Services: Balancing's TC programs on node-a's uplink (:func:`setup_balancing`): ``balancing
  agent`` in node-a's namespace (``--nodeport-devices uplink0``, socket hooks on node-a's cgroup, map sizes
  the defaults, ``--snat-ports`` passed on) on a manifest directory holding the two Nodes and the same N
  Services as the iptables case (``service_specs``: the measured one last, the decoys' endpoints and
  NodePorts alike), each with its EndpointSlice. The case starts once the agent is ready and every
  frontend it wants is programmed; its start-up time, RSS, Maglev tables and maps' kernel memory are
  reported. The pods of node-a see the client's address (only what leaves the node again is SNATed).

A measurement is client threads (the C probe, in the client namespace) each making, for a fixed time, one
connection after another: connect, send a small request, read the one-line answer, close with a RST
(SO_LINGER 0: no TIME_WAIT pile-up in the client). Per round and case there are two: ``--workers`` threads
for ``--duration`` seconds give the connections/s; one thread for ``--sequential-duration`` seconds gives
the latencies without queueing behind the other workers on this 2-CPU machine: connect() p50/p99 (the
SYN's round trip, where the NAT rule walk happens) and the whole exchange's p50 (the loaded run's connect
latencies are reported too). Before the rounds each case is checked once (no errors, every pod answers,
each seeing the address it should: the client's own directly, node-a's through the eTP Cluster NodePort)
and warmed up; then ``--rounds`` rounds run every case once, in alternating order. Figures are medians
over the rounds with their spread (min..max); ratios (iptables/direct, tc/direct, tc/iptables: conn/s,
connect p50, exchange p50) are taken per round (paired) and summarised the same way. ``-o json`` prints
the summary and the raw samples as one JSON document (``--json PATH`` also writes it). The issue's targets
(tc at least iptables' conn/s at 1 Service and 4x at 10,000; within 1.2x of direct) are judged on those
ratios. After the rounds each tc case gets one more loaded run with BPF run-time statistics on (only for
that run; they cost two clock reads per program run): ns per run and runs per connection of
``bl_ns_ingress``/``bl_ns_egress``; then the programs' counters (new flows by result, SNAT ports taken and
found taken). ``--startup-nodeports N`` finally times an agent's start on N NodePort Services alone.

Run as root: ``.venv/bin/python bench/nodeport.py [--services 1,10000] [--rounds 5] [--iptables nft,legacy]
[--family 4|6] [--snat-ports LOW-HIGH] [--startup-nodeports N] [-o table|json]`` (about 3 minutes at the
defaults, most of it the agent programming 10,000 Services; ``--startup-nodeports 10000`` adds 2.5). The
topologies (namespaces with their rules, processes, cgroups) are removed at the end, also on errors and
SIGTERM. Needs gcc, iproute2 and iptables (both backends: the ``iptables`` Debian package).

Neighbours: bench/run.py and bench/hooks.py (the socket hooks' costs, same conventions), the topology in
testkit/balancing_testkit/nstopology.py, the TC datapath (bpf/nodeport.c) and the agent
(``balancing agent``). About 300 of its lines are the C probe, kept here as a string (compiled into
build/bench at start), and 300 drive Balancing's agent, so the benchmark is one file; both could move to
modules beside it (bench/nodeport_probe.c, bench/nodeport_agent.py).
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from balancing.datapath import abi
from balancing_testkit.nstopology import CLUSTER_CIDRS, NsNode, NsTopology
from balancing_testkit.topology import Pod, exit_on_signals, in_netns

ROOT = Path(__file__).resolve().parents[1]
PROBE = ROOT / "build/bench/nodeport_probe"
BENCH_PORT = 9000  # the pods' probe servers
NODE_PORT = 32767  # the measured Service's NodePort on node-a (the last of the default range)
NODE_PORT_RANGE = range(30000, 32767)  # the decoys' NodePorts
DECOY_NODE = "node-b"  # where the decoys' endpoints are said to run (no packet goes to them)
MASQ_BIT = "0x4000"
MASQ_MARK = f"{MASQ_BIT}/{MASQ_BIT}"
RESTORE = {
    ("nft", 4): "iptables-nft-restore",
    ("nft", 6): "ip6tables-nft-restore",
    ("legacy", 4): "iptables-legacy-restore",
    ("legacy", 6): "ip6tables-legacy-restore",
}


# --- the probe (C: a Python client would measure itself) ----------------------------------------------------

PROBE_C = r"""
/* bench/nodeport.py's probe. `server PORT NAME THREADS`: accept (IPv4 and IPv6), read a request, answer
 * "NAME <peer ip> <peer port>\n", close. `client MS THREADS IP PORT [IP PORT]...`: THREADS workers, each
 * for MS milliseconds: connect (round-robin over the targets), send "ping\n", read the answer line, close
 * with a RST; prints one JSON object: ok, errors, seconds, connect_us and exchange_us {p50, p90, p99},
 * answers {"<pod> <ip the pod saw>": n}, last_error. */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#define MAX_ANSWERS 16
#define MAX_TARGETS 16

static double now_us(void)
{
    struct timespec ts;

    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec * 1e6 + ts.tv_nsec / 1e3;
}

static int sockaddr_of(const char *ip, int port, struct sockaddr_storage *ss, socklen_t *len)
{
    memset(ss, 0, sizeof(*ss));
    if (strchr(ip, ':')) {
        struct sockaddr_in6 *s6 = (struct sockaddr_in6 *)ss;

        s6->sin6_family = AF_INET6;
        s6->sin6_port = htons(port);
        *len = sizeof(*s6);
        return inet_pton(AF_INET6, ip, &s6->sin6_addr) == 1 ? 0 : -1;
    }
    struct sockaddr_in *s4 = (struct sockaddr_in *)ss;

    s4->sin_family = AF_INET;
    s4->sin_port = htons(port);
    *len = sizeof(*s4);
    return inet_pton(AF_INET, ip, &s4->sin_addr) == 1 ? 0 : -1;
}

/* ---- server ---- */
static const char *server_name;
static int listen_fd;

static void peer_text(const struct sockaddr_storage *ss, char *ip, size_t n, int *port)
{
    if (ss->ss_family == AF_INET6) {
        const struct sockaddr_in6 *s6 = (const struct sockaddr_in6 *)ss;

        if (IN6_IS_ADDR_V4MAPPED(&s6->sin6_addr))
            inet_ntop(AF_INET, &s6->sin6_addr.s6_addr[12], ip, n);
        else
            inet_ntop(AF_INET6, &s6->sin6_addr, ip, n);
        *port = ntohs(s6->sin6_port);
    } else {
        const struct sockaddr_in *s4 = (const struct sockaddr_in *)ss;

        inet_ntop(AF_INET, &s4->sin_addr, ip, n);
        *port = ntohs(s4->sin_port);
    }
}

static void *serve(void *unused)
{
    struct timeval tmo = { .tv_sec = 2 };

    (void)unused;
    for (;;) {
        struct sockaddr_storage ss;
        socklen_t len = sizeof(ss);
        char req[256], out[160], ip[INET6_ADDRSTRLEN];
        int port, c = accept(listen_fd, (struct sockaddr *)&ss, &len);

        if (c < 0)
            continue;
        setsockopt(c, SOL_SOCKET, SO_RCVTIMEO, &tmo, sizeof(tmo));
        setsockopt(c, SOL_SOCKET, SO_SNDTIMEO, &tmo, sizeof(tmo));
        if (read(c, req, sizeof(req)) > 0) {
            peer_text(&ss, ip, sizeof(ip), &port);
            int n = snprintf(out, sizeof(out), "%s %s %d\n", server_name, ip, port);

            if (write(c, out, n) != n)
                perror("write");
        }
        close(c);
    }
    return NULL;
}

static int server(int port, const char *name, int threads)
{
    struct sockaddr_in6 sa = { .sin6_family = AF_INET6, .sin6_port = htons(port), .sin6_addr = in6addr_any };
    int one = 1, zero = 0;
    pthread_t t;

    server_name = name;
    listen_fd = socket(AF_INET6, SOCK_STREAM, 0);
    setsockopt(listen_fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof(one));
    setsockopt(listen_fd, IPPROTO_IPV6, IPV6_V6ONLY, &zero, sizeof(zero));
    if (bind(listen_fd, (struct sockaddr *)&sa, sizeof(sa)) || listen(listen_fd, 4096)) {
        perror("server");
        return 1;
    }
    for (int i = 1; i < threads; i++)
        pthread_create(&t, NULL, serve, NULL);
    printf("READY\n");
    fflush(stdout);
    serve(NULL);
    return 0;
}

/* ---- client ---- */
struct target {
    struct sockaddr_storage ss;
    socklen_t len;
};

struct worker {
    pthread_t thread;
    long id, ok, errors, cap;
    float *connect_us, *exchange_us;
    char answers[MAX_ANSWERS][96];
    long counts[MAX_ANSWERS];
    int last_errno;
};

static struct target targets[MAX_TARGETS];
static int n_targets;
static double deadline;

static void count_answer(struct worker *w, const char *line)
{
    char key[96];
    const char *sp = strchr(line, ' ');
    const char *end = sp ? strchr(sp + 1, ' ') : NULL;
    size_t n = end ? (size_t)(end - line) : strcspn(line, "\n");

    if (n >= sizeof(key))
        n = sizeof(key) - 1;
    memcpy(key, line, n);
    key[n] = 0;
    for (int i = 0; i < MAX_ANSWERS; i++) {
        if (!w->answers[i][0])
            strcpy(w->answers[i], key);
        if (!strcmp(w->answers[i], key)) {
            w->counts[i]++;
            return;
        }
    }
}

static int exchange(struct worker *w, const struct target *t, double *connected)
{
    static const struct timeval tmo = { .tv_sec = 2 };
    static const struct linger rst = { .l_onoff = 1, .l_linger = 0 };
    char buf[256];
    ssize_t got = 0, n;
    int ok, fd = socket(t->ss.ss_family, SOCK_STREAM, 0);

    setsockopt(fd, SOL_SOCKET, SO_SNDTIMEO, &tmo, sizeof(tmo));
    setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tmo, sizeof(tmo));
    ok = connect(fd, (const struct sockaddr *)&t->ss, t->len) == 0;
    *connected = now_us();
    if (ok)
        ok = write(fd, "ping\n", 5) == 5;
    while (ok && got < (ssize_t)sizeof(buf) - 1 && !memchr(buf, '\n', got)) {
        n = read(fd, buf + got, sizeof(buf) - 1 - got);
        if (n <= 0)
            break;
        got += n;
    }
    ok = ok && got > 0 && memchr(buf, '\n', got);
    if (!ok)
        w->last_errno = errno ? errno : EPIPE;
    setsockopt(fd, SOL_SOCKET, SO_LINGER, &rst, sizeof(rst));
    close(fd);
    if (ok) {
        buf[got] = 0;
        count_answer(w, buf);
    }
    return ok;
}

static void *work(void *arg)
{
    struct worker *w = arg;

    for (long i = w->id; now_us() < deadline; i++) {
        double t0 = now_us(), t1;

        errno = 0;
        if (!exchange(w, &targets[i % n_targets], &t1)) {
            w->errors++;
            continue;
        }
        if (w->ok == w->cap) {
            w->cap = w->cap ? 2 * w->cap : 65536;
            w->connect_us = realloc(w->connect_us, w->cap * sizeof(float));
            w->exchange_us = realloc(w->exchange_us, w->cap * sizeof(float));
        }
        w->connect_us[w->ok] = t1 - t0;
        w->exchange_us[w->ok++] = now_us() - t0;
    }
    return NULL;
}

static int cmp(const void *a, const void *b)
{
    float x = *(const float *)a, y = *(const float *)b;

    return (x > y) - (x < y);
}

static void print_pcts(const char *name, float *v, long n)
{
    qsort(v, n, sizeof(float), cmp);
    printf("\"%s\": {\"p50\": %.1f, \"p90\": %.1f, \"p99\": %.1f}", name, n ? v[n / 2] : 0.0,
           n ? v[n * 9 / 10] : 0.0, n ? v[n * 99 / 100] : 0.0);
}

static int client(int ms, int threads, char **args, int n_args)
{
    struct worker *ws = calloc(threads, sizeof(*ws)), all = { 0 };
    double start;
    int last_errno = 0;

    for (n_targets = 0; n_targets < MAX_TARGETS && 2 * n_targets + 1 < n_args; n_targets++) {
        struct target *t = &targets[n_targets];

        if (sockaddr_of(args[2 * n_targets], atoi(args[2 * n_targets + 1]), &t->ss, &t->len)) {
            fprintf(stderr, "bad address %s\n", args[2 * n_targets]);
            return 2;
        }
    }
    start = now_us();
    deadline = start + ms * 1e3;
    for (int i = 0; i < threads; i++) {
        ws[i].id = i;
        pthread_create(&ws[i].thread, NULL, work, &ws[i]);
    }
    all.connect_us = malloc(sizeof(float));
    all.exchange_us = malloc(sizeof(float));
    for (int i = 0; i < threads; i++) {
        struct worker *w = &ws[i];

        pthread_join(w->thread, NULL);
        all.connect_us = realloc(all.connect_us, (all.ok + w->ok + 1) * sizeof(float));
        all.exchange_us = realloc(all.exchange_us, (all.ok + w->ok + 1) * sizeof(float));
        memcpy(all.connect_us + all.ok, w->connect_us, w->ok * sizeof(float));
        memcpy(all.exchange_us + all.ok, w->exchange_us, w->ok * sizeof(float));
        all.ok += w->ok;
        all.errors += w->errors;
        if (w->last_errno)
            last_errno = w->last_errno;
        for (int a = 0; a < MAX_ANSWERS && w->answers[a][0]; a++)
            for (long k = 0; k < w->counts[a]; k++)
                count_answer(&all, w->answers[a]);
    }
    double seconds = (now_us() - start) / 1e6;

    printf("{\"ok\": %ld, \"errors\": %ld, \"seconds\": %.3f, ", all.ok, all.errors, seconds);
    print_pcts("connect_us", all.connect_us, all.ok);
    printf(", ");
    print_pcts("exchange_us", all.exchange_us, all.ok);
    printf(", \"answers\": {");
    for (int a = 0; a < MAX_ANSWERS && all.answers[a][0]; a++)
        printf("%s\"%s\": %ld", a ? ", " : "", all.answers[a], all.counts[a]);
    printf("}, \"last_error\": \"%s\"}\n", last_errno ? strerror(last_errno) : "");
    return 0;
}

int main(int argc, char **argv)
{
    if (argc == 5 && !strcmp(argv[1], "server"))
        return server(atoi(argv[2]), argv[3], atoi(argv[4]));
    if (argc >= 6 && argc % 2 == 0 && !strcmp(argv[1], "client"))
        return client(atoi(argv[2]), atoi(argv[3]), argv + 4, argc - 4);
    fprintf(stderr, "usage: %s server PORT NAME THREADS | client MS THREADS IP PORT [IP PORT]...\n", argv[0]);
    return 2;
}
"""


def build_probe() -> Path:
    """Compile the probe into build/bench (from the source above; a second or so)."""
    PROBE.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="bl-bench-nodeport-") as tmp:
        src = Path(tmp) / "nodeport_probe.c"
        src.write_text(PROBE_C)
        subprocess.run(["gcc", "-O2", "-Wall", "-pthread", "-o", str(PROBE), str(src)], check=True)
    return PROBE


# --- the Services (the same for iptables and Balancing) -----------------------------------------------------


@dataclass(frozen=True)
class ServiceSpec:
    """Service ``bench/svc-<index>``: port 80/TCP to ``BENCH_PORT`` of its endpoints, a cluster IP, maybe a
    NodePort."""

    index: int
    endpoints: list[tuple[str, str]]  # (address, node name)
    node_port: int | None


def service_specs(
    services: int, backends: Sequence[Pod], family: int, node_ports: int = len(NODE_PORT_RANGE)
) -> Iterator[ServiceSpec]:
    """The measured Service last (NodePort ``NODE_PORT`` to ``backends``); before it ``services - 1`` decoys
    with one endpoint each (on ``DECOY_NODE``), the first ``node_ports`` of them with NodePorts of their own
    from 30000 up (``NODE_PORT`` skipped)."""
    decoy_ports = (p for p in range(NODE_PORT_RANGE.start, 65536) if p != NODE_PORT)
    for index in range(1, services):
        port = next(decoy_ports) if index <= node_ports else None
        yield ServiceSpec(index, [(decoy_endpoint(index, family), DECOY_NODE)], port)
    yield ServiceSpec(services, [(pod.ip(family), pod.node or "") for pod in backends], NODE_PORT)


def cluster_ip(index: int, family: int) -> str:
    """Service ``index``'s cluster IP in the topology's VIP ranges (10.96.0.0/12, fd00:96::/108)."""
    return (
        f"10.{96 + (index >> 16)}.{(index >> 8) & 255}.{index & 255}"
        if family == 4
        else f"fd00:96::{index:x}"
    )


def decoy_endpoint(index: int, family: int) -> str:
    """A decoy Service's one endpoint: somewhere no packet of this benchmark goes."""
    return (
        f"10.{128 + (index >> 16)}.{(index >> 8) & 255}.{index & 255}"
        if family == 4
        else f"fd00:128::{index:x}"
    )


# --- kube-proxy's iptables rules ----------------------------------------------------------------------------


def host_port(ip: str, port: int) -> str:
    return f"[{ip}]:{port}" if ":" in ip else f"{ip}:{port}"


def chain(kind: str, index: int, part: int = 0) -> str:
    """A chain name of kube-proxy's length (its 16 characters after the kind are a hash; here: numbers)."""
    return f"KUBE-{kind}-{index:011d}{part:05d}"


def service_rules(
    index: int, endpoints: list[str], node_port: int | None, family: int
) -> tuple[list[str], ...]:
    """(chains, KUBE-SERVICES rules, KUBE-NODEPORTS rules, the Service's own chains' rules) of one Service
    ``ns/svc-<index>:http`` (port 80/TCP, cluster IP, optional NodePort), as kube-proxy writes them."""
    name, vip, prefix = f"bench/svc-{index}:http", cluster_ip(index, family), 32 if family == 4 else 128
    svc, ext = chain("SVC", index), chain("EXT", index)
    seps = [chain("SEP", index, k) for k in range(len(endpoints))]
    chains = [svc, *seps] + ([ext] if node_port else [])
    services = [
        f'-A KUBE-SERVICES -m comment --comment "{name} cluster IP" -m tcp -p tcp -d {vip}/{prefix} '
        f"--dport 80 -j {svc}"
    ]
    nodeports, own = [], []
    if node_port:
        nodeports.append(
            f"-A KUBE-NODEPORTS -m comment --comment {name} -m tcp -p tcp --dport {node_port} -j {ext}"
        )
        own += [
            f'-A {ext} -m comment --comment "masquerade traffic for {name} external destinations" '
            "-j KUBE-MARK-MASQ",
            f"-A {ext} -j {svc}",
        ]
    own.append(
        f'-A {svc} -m comment --comment "{name} cluster IP" -m tcp -p tcp -d {vip}/{prefix} --dport 80 '
        f"! -s {CLUSTER_CIDRS[family == 6]} -j KUBE-MARK-MASQ"
    )
    for k, (ep, sep) in enumerate(zip(endpoints, seps, strict=True)):
        left = len(endpoints) - k
        pick = f"-m statistic --mode random --probability {1 / left:.11f} " if left > 1 else ""
        own.append(f'-A {svc} -m comment --comment "{name} -> {host_port(ep, BENCH_PORT)}" {pick}-j {sep}')
        own += [
            f"-A {sep} -m comment --comment {name} -s {ep}/{prefix} -j KUBE-MARK-MASQ",
            f"-A {sep} -m comment --comment {name} -m tcp -p tcp -j DNAT "
            f"--to-destination {host_port(ep, BENCH_PORT)}",
        ]
    return chains, services, nodeports, own


def kube_proxy_rules(services: int, backends: Sequence[Pod], family: int) -> str:
    """The iptables-restore input for ``services`` Services (``service_specs``: the measured one, NodePort
    ``NODE_PORT`` to ``backends``, last)."""
    chains, services_chain, nodeports, own = [], [], [], []
    for spec in service_specs(services, backends, family):
        c, s, n, o = service_rules(spec.index, [ip for ip, _ in spec.endpoints], spec.node_port, family)
        chains += c
        services_chain += s
        nodeports += n
        own += o
    nat = [
        "*nat",
        *(f":{c} - [0:0]" for c in ("KUBE-SERVICES", "KUBE-NODEPORTS", "KUBE-POSTROUTING", "KUBE-MARK-MASQ")),
        *(f":{c} - [0:0]" for c in chains),
        '-A PREROUTING -m comment --comment "kubernetes service portals" -j KUBE-SERVICES',
        '-A OUTPUT -m comment --comment "kubernetes service portals" -j KUBE-SERVICES',
        '-A POSTROUTING -m comment --comment "kubernetes postrouting rules" -j KUBE-POSTROUTING',
        f"-A KUBE-MARK-MASQ -j MARK --or-mark {MASQ_BIT}",
        f"-A KUBE-POSTROUTING -m mark ! --mark {MASQ_MARK} -j RETURN",
        f"-A KUBE-POSTROUTING -j MARK --xor-mark {MASQ_BIT}",
        '-A KUBE-POSTROUTING -m comment --comment "kubernetes service traffic requiring SNAT" '
        "-j MASQUERADE --random-fully",
        *services_chain,
        '-A KUBE-SERVICES -m comment --comment "kubernetes service nodeports; NOTE: this must be the last '
        'rule in this chain" -m addrtype --dst-type LOCAL -j KUBE-NODEPORTS',
        *nodeports,
        *own,
        "COMMIT",
    ]
    return "\n".join([*nat, *FILTER_RULES]) + "\n"


FILTER_RULES = [
    "*filter",
    *(
        f":{c} - [0:0]"
        for c in (
            "KUBE-FORWARD",
            "KUBE-SERVICES",
            "KUBE-EXTERNAL-SERVICES",
            "KUBE-NODEPORTS",
            "KUBE-PROXY-FIREWALL",
        )
    ),
    '-A INPUT -m conntrack --ctstate NEW -m comment --comment "kubernetes load balancer firewall" '
    "-j KUBE-PROXY-FIREWALL",
    '-A INPUT -m comment --comment "kubernetes health check service ports" -j KUBE-NODEPORTS',
    "-A INPUT -m conntrack --ctstate NEW "
    '-m comment --comment "kubernetes externally-visible service portals" -j KUBE-EXTERNAL-SERVICES',
    '-A FORWARD -m conntrack --ctstate NEW -m comment --comment "kubernetes load balancer firewall" '
    "-j KUBE-PROXY-FIREWALL",
    '-A FORWARD -m comment --comment "kubernetes forwarding rules" -j KUBE-FORWARD',
    '-A FORWARD -m conntrack --ctstate NEW -m comment --comment "kubernetes service portals" '
    "-j KUBE-SERVICES",
    "-A FORWARD -m conntrack --ctstate NEW "
    '-m comment --comment "kubernetes externally-visible service portals" -j KUBE-EXTERNAL-SERVICES',
    "-A KUBE-FORWARD -m conntrack --ctstate INVALID -j DROP",
    f'-A KUBE-FORWARD -m comment --comment "kubernetes forwarding rules" -m mark --mark {MASQ_MARK} '
    "-j ACCEPT",
    '-A KUBE-FORWARD -m comment --comment "kubernetes forwarding conntrack rule" '
    "-m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT",
    "COMMIT",
]


# --- Balancing's TC path ------------------------------------------------------------------------------------

AGENT_OBJECT = ROOT / "build/bpf/balancing.o"  # nodeport.o sits beside it (the agent looks there)
AGENT_HEALTH = "127.0.0.1:10256"  # on node-a's own loopback: each agent has a namespace of its own
AGENT_STATE = "127.0.0.1:10264"
AGENT_TIMEOUT = 900.0  # seconds for an agent to program every frontend
SERVICES_PER_FILE = 2000  # Services (and their EndpointSlices) per manifest file, a List each
MAGLEV_MAP = "bl_mglv_v1"
TC_PROGRAMS = ("bl_ns_ingress", "bl_ns_egress")
BPF_STATS_RUN_TIME = 0  # enum bpf_stats_type
Doc = dict[str, Any]


@dataclass
class AgentReport:
    """What one agent took to program a case, and holds once it has: times from its start, counts, memory."""

    services: int
    ready_seconds: float = 0.0  # until /readyz said 200 (its first full sync is in the maps)
    programmed_seconds: float = 0.0  # until every frontend it wants is programmed
    frontends: int = 0
    maglev_tables: int = 0
    rss_mib: float = 0.0
    peak_rss_mib: float = 0.0
    map_mib: float = 0.0  # the kernel memory of its maps (bpftool's bytes_memlock), Maglev tables included
    maglev_mib: float = 0.0  # of which the Maglev tables
    full_sync: str = ""  # the agent's own log line about its first full sync
    links: dict[str, str] = field(default_factory=dict)  # TC program: its pinned link
    pid: int = 0
    rounds_cpu_seconds: float = 0.0  # its CPU time during the rounds (conntrack sweeps, ...)


def node_doc(node: NsNode) -> Doc:
    addresses = [{"type": "InternalIP", "address": ip} for ip in (node.ip4, node.ip6)]
    return {
        "apiVersion": "v1",
        "kind": "Node",
        "metadata": {"name": node.name, "labels": {"kubernetes.io/hostname": node.name}},
        "status": {"addresses": [*addresses, {"type": "Hostname", "address": node.name}]},
    }


def service_doc(spec: ServiceSpec, family: int) -> Doc:
    """The Service ``spec`` as the API server would hold it (single-stack in ``family``, eTP Cluster)."""
    port: Doc = {"name": "http", "port": 80, "protocol": "TCP", "targetPort": BENCH_PORT}
    doc: Doc = {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": f"svc-{spec.index}", "namespace": "bench"},
        "spec": {
            "type": "ClusterIP",
            "clusterIP": cluster_ip(spec.index, family),
            "clusterIPs": [cluster_ip(spec.index, family)],
            "ipFamilies": [f"IPv{family}"],
            "ipFamilyPolicy": "SingleStack",
            "ports": [port],
        },
    }
    if spec.node_port is not None:
        port["nodePort"] = spec.node_port
        doc["spec"].update(type="NodePort", externalTrafficPolicy="Cluster")
    return doc


def slice_doc(spec: ServiceSpec, family: int) -> Doc:
    return {
        "apiVersion": "discovery.k8s.io/v1",
        "kind": "EndpointSlice",
        "metadata": {
            "name": f"svc-{spec.index}-ipv{family}",
            "namespace": "bench",
            "labels": {"kubernetes.io/service-name": f"svc-{spec.index}"},
        },
        "addressType": f"IPv{family}",
        "ports": [{"name": "http", "port": BENCH_PORT, "protocol": "TCP"}],
        "endpoints": [
            {"addresses": [ip], "conditions": {"ready": True}, "nodeName": node}
            for ip, node in spec.endpoints
        ],
    }


def write_manifests(directory: Path, ns: NsTopology, specs: Iterable[ServiceSpec], family: int) -> None:
    """The Nodes and every Service with its EndpointSlice, as ``List`` files of ``SERVICES_PER_FILE``."""
    write_list(directory / "nodes.json", [node_doc(n) for n in ns.nodes])
    batch: list[Doc] = []
    for n, spec in enumerate(specs, start=1):
        batch += [service_doc(spec, family), slice_doc(spec, family)]
        if n % SERVICES_PER_FILE == 0:
            write_list(directory / f"services-{n // SERVICES_PER_FILE:03d}.json", batch)
            batch = []
    if batch:
        write_list(directory / "services-last.json", batch)


def write_list(path: Path, items: list[Doc]) -> None:
    path.write_text(json.dumps({"apiVersion": "v1", "kind": "List", "items": items}))


def agent_argv(ns: NsTopology, manifests: Path, extra: Sequence[str] = ()) -> list[str]:
    """node-a's agent: socket hooks on node-a's cgroup, north-south on its uplink, map sizes the defaults.
    The periodic full resync is pushed out of the measurement (a 10,000-Service resync is a second of CPU on
    this 2-CPU machine, and would land in whichever case is being measured)."""
    return [
        sys.executable,
        "-m",
        "balancing",
        "agent",
        "--manifests",
        str(manifests),
        "--node-name",
        ns.a.name,
        "--cgroup",
        str(ns.a.cgroup),
        "--bpffs",
        str(ns.a.bpffs),
        "--bpf-object",
        str(AGENT_OBJECT),
        "--health-addr",
        AGENT_HEALTH,
        "--state-addr",
        AGENT_STATE,
        "--metrics-addr",
        "",
        "--nodeport-devices",
        ns.a.uplink,
        "--no-terminate-udp-sockets",
        "--resync-interval",
        "3600",
        *extra,
    ]


@contextlib.contextmanager
def setup_balancing(
    ns: NsTopology,
    services: int,
    family: int,
    node_ports: int = len(NODE_PORT_RANGE),
    agent_extra: Sequence[str] = (),
) -> Iterator[AgentReport]:
    """Make node-a's NodePort ``NODE_PORT``/TCP balance new connections over every pod's ``BENCH_PORT``
    (eTP Cluster: node-b's pod too, the client SNATed to node-a) through Balancing's TC programs on node-a's
    uplink, with the decoys of ``service_specs`` programmed beside it (``node_ports`` of them NodePorts):
    ``balancing agent`` in node-a's namespace on a manifest directory (``agent_extra``: more flags for it).
    Entering returns once every frontend is programmed, with the agent's report; leaving stops the agent
    (what it attached goes with the namespaces and the bpffs directory when the topology closes)."""
    with tempfile.TemporaryDirectory(prefix="bl-bench-nodeport-manifests-") as tmp:
        write_manifests(Path(tmp), ns, service_specs(services, ns.backends, family, node_ports), family)
        t0 = time.monotonic()
        proc = ns.spawn(ns.a, agent_argv(ns, Path(tmp), agent_extra), label="agent-node-a")
        try:
            report = AgentReport(services)
            wait_programmed(ns, proc, t0, report)
            describe_agent(ns, proc, report)
            yield report
        finally:
            ns.topo.stop(proc, timeout=10)


def agent_get(ns: NsTopology, path: str) -> tuple[int, Doc]:
    """GET ``path`` from node-a's agent (health port), from a thread switched into node-a's namespace."""
    with in_netns(ns.a.netns):
        try:
            with urllib.request.urlopen(f"http://{AGENT_HEALTH}{path}", timeout=5) as r:
                return r.status, json.load(r)
        except urllib.error.HTTPError as exc:
            return exc.code, json.load(exc)
        except OSError:
            return 0, {}


def wait_programmed(ns: NsTopology, proc: subprocess.Popen[bytes], t0: float, report: AgentReport) -> None:
    """Until the agent is ready (/readyz) and has programmed every frontend it wants (/statusz's programmed
    count equals /readyz's desired one, at least one per Service)."""
    deadline = t0 + AGENT_TIMEOUT
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"the agent exited with {proc.returncode}:\n{ns.topo.logs(proc)[1][-4000:]}")
        if time.monotonic() > deadline:
            raise RuntimeError(f"the agent did not program {report.services} Services in {AGENT_TIMEOUT} s")
        code, ready = agent_get(ns, "/readyz")
        if code == 200 and not report.ready_seconds:
            report.ready_seconds = time.monotonic() - t0
        if code == 200:
            wanted = int(ready.get("frontends", 0))
            programmed = int(agent_get(ns, "/statusz")[1].get("frontends", -1))
            if programmed == wanted >= report.services:
                report.programmed_seconds = time.monotonic() - t0
                report.frontends = programmed
                return
        time.sleep(0.05)


def describe_agent(ns: NsTopology, proc: subprocess.Popen[bytes], report: AgentReport) -> None:
    """The agent's memory (RSS), its maps' kernel memory, its Maglev tables, its log line, its TC links."""
    status = Path(f"/proc/{proc.pid}/status").read_text()
    fields = dict(line.split(":", 1) for line in status.splitlines() if ":" in line)
    kib = {k: int(fields[k].split()[0]) for k in ("VmRSS", "VmHWM")}
    report.rss_mib, report.peak_rss_mib = kib["VmRSS"] / 1024, kib["VmHWM"] / 1024
    report.pid = proc.pid
    maps = ns.a.bpffs / "maps"
    memlock = {int(m["id"]): m for m in bpftool_json("-f", "map", "show")}
    pinned = [m for m in memlock.values() if any(p.startswith(f"{maps}/") for p in m.get("pinned", []))]
    inner = [map_id(e["value"]) for e in bpftool_json("map", "dump", "pinned", str(maps / MAGLEV_MAP))]
    report.maglev_tables = len(inner)
    maglev = sum(int(memlock[i].get("bytes_memlock", 0)) for i in inner if i in memlock)
    report.maglev_mib = maglev / 2**20
    report.map_mib = (sum(int(m.get("bytes_memlock", 0)) for m in pinned) + maglev) / 2**20
    report.full_sync = next((ln for ln in ns.topo.logs(proc)[1].splitlines() if "full sync:" in ln), "")
    links = ns.a.bpffs / "links"
    report.links = {p: str(links / f"{p}@{ns.a.uplink}") for p in TC_PROGRAMS}


def map_id(value: int | list[str]) -> int:
    """An inner map's id from bpftool's dump of a map of maps (a number, or the value's bytes in hex)."""
    if isinstance(value, int):
        return value
    return int.from_bytes(bytes(int(b, 16) for b in value), sys.byteorder)


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process, all its threads (/proc/PID/stat fields 14 and 15)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def bpftool_json(*args: str) -> Any:
    done = subprocess.run(["bpftool", "-j", *args], check=True, capture_output=True, text=True, timeout=120)
    return json.loads(done.stdout)


# --- the cases ----------------------------------------------------------------------------------------------


@dataclass
class Case:
    """One way of reaching the pods, in a topology of its own."""

    mode: str  # "direct", "iptables-nft", "iptables-legacy", "tc"
    services: int  # 0 for direct
    ns: NsTopology
    targets: list[tuple[str, int]] = field(default_factory=list)
    setup_seconds: float = 0.0
    agent: AgentReport | None = None  # tc: what its agent took and holds

    @property
    def name(self) -> str:
        return self.mode if self.mode == "direct" else f"{self.mode} {self.services}"


def start_servers(ns: NsTopology, threads: int) -> None:
    procs = [
        ns.spawn(
            pod,
            [str(PROBE), "server", str(BENCH_PORT), pod.name, str(threads)],
            cgroup=pod.node,
            label=f"probe-{pod.name}",
        )
        for pod in ns.backends
    ]
    for proc in procs:
        ns.topo.wait_ready(proc)


def set_up(case: Case, family: int, stack: contextlib.ExitStack, agent_extra: Sequence[str] = ()) -> None:
    """Program the case's path on node-a; its targets (``agent_extra``: more flags for a tc case's agent)."""
    ns, t0 = case.ns, time.monotonic()
    if case.mode == "direct":
        case.targets = [(pod.ip(family), BENCH_PORT) for pod in ns.backends]
    elif case.mode.startswith("iptables-"):
        rules = kube_proxy_rules(case.services, ns.backends, family)
        ns.run(ns.a, [RESTORE[case.mode.removeprefix("iptables-"), family]], input=rules, timeout=300)
        case.targets = [(ns.a.ip(family), NODE_PORT)]
    else:
        case.agent = stack.enter_context(setup_balancing(ns, case.services, family, agent_extra=agent_extra))
        case.targets = [(ns.a.ip(family), NODE_PORT)]
    case.setup_seconds = time.monotonic() - t0


def measure(case: Case, seconds: float, workers: int) -> dict[str, Any]:
    """One probe run against the case's targets: the probe's JSON, and conn/s."""
    argv = [str(PROBE), "client", str(int(seconds * 1000)), str(workers)]
    for ip, port in case.targets:
        argv += [ip, str(port)]
    out = case.ns.run(case.ns.client, argv, timeout=seconds + 30).stdout
    res: dict[str, Any] = json.loads(out)
    res["rate"] = res["ok"] / res["seconds"]
    return res


def check(case: Case, family: int, workers: int) -> dict[str, int]:
    """A short run: no errors, every pod answers, each seeing the address it should: the client's directly;
    through the eTP Cluster NodePort node-a's uplink address for node-b's pod, and for node-a's own pods
    kube-proxy's masquerade (node-a's pod gateway) or, on the TC path, the client's (it SNATs only what
    leaves the node again, as Cilium does)."""
    res = measure(case, 0.5, workers)
    ns = case.ns
    if res["errors"] or not res["ok"]:
        raise RuntimeError(
            f"{case.name}: {res['errors']} errors of {res['ok'] + res['errors']}: {res['last_error']}"
        )
    if case.mode == "direct":
        want = {f"{pod.name} {ns.client.ip(family)}" for pod in ns.backends}
    else:
        local = ns.client.ip(family) if case.mode == "tc" else ns.a.gateway4 if family == 4 else ns.a.gateway6
        want = {f"{p.name} {local if p.node == ns.a.name else ns.a.ip(family)}" for p in ns.backends}
    if set(res["answers"]) != want:
        raise RuntimeError(f"{case.name}: answers {res['answers']}, expected each of {sorted(want)}")
    return dict(res["answers"])


# --- where the TC path's time goes --------------------------------------------------------------------------


@contextlib.contextmanager
def bpf_stats() -> Iterator[None]:
    """Run-time statistics of every BPF program on, while inside (BPF_ENABLE_STATS: the kernel turns them off
    again when the descriptor closes, so a crash leaves nothing on; they add two clock reads to every run)."""
    lib = ctypes.CDLL("libbpf.so.1", use_errno=True)
    fd = lib.bpf_enable_stats(ctypes.c_int(BPF_STATS_RUN_TIME))
    if fd < 0:
        raise OSError(-fd, f"bpf_enable_stats: {os.strerror(-fd)}")
    try:
        yield
    finally:
        os.close(fd)


def program_runs(link: str) -> tuple[int, int]:
    """(run_time_ns, run_cnt) of the program behind a pinned link."""
    prog = bpftool_json("prog", "show", "id", str(bpftool_json("link", "show", "pinned", link)["prog_id"]))
    return int(prog.get("run_time_ns", 0)), int(prog.get("run_cnt", 0))


def profile_tc(case: Case, args: argparse.Namespace) -> dict[str, Any]:
    """One more loaded run of a tc case with bpf_stats on: per program, ns per run and runs per connection;
    all programs' ns per connection; the run's conn/s (with the stats' own cost in it)."""
    assert case.agent is not None
    links = case.agent.links
    with bpf_stats():
        before = {p: program_runs(link) for p, link in links.items()}
        res = measure(case, args.duration, args.workers)
        after = {p: program_runs(link) for p, link in links.items()}
    ok = max(res["ok"], 1)
    out: dict[str, Any] = {"rate": res["rate"], "errors": res["errors"], "programs": {}}
    total = 0
    for p in links:
        ns_spent, runs = after[p][0] - before[p][0], after[p][1] - before[p][1]
        total += ns_spent
        out["programs"][p] = {"ns_per_run": ns_spent / max(runs, 1), "runs_per_conn": runs / ok}
    out["ns_per_conn"] = total / ok
    return out


NSSTATS = {
    abi.NSSTAT_SNAT_ALLOCATED: "snat_ports_taken",
    abi.NSSTAT_SNAT_RETRIES: "snat_ports_found_taken",
    abi.NSSTAT_CT_CREATED: "flows_tracked",
}


def tc_counters(bpffs: Path) -> dict[str, int]:
    """The TC programs' counters since the agent started (bpftool's dump of the pinned per-CPU maps): new
    flows by result (``translated_local``, ``dropped_snat_ports``, ...) and the SNAT port allocator's."""
    out: dict[str, int] = {}
    for entry in bpftool_json("map", "dump", "pinned", str(bpffs / "maps" / abi.MAP_STATS)):
        key = entry["formatted"]["key"]
        if key["hook"] in (abi.HOOK_TC_INGRESS, abi.HOOK_TC_EGRESS):
            name = abi.RESULTS.get(key["result"], str(key["result"]))
            out[name] = out.get(name, 0) + per_cpu_sum(entry)
    for entry in bpftool_json("map", "dump", "pinned", str(bpffs / "maps" / abi.MAP_NS_STATS)):
        if entry["formatted"]["key"] in NSSTATS:
            out[NSSTATS[entry["formatted"]["key"]]] = per_cpu_sum(entry)
    return out


def per_cpu_sum(entry: dict[str, Any]) -> int:
    return sum(int(v["value"]) for v in entry["formatted"]["values"])


def startup_only(args: argparse.Namespace) -> AgentReport:
    """An agent started on ``--startup-nodeports`` Services, every one a NodePort (the decoys' beyond the
    default range), in a topology of its own after the others closed: its start-up time and memory."""
    count = args.startup_nodeports
    log(f"start-up only: {count} NodePort Services")
    with (
        NsTopology(servers=False) as ns,
        setup_balancing(ns, count, args.family, node_ports=count, agent_extra=agent_flags(args)) as agent,
    ):
        return agent


# --- the run ------------------------------------------------------------------------------------------------


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def plan(args: argparse.Namespace) -> list[tuple[str, int]]:
    counts = [int(c) for c in args.services.split(",")]
    modes = [f"iptables-{b}" for b in args.iptables.split(",") if b] + (["tc"] if not args.no_tc else [])
    return [("direct", 0)] + [(m, n) for m in modes for n in counts]


def agent_flags(args: argparse.Namespace) -> list[str]:
    return ["--snat-ports", args.snat_ports] if args.snat_ports else []


def open_cases(args: argparse.Namespace, stack: contextlib.ExitStack) -> list[Case]:
    """Each planned case in its own topology, servers started, path programmed and checked."""
    cases: list[Case] = []
    for mode, services in plan(args):
        ns = stack.enter_context(NsTopology(servers=False))
        start_servers(ns, args.server_threads)
        case = Case(mode, services, ns)
        set_up(case, args.family, stack, agent_flags(args))
        answers = check(case, args.family, args.workers)
        log(f"{case.name}: set up in {case.setup_seconds:.2f} s; answers {answers}")
        cases.append(case)
    return cases


Runs = dict[str, list[dict[str, Any]]]  # {case: [{"load": probe result, "sequential": probe result}]}


def run_rounds(cases: list[Case], args: argparse.Namespace) -> Runs:
    """Per round and case: a loaded run (``--workers`` threads: conn/s) and a sequential one (one thread:
    latency without queueing behind the other workers)."""
    for case in cases:
        measure(case, args.warmup, args.workers)
    raw: Runs = {c.name: [] for c in cases}
    for r in range(args.rounds):
        for case in cases if r % 2 == 0 else reversed(cases):
            runs = {
                "load": measure(case, args.duration, args.workers),
                "sequential": measure(case, args.sequential_duration, 1),
            }
            for kind, res in runs.items():
                if res["errors"]:
                    log(f"{case.name} round {r + 1} {kind}: {res['errors']} errors ({res['last_error']})")
            raw[case.name].append(runs)
        rates = ", ".join(f"{n} {v[-1]['load']['rate']:.0f}/s" for n, v in raw.items())
        log(f"round {r + 1}/{args.rounds}: {rates}")
    return raw


def stat(samples: list[float]) -> dict[str, float]:
    return {"median": statistics.median(samples), "min": min(samples), "max": max(samples)}


FIGURES = {  # name: (run, the probe's figure)
    "rate": ("load", ("rate",)),
    "connect_p50": ("sequential", ("connect_us", "p50")),
    "connect_p99": ("sequential", ("connect_us", "p99")),
    "exchange_p50": ("sequential", ("exchange_us", "p50")),
    "loaded_connect_p50": ("load", ("connect_us", "p50")),
    "loaded_connect_p99": ("load", ("connect_us", "p99")),
}
RATIOS = ("rate", "connect_p50", "exchange_p50")


def figure(runs: dict[str, Any], name: str) -> float:
    kind, path = FIGURES[name]
    value: Any = runs[kind]
    for key in path:
        value = value[key]
    return float(value)


def summarize(cases: list[Case], raw: Runs) -> dict[str, Any]:
    """{"cases": {name: {figure: stat, "errors": n}}, "ratios": {"a / b": {figure: stat}}, "targets": [...]}:
    stats over the rounds; ratios taken per round (paired); the issue's targets judged on those ratios."""
    out: dict[str, Any] = {"cases": {}, "ratios": {}}
    for name, rounds in raw.items():
        out["cases"][name] = {f: stat([figure(r, f) for r in rounds]) for f in FIGURES}
        out["cases"][name]["errors"] = sum(r[k]["errors"] for r in rounds for k in r)
    for a, b in ratio_pairs(cases):
        pairs = list(zip(raw[a.name], raw[b.name], strict=True))
        out["ratios"][f"{a.name} / {b.name}"] = {
            f: stat([figure(x, f) / figure(y, f) for x, y in pairs]) for f in RATIOS
        }
    out["targets"] = targets(out["ratios"])
    return out


RATE_TARGETS = {1: 1.0, 10000: 4.0}  # the issue's: tc / iptables conn/s at least this, by Service count
DIRECT_TARGET = 1.2  # the issue's: tc within this factor of routing straight to the pods


def targets(ratios: dict[str, Any]) -> list[dict[str, Any]]:
    """The issue's targets on the per-round ratios: tc / iptables conn/s (``RATE_TARGETS``); tc / direct
    within ``DIRECT_TARGET`` (conn/s, connect p50, exchange p50). "met": by the median; "every_round": by
    the worst round too."""
    out = []
    for name, r in ratios.items():
        tc, other = name.split(" / ")
        if not tc.startswith("tc "):
            continue
        if other == "direct":
            out.append(goal(name, "rate", r["rate"], 1 / DIRECT_TARGET, higher=True))
            out += [goal(name, f, r[f], DIRECT_TARGET, higher=False) for f in ("connect_p50", "exchange_p50")]
        elif int(tc.split()[1]) in RATE_TARGETS:
            out.append(goal(name, "rate", r["rate"], RATE_TARGETS[int(tc.split()[1])], higher=True))
    return out


def goal(ratio: str, name: str, s: dict[str, float], bound: float, *, higher: bool) -> dict[str, Any]:
    met = s["median"] >= bound if higher else s["median"] <= bound
    every = s["min"] >= bound if higher else s["max"] <= bound
    wanted = f"{'>=' if higher else '<='} {bound:.3f}x"
    return {"ratio": ratio, "figure": name, "goal": wanted, **s, "met": met, "every_round": every}


def ratio_pairs(cases: list[Case]) -> list[tuple[Case, Case]]:
    """iptables/direct, tc/direct, tc/iptables (same Service count)."""
    direct = [c for c in cases if c.mode == "direct"]
    ipt = [c for c in cases if c.mode.startswith("iptables-")]
    tc = [c for c in cases if c.mode == "tc"]
    pairs = [(c, d) for c in ipt + tc for d in direct]
    pairs += [(t, i) for t in tc for i in ipt if t.services == i.services]
    return pairs


def print_table(doc: dict[str, Any]) -> None:
    cfg, summary = doc["config"], doc["summary"]
    print(
        f"IPv{cfg['family']}; {cfg['workers']} client threads x {cfg['duration']} s per run, "
        f"{cfg['rounds']} rounds interleaved; connect + request/answer + close (RST); "
        "median (min..max) over the rounds"
    )
    columns = {
        "rate": "conn/s",
        "connect_p50": "connect p50 us",
        "connect_p99": "connect p99 us",
        "exchange_p50": "exchange p50 us",
        "loaded_connect_p50": "loaded connect p50",
    }
    head = f"{'case':22s}" + "".join(f" {c:>22s}" for c in columns.values())
    print(head)
    print("-" * len(head))
    for name, s in summary["cases"].items():
        cells = [fmt(s[k]) for k in columns]
        errors = f"  ({s['errors']} errors)" if s["errors"] else ""
        print(f"{name:22s}" + "".join(f" {c:>22s}" for c in cells) + errors)
    if summary["ratios"]:
        print(f"\n{'ratio (per round)':36s}" + "".join(f" {columns[f]:>24s}" for f in RATIOS))
        for name, r in summary["ratios"].items():
            print(f"{name:36s}" + "".join(f" {fmt_ratio(r[f]):>24s}" for f in RATIOS))
    if summary["targets"]:
        print(f"\n{'the issue targets':36s} {'figure':>14s} {'goal':>10s} {'median [min-max]':>26s}  met")
        for t in summary["targets"]:
            met = ("yes" if t["every_round"] else "by the median") if t["met"] else "NO"
            print(f"{t['ratio']:36s} {t['figure']:>14s} {t['goal']:>10s} {fmt_ratio(t):>26s}  {met}")
    print_agents(doc["agents"], "Balancing's agent on node-a, per tc case")
    print_profile(doc["tc_profile"])
    for name, counts in doc["tc_counters"].items():
        print(f"{name} datapath counters, the whole run: " + ", ".join(f"{k} {v}" for k, v in counts.items()))
        if counts.get("dropped_snat_ports"):
            print(f"  {name}: new flows to node-b's pod dropped for want of a free SNAT port (each costs")
            print(
                "  its client a SYN retransmission, 1 s): the --snat-ports range is too small for this rate"
            )
    if doc["startup"]:
        print_agents(doc["startup"], "start-up only (no traffic): every Service a NodePort")
    sys.stdout.flush()


def print_agents(agents: dict[str, dict[str, Any]], title: str) -> None:
    if not agents:
        return
    print(f"\n{title}: seconds from its start; RSS now (peak); its maps' kernel memory (of which Maglev)")
    print(f"{'case':22s} {'ready s':>8s} {'programmed s':>13s} {'frontends':>10s} {'Maglev tables':>14s} "
          f"{'RSS MiB':>16s} {'maps MiB':>18s}")  # fmt: skip
    for name, a in agents.items():
        rss = f"{a['rss_mib']:.0f} ({a['peak_rss_mib']:.0f})"
        maps = f"{a['map_mib']:.0f} ({a['maglev_mib']:.0f})"
        print(f"{name:22s} {a['ready_seconds']:8.1f} {a['programmed_seconds']:13.1f} {a['frontends']:10d} "
              f"{a['maglev_tables']:14d} {rss:>16s} {maps:>18s}")  # fmt: skip
        print(f"{'':22s} agent log: {a['full_sync'].partition('full sync:')[2].strip()}")
        if a["rounds_cpu_seconds"]:
            print(f"{'':22s} its CPU time during the rounds: {a['rounds_cpu_seconds']:.1f} s")


def print_profile(profile: dict[str, dict[str, Any]]) -> None:
    if not profile:
        return
    print("\nthe TC programs: one more loaded run per tc case, bpf_stats on (its conn/s pays for them)")
    print(f"{'case':22s} " + " ".join(f"{p + ' ns/run (runs/conn)':>32s}" for p in TC_PROGRAMS)
          + f" {'bpf ns/conn':>12s} {'conn/s':>8s}")  # fmt: skip
    for name, prof in profile.items():
        cells = [prof["programs"][p] for p in TC_PROGRAMS]
        text = [f"{c['ns_per_run']:.0f} ({c['runs_per_conn']:.2f})" for c in cells]
        print(f"{name:22s} " + " ".join(f"{t:>32s}" for t in text)
              + f" {prof['ns_per_conn']:12.0f} {prof['rate']:8.0f}")  # fmt: skip


def fmt(s: dict[str, float]) -> str:
    return f"{s['median']:.0f} ({s['min']:.0f}..{s['max']:.0f})"


def fmt_ratio(s: dict[str, float]) -> str:
    return f"{s['median']:.3f}x [{s['min']:.3f}-{s['max']:.3f}]"


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument(
        "--services", default="1,10000", help="comma-separated Service counts for iptables and tc"
    )
    ap.add_argument(
        "--iptables", default="nft", help="iptables backends, comma-separated: nft, legacy ('' none)"
    )
    ap.add_argument("--no-tc", action="store_true", help="leave the tc cases out")
    ap.add_argument(
        "--snat-ports",
        help="the tc agents' --snat-ports LOW-HIGH (default: the agent's own, 61000-65535)",
    )
    ap.add_argument(
        "--no-bpf-profile", action="store_true", help="no bpf_stats run of the tc cases after the rounds"
    )
    ap.add_argument(
        "--startup-nodeports",
        type=int,
        default=0,
        help="at the end, also time an agent's start on this many NodePort Services (no traffic; 0: not)",
    )
    ap.add_argument("--family", type=int, choices=[4, 6], default=4)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--duration", type=float, default=3.0, help="seconds per run")
    ap.add_argument(
        "--sequential-duration", type=float, default=1.0, help="seconds of the one-thread latency run"
    )
    ap.add_argument("--warmup", type=float, default=1.0, help="seconds of one unrecorded run per case")
    ap.add_argument("--workers", type=int, default=4, help="client threads")
    ap.add_argument("--server-threads", type=int, default=2, help="accepting threads per pod")
    ap.add_argument("-o", "--output", choices=["table", "json"], default="table")
    ap.add_argument("--json", type=Path, help="also write the JSON document (summary and raw samples) here")
    return ap.parse_args()


def main() -> None:
    args = parse_args()
    exit_on_signals()
    build_probe()
    with contextlib.ExitStack() as stack:
        cases = open_cases(args, stack)
        agents = [c.agent for c in cases if c.agent]
        cpu = [cpu_seconds(a.pid) for a in agents]
        raw = run_rounds(cases, args)
        for agent, before in zip(agents, cpu, strict=True):
            agent.rounds_cpu_seconds = cpu_seconds(agent.pid) - before
        profile = {} if args.no_bpf_profile else {c.name: profile_tc(c, args) for c in cases if c.agent}
        counters = {c.name: tc_counters(c.ns.a.bpffs) for c in cases if c.agent}
        doc = {
            "config": {k: v for k, v in vars(args).items() if k not in ("json", "output")},
            "setup_seconds": {c.name: round(c.setup_seconds, 3) for c in cases},
            "summary": summarize(cases, raw),
            "agents": {c.name: asdict(c.agent) for c in cases if c.agent},
            "tc_profile": profile,
            "tc_counters": counters,
            "raw": raw,
        }
    doc["startup"] = {}
    if args.startup_nodeports:
        doc["startup"] = {f"tc {args.startup_nodeports} NodePorts": asdict(startup_only(args))}
    text = json.dumps(doc, indent=2)
    if args.json:
        args.json.write_text(text)
    if args.output == "json":
        print(text)
    else:
        print_table(doc)


if __name__ == "__main__":
    main()
