"""The agent as a process against hostile manifest files (issue 10): whatever a file holds, the agent lives.

For each trigger the agent runs on a manifest directory with a good Service A programmed, then a bad
``bad.yaml`` appears (deep nesting, a 5,000-digit port, an out-of-range nodePort, a quoted out-of-range
targetPort, an alias bomb, duplicate keys, a FIFO, a directory, a dangling symlink, non-UTF-8 bytes). The
agent must name the file in its log (a located error for content, a warning for an entry that is not a
regular file), keep running and healthy with no supervised task restarted, and still follow the directory:
a Service B added afterwards is programmed and real traffic from a client netns reaches B's pod while A keeps
working. Restarted with the bad file still there, the agent becomes ready with A and B programmed.

One agent run (start, then a restart) per trigger, so a failure names its trigger and nothing one trigger
leaves behind (a hung worker thread, a held lock) can hide or cause another's failure.

A last test keeps ``/healthz`` under a 50 ms poll while a ~6 MB file of 20,000 Services is parsed after an
edit: every answer must come within a second (parsing runs in a worker thread, not on the event loop).
"""

from __future__ import annotations

import os
import re
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

from balancing_testkit.topology import Cluster, Pod
from helpers.support import AgentProcess, endpoint, endpoint_slice, service, wait_until, write_manifest

VIP_A, VIP_B, VIP_BAD, VIP_C = "10.96.0.10", "10.96.0.20", "10.96.0.30", "10.96.0.40"
BAD = "bad.yaml"
TASK_FAILED = re.compile(r"task \S+ (failed|ended unexpectedly)")


def key(vip: str) -> str:
    return f"{vip}:80/TCP"


def app(name: str, vip: str, backend: Pod) -> list[dict[str, Any]]:
    """A Service on ``vip``:80 with one ready endpoint, ``backend``:8080."""
    return [
        service(name, [vip], [("http", 80, "TCP", 8080)]),
        endpoint_slice(name, [endpoint(backend.ip4)], [("http", 8080, "TCP")]),
    ]


def connect(cluster: Cluster, vip: str, count: int = 20) -> dict[str, Any]:
    return cluster.topo.run_client(cluster.client, None, ["tcp", vip, "80", "--count", str(count)])


# --- the triggers ---------------------------------------------------------------------------------------


def _service_text(spec: str) -> str:
    """A Service "bad" on VIP_BAD in YAML text (some triggers cannot be written by a YAML dumper); ``spec``
    goes on after ``clusterIPs``, indented by two spaces."""
    return (
        "apiVersion: v1\nkind: Service\nmetadata:\n  name: bad\n  namespace: default\nspec:\n"
        f"  clusterIP: {VIP_BAD}\n  clusterIPs: [{VIP_BAD}]\n{spec}"
    )


def _port(port: str, extra: str = "") -> str:
    return f"  ports:\n  - name: http\n    port: {port}\n    protocol: TCP\n    targetPort: 8080\n{extra}"


def _laughs() -> str:
    """The "billion laughs": nine levels of nine aliases each, 9**9 strings once expanded, in ~400 bytes."""
    lines = ["l0: &l0 [lol,lol,lol,lol,lol,lol,lol,lol,lol]"]
    lines += [f"l{i}: &l{i} [{','.join([f'*l{i - 1}'] * 9)}]" for i in range(1, 9)]
    return "\n".join(lines) + "\n"


def _text(content: str | bytes) -> Callable[[Path], None]:
    def make(path: Path) -> None:
        path.write_bytes(content.encode() if isinstance(content, str) else content)

    return make


def _fifo(path: Path) -> None:
    os.mkfifo(path)


def _directory(path: Path) -> None:
    path.mkdir()
    (path / "inside.yaml").write_text("apiVersion: v1\n")


def _dangling(path: Path) -> None:
    path.symlink_to(path.parent / "no-such-file.yaml")


@dataclass(frozen=True)
class Trigger:
    make: Callable[[Path], None]  # creates the bad entry at the path given
    level: str  # of the log line naming the file: ERROR (located problem) or WARNING (entry skipped)
    patterns: tuple[str, ...]  # each must match that same line (the location, then what is wrong)


