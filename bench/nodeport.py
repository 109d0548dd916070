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
- ``tc`` with N Services: Balancing's TC programs on node-a's uplink, set up by :func:`setup_balancing`
  (THE HOOK TO FILL IN; skipped with a message while it raises NotImplementedError).

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
the summary and the raw samples as one JSON document (``--json PATH`` also writes it).

Run as root: ``.venv/bin/python bench/nodeport.py [--services 1,10000] [--rounds 5] [--iptables nft,legacy]
[--family 4|6] [-o table|json]`` (about 80 s at the defaults, 2 minutes with both backends). The
topologies (namespaces with their rules, processes, cgroups) are removed at the end, also on errors and
SIGTERM. Needs gcc, iproute2 and iptables (both backends: the ``iptables`` Debian package).

Neighbours: bench/run.py and bench/hooks.py (the socket hooks' costs, same conventions), the topology in
testkit/balancing_testkit/nstopology.py, the TC datapath (bpf/nodeport.c) for the hook. About 300 of its lines
are the C probe, kept here as a string (compiled into build/bench at start) so the benchmark is one file; it
could move to bench/nodeport_probe.c beside the other probes.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from balancing_testkit.nstopology import CLUSTER_CIDRS, NsTopology
from balancing_testkit.topology import exit_on_signals

ROOT = Path(__file__).resolve().parents[1]
PROBE = ROOT / "build/bench/nodeport_probe"
BENCH_PORT = 9000  # the pods' probe servers
NODE_PORT = 32767  # the measured Service's NodePort on node-a (the last of the default range)
NODE_PORT_RANGE = range(30000, 32767)  # the decoys' NodePorts
MASQ_BIT = "0x4000"
MASQ_MARK = f"{MASQ_BIT}/{MASQ_BIT}"
RESTORE = {
    ("nft", 4): "iptables-nft-restore",
    ("nft", 6): "ip6tables-nft-restore",
    ("legacy", 4): "iptables-legacy-restore",
    ("legacy", 6): "ip6tables-legacy-restore",
}


# --- THE HOOK: Balancing's TC path --------------------------------------------------------------------------


def setup_balancing(ns: NsTopology, services: int) -> contextlib.AbstractContextManager[None]:
    """HOOK (to be filled in by the TC datapath's author): make node-a's NodePort ``NODE_PORT``/TCP, on
    ``ns.a.ip4`` and ``ns.a.ip6``, balance new connections over every pod's ``BENCH_PORT``
    (``ns.backends``; externalTrafficPolicy Cluster: node-b's pod too, the client SNATed to node-a), with
    ``services - 1`` other Services programmed beside it, through Balancing's TC programs on node-a's uplink
    (``ns.a.uplink``, ifindex ``ns.a.uplink_ifindex`` inside ``ns.a.netns``). An agent for node-a runs with
    ``ns.nsenter(ns.a, argv)`` (or ``ns.spawn(ns.a, argv)``), ``--cgroup ns.a.cgroup``, ``--bpffs
    ns.a.bpffs``, ``--nodeport-devices ns.a.uplink``. Entering returns once the path is programmed; leaving
    undoes it (the namespaces, and what is attached in them, go when the topology closes anyway).
    Until then: NotImplementedError, and the benchmark skips the ``tc`` cases."""
    raise NotImplementedError("Balancing's TC NodePort path is not wired into bench/nodeport.py yet")


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


# --- kube-proxy's iptables rules ----------------------------------------------------------------------------


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


def kube_proxy_rules(services: int, backends: list[str], family: int) -> str:
    """The iptables-restore input for ``services`` Services, the measured one (NodePort ``NODE_PORT`` to
    ``backends``) last."""
    chains, services_chain, nodeports, own = [], [], [], []
    decoy_ports = iter(NODE_PORT_RANGE)
    for index in range(1, services + 1):
        measured = index == services
        endpoints = backends if measured else [decoy_endpoint(index, family)]
        node_port = NODE_PORT if measured else next(decoy_ports, None)
        c, s, n, o = service_rules(index, endpoints, node_port, family)
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


# --- the cases ----------------------------------------------------------------------------------------------


@dataclass
class Case:
    """One way of reaching the pods, in a topology of its own."""

    mode: str  # "direct", "iptables-nft", "iptables-legacy", "tc"
    services: int  # 0 for direct
    ns: NsTopology
    targets: list[tuple[str, int]] = field(default_factory=list)
    setup_seconds: float = 0.0

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


def set_up(case: Case, family: int, stack: contextlib.ExitStack) -> None:
    """Program the case's path on node-a; its targets."""
    ns, t0 = case.ns, time.monotonic()
    if case.mode == "direct":
        case.targets = [(pod.ip(family), BENCH_PORT) for pod in ns.backends]
    elif case.mode.startswith("iptables-"):
        rules = kube_proxy_rules(case.services, [pod.ip(family) for pod in ns.backends], family)
        ns.run(ns.a, [RESTORE[case.mode.removeprefix("iptables-"), family]], input=rules, timeout=300)
        case.targets = [(ns.a.ip(family), NODE_PORT)]
    else:
        stack.enter_context(setup_balancing(ns, case.services))
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
    """A short run: no errors, every pod answers, each seeing the address it should (the client's for direct,
    node-a's for the eTP Cluster NodePort: its pod gateway for local pods, its uplink for node-b's)."""
    res = measure(case, 0.5, workers)
    ns = case.ns
    if res["errors"] or not res["ok"]:
        raise RuntimeError(
            f"{case.name}: {res['errors']} errors of {res['ok'] + res['errors']}: {res['last_error']}"
        )
    if case.mode == "direct":
        want = {f"{pod.name} {ns.client.ip(family)}" for pod in ns.backends}
    else:
        gateway = ns.a.gateway4 if family == 4 else ns.a.gateway6
        want = {f"{p.name} {gateway if p.node == ns.a.name else ns.a.ip(family)}" for p in ns.backends}
    if set(res["answers"]) != want:
        raise RuntimeError(f"{case.name}: answers {res['answers']}, expected each of {sorted(want)}")
    return dict(res["answers"])


# --- the run ------------------------------------------------------------------------------------------------


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def plan(args: argparse.Namespace) -> list[tuple[str, int]]:
    counts = [int(c) for c in args.services.split(",")]
    modes = [f"iptables-{b}" for b in args.iptables.split(",") if b] + (["tc"] if not args.no_tc else [])
    return [("direct", 0)] + [(m, n) for m in modes for n in counts]


def open_cases(args: argparse.Namespace, stack: contextlib.ExitStack) -> tuple[list[Case], list[str]]:
    """Each planned case in its own topology, servers started, path programmed and checked; and the names
    of the cases skipped (a hook not filled in yet)."""
    cases: list[Case] = []
    skipped: list[str] = []
    for mode, services in plan(args):
        ns = stack.enter_context(NsTopology(servers=False))
        start_servers(ns, args.server_threads)
        case = Case(mode, services, ns)
        try:
            set_up(case, args.family, stack)
        except NotImplementedError as exc:
            log(f"skipping {case.name}: {exc}")
            skipped.append(case.name)
            continue
        answers = check(case, args.family, args.workers)
        log(f"{case.name}: set up in {case.setup_seconds:.2f} s; answers {answers}")
        cases.append(case)
    return cases, skipped


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
    """{"cases": {name: {figure: stat, "errors": n}}, "ratios": {"a / b": {figure: stat}}}: stats over the
    rounds; ratios taken per round (paired)."""
    out: dict[str, Any] = {"cases": {}, "ratios": {}}
    for name, rounds in raw.items():
        out["cases"][name] = {f: stat([figure(r, f) for r in rounds]) for f in FIGURES}
        out["cases"][name]["errors"] = sum(r[k]["errors"] for r in rounds for k in r)
    for a, b in ratio_pairs(cases):
        pairs = list(zip(raw[a.name], raw[b.name], strict=True))
        out["ratios"][f"{a.name} / {b.name}"] = {
            f: stat([figure(x, f) / figure(y, f) for x, y in pairs]) for f in RATIOS
        }
    return out


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
    for name in doc["skipped"]:
        print(f"skipped: {name}")
    sys.stdout.flush()


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
        cases, skipped = open_cases(args, stack)
        raw = run_rounds(cases, args)
        doc = {
            "config": {k: v for k, v in vars(args).items() if k not in ("json", "output")},
            "setup_seconds": {c.name: round(c.setup_seconds, 3) for c in cases},
            "skipped": skipped,
            "summary": summarize(cases, raw),
            "raw": raw,
        }
    text = json.dumps(doc, indent=2)
    if args.json:
        args.json.write_text(text)
    if args.output == "json":
        print(text)
    else:
        print_table(doc)


if __name__ == "__main__":
    main()