LINE = r"(line \d+|position \d+)"  # where in the text
TRIGGERS = [
    pytest.param(Trigger(_text("[" * 3000), "ERROR", (LINE, r"nesting|depth")), id="a-deep-nesting"),
    pytest.param(
        Trigger(
            _text(_service_text(_port("1" * 5000))), "ERROR", (rf"{LINE}|spec\.ports\[0\]\.port\b", "5000")
        ),
        id="b-5000-digit-port",
    ),
    pytest.param(
        Trigger(
            _text(_service_text("  type: NodePort\n" + _port("80", "    nodePort: 70000\n"))),
            "ERROR",
            (r"Service default/bad", r"spec\.ports\[0\]\.nodePort: .*70000"),
        ),
        id="c-nodeport-70000",
    ),
    pytest.param(
        Trigger(
            _text(_service_text(_port("80").replace("targetPort: 8080", 'targetPort: "99999"'))),
            "ERROR",
            (r"Service default/bad", r"spec\.ports\[0\]\.targetPort: .*99999"),
        ),
        id="d-quoted-target-port-99999",
    ),
    pytest.param(Trigger(_text(_laughs()), "ERROR", (r"document 1", r"alias")), id="e-alias-bomb"),
    pytest.param(
        Trigger(
            _text(_service_text(_port("80\n    port: 81"))),
            "ERROR",
            (LINE, r"port.*(already defined|duplicate)"),
        ),
        id="f-duplicate-key",
    ),
    pytest.param(Trigger(_fifo, "WARNING", (r"FIFO",)), id="g-fifo"),
    pytest.param(Trigger(_directory, "WARNING", (r"directory",)), id="h-directory"),
    pytest.param(Trigger(_dangling, "WARNING", (r"symlink",)), id="i-dangling-symlink"),
    pytest.param(
        Trigger(
            _text(b"apiVersion: v1\nkind: Service\nmetadata: {name: caf\xe9}\n"),
            "ERROR",
            (LINE, r"UTF-8"),
        ),
        id="j-not-utf8",
    ),
]


def naming_line(log: str, trigger: Trigger) -> str | None:
    """The first line of ``log`` at the trigger's level naming ``bad.yaml`` that matches all its patterns."""
    lines = (line for line in log.splitlines() if f" {trigger.level} " in line and BAD in line)
    return next((ln for ln in lines if all(re.search(p, ln, re.IGNORECASE) for p in trigger.patterns)), None)


def wait_for_naming_line(agent: AgentProcess, trigger: Trigger, timeout: float = 5.0) -> None:
    """Until the agent logs the trigger's line; on a timeout or the agent's exit, fail with its log."""

    def logged() -> bool:
        assert agent.proc is not None
        if agent.proc.poll() is not None:
            raise AssertionError(f"the agent exited {agent.proc.returncode}:\n{agent.stderr()}")
        return naming_line(agent.stderr(), trigger) is not None

    try:
        wait_until(logged, timeout, f"a {trigger.level} naming {BAD} matching {trigger.patterns}")
    except AssertionError as exc:
        raise AssertionError(f"{exc}\n--- agent log ---\n{agent.stderr()[-4000:]}") from None


def assert_serving(cluster: Cluster, agent: AgentProcess) -> None:
    """A and B programmed and reached by real traffic; the bad Service never; the agent alive and healthy
    with no supervised task restarted."""
    a, b, _ = cluster.pods
    agent.wait_frontends(
        lambda f: f.get(key(VIP_A)) == [f"{a.ip4}:8080"] and f.get(key(VIP_B)) == [f"{b.ip4}:8080"],
        timeout=5,
        what="A and B in the maps",
    )
    assert key(VIP_BAD) not in agent.frontends(), "nothing of the bad file is programmed"
    assert connect(cluster, VIP_A)["backends"] == {"pod-a": 20}
    assert connect(cluster, VIP_B)["backends"] == {"pod-b": 20}
    assert agent.proc is not None and agent.proc.poll() is None, agent.stderr()
    code, body = agent.get("/healthz")
    assert code == 200, body
    assert not TASK_FAILED.search(agent.stderr()), agent.stderr()


@pytest.mark.parametrize("trigger", TRIGGERS)
def test_a_bad_file_is_reported_and_the_agent_keeps_following(
    cluster: Cluster, manifests: Path, agent: AgentProcess, trigger: Trigger
) -> None:
    a, b, _ = cluster.pods
    write_manifest(manifests, "a.yaml", app("a", VIP_A, a))
    agent.start()
    assert connect(cluster, VIP_A)["backends"] == {"pod-a": 20}

    trigger.make(manifests / BAD)
    wait_for_naming_line(agent, trigger)
    write_manifest(manifests, "b.yaml", app("b", VIP_B, b))
    assert_serving(cluster, agent)

    assert agent.proc is not None
    stopped = cluster.topo.stop(agent.proc)
    assert stopped.returncode == 0, stopped.stderr  # SIGTERM honoured: nothing hung on the bad entry
    agent.start()  # waits for /readyz 200 with the bad file still there
    assert naming_line(agent.stderr(), trigger) is not None, agent.stderr()
    assert_serving(cluster, agent)


# --- a large manifest parsed while /healthz is polled ---------------------------------------------------

BULK = """---
apiVersion: v1
kind: Service
metadata:
  name: bulk-{i}
  namespace: default
  labels: {{app: bulk-{i}, tier: bulk}}
spec:
  clusterIP: None
  selector: {{app: bulk-{i}}}
  ports:
  - {{name: http, port: 80, protocol: TCP, targetPort: 8080}}
  - {{name: https, port: 443, protocol: TCP, targetPort: 8443}}
"""


class Poller(threading.Thread):
    """GET /healthz every ``interval`` seconds, recording (status or exception name, seconds taken)."""

    def __init__(self, port: int, interval: float = 0.05) -> None:
        super().__init__(daemon=True)
        self.url, self.interval = f"http://127.0.0.1:{port}/healthz", interval
        self.answers: list[tuple[int | str, float]] = []
        self.done = threading.Event()

    def run(self) -> None:
        while not self.done.is_set():
            start = time.monotonic()
            try:
                with urllib.request.urlopen(self.url, timeout=5) as r:
                    r.read()
                    status: int | str = r.status
            except urllib.error.HTTPError as exc:
                status = exc.code
            except OSError as exc:
                status = type(exc).__name__
            self.answers.append((status, time.monotonic() - start))
            self.done.wait(self.interval)


def test_healthz_answers_within_a_second_while_a_large_manifest_is_parsed(
    cluster: Cluster, manifests: Path, agent: AgentProcess
) -> None:
    a, _, c = cluster.pods
    write_manifest(manifests, "a.yaml", app("a", VIP_A, a))
    agent.start()
    # 20,000 headless Services (no frontends: the parse is the cost), then C, so C programmed = parse done.
    bulk = "".join(BULK.format(i=i) for i in range(20_000))
    text = bulk + yaml.safe_dump_all(app("c", VIP_C, c), sort_keys=False, explicit_start=True)
    assert 5_000_000 < len(text) < 9_000_000
    tmp = manifests / ".bulk.yaml.tmp"
    tmp.write_text(text)
    poller = Poller(agent.port)
    poller.start()
    try:
        start = time.monotonic()
        tmp.rename(manifests / "bulk.yaml")
        took = agent.wait_frontends(
            lambda f: f.get(key(VIP_C)) == [f"{c.ip4}:8080"], timeout=90, what="C, after the bulk file"
        )
        parsed_in = time.monotonic() - start
    finally:
        poller.done.set()
        poller.join(10)
    answers = poller.answers
    slowest = max(t for _, t in answers)
    print(f"\nbulk file {len(text) / 1e6:.1f} MB: in force after {parsed_in:.1f} s ({took:.1f} s polled);")
    print(f"/healthz: {len(answers)} answers, slowest {slowest * 1000:.0f} ms")
    assert len(answers) >= 10, "polled all along"
    assert {s for s, _ in answers} == {200}, answers
    assert slowest < 1.0, f"/healthz took {slowest:.2f} s during the parse"
    assert connect(cluster, VIP_C)["backends"] == {"pod-c": 20}
    assert connect(cluster, VIP_A)["backends"] == {"pod-a": 20}
    assert not TASK_FAILED.search(agent.stderr()), agent.stderr()
