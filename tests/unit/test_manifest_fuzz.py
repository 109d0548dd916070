"""Fuzzing the manifest source end to end: random and mutated files through source, model store and writer.

Every case is written into a real manifest directory and goes the agent's way: ``ManifestDirectory.rescan``
→ ``ClusterStore`` → ``MapWriter`` on in-memory maps. Each case must be either applied (no error for its
file) or reported as ``ManifestError``\\ s of its file; nothing may raise; and a good file written after it
(the canary, a Service whose port changes every case) must be applied, its frontend present in the maps.

Two sources of cases, about 11,000 in all (seeded and derandomized, so every run is the same):
- mutations of the bundled manifests in ``examples/``, as YAML and as JSON: byte flips, truncations,
  deletions, inserted syntax; values swapped for edge values (huge, negative and zero ints, 5000-digit
  ints, floats, nulls, empty strings, control characters, unicode, deeply nested lists, wrong types);
  structural changes of the parsed documents re-dumped; duplicated keys, anchors and aliases;
- hypothesis: raw bytes, and Service documents whose fields hold arbitrary JSON-like values.
"""

from __future__ import annotations

import ipaddress
import json
import logging
import os
import random
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from balancing.datapath import abi
from balancing.datapath.maps import FakeMaps
from balancing.datapath.writer import MapWriter
from balancing.errors import ManifestError
from balancing.model.config import ModelConfig
from balancing.model.desired import Protocol
from balancing.model.store import ClusterStore
from balancing.sources.manifests import ManifestDirectory
from balancing.sources.update import SourceUpdate

EXAMPLES = sorted((Path(__file__).parents[2] / "examples").rglob("*.yaml"))
MUTATION_CASES = 8000
HYPOTHESIS_CASES = 1000  # per hypothesis test (two of them)
DUMPER = getattr(yaml, "CSafeDumper", yaml.SafeDumper)  # libyaml: the pure dumper would double the run time
CANARY_IP = ipaddress.ip_address("10.253.0.1")
BIG_INT = "9" * 5000  # past Python's int-string conversion limit
DEPTHS = (20, 98, 99, 150, 3000)  # nesting around the depth budget (100) and far past it
FUZZ = settings(
    max_examples=HYPOTHESIS_CASES,
    derandomize=True,
    database=None,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)


class Pipeline:
    """The agent's path for one directory: source → store → writer on fake maps, checked after each case."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.directory = ManifestDirectory(root)
        self.store = ClusterStore(ModelConfig("demo-node"))
        self.maps = FakeMaps()
        self.writer = MapWriter(self.maps)
        self.canary_port = 0
        self.cases = 0
        self.applied = 0
        self._apply(self.directory.load())

    def case(self, name: str, data: bytes) -> SourceUpdate:
        """One fuzzed file content: applied or reported, then a later good file is applied."""
        path = self.root / name
        path.write_bytes(data)
        update = self.directory.rescan({path})
        assert all(isinstance(e, ManifestError) and e.file == path for e in update.errors), update.errors
        self._apply(update)
        if not any(e.file == path for e in self.directory.errors()):
            self.applied += 1
        self.cases += 1
        self._canary()
        return update

    def _apply(self, update: SourceUpdate) -> None:
        for ref in update.deletes:
            self.store.delete(ref)
        for obj in update.upserts:
            self.store.upsert(obj)
        self.writer.apply(self.store.take_changes())

    def _canary(self) -> None:
        self.canary_port = self.canary_port % 60000 + 1
        path = self.root / "zz-canary.yaml"
        path.write_text(
            "apiVersion: v1\nkind: Service\nmetadata: {name: canary, namespace: zz-canary}\n"
            f"spec:\n  clusterIP: {CANARY_IP}\n  ports: [{{port: {self.canary_port}}}]\n"
        )
        update = self.directory.rescan({path})
        assert update.errors == [] and len(update.upserts) == 1, update
        self._apply(update)
        key = abi.svc_key(CANARY_IP, self.canary_port, Protocol.TCP, 0).pack()
        assert key in self.maps.data[abi.MAP_SERVICES], f"canary port {self.canary_port} not programmed"


@pytest.fixture
def pipeline(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> Iterator[Pipeline]:
    """A pipeline on a fresh directory, in memory (tmpfs) when there is one: rewriting a file in place on
    ext4 costs milliseconds (it flushes a file truncated and rewritten), ten times the case itself."""
    caplog.set_level(logging.ERROR, logger="balancing.sources.manifests")  # skipped kinds, conflicts
    shm = Path("/dev/shm")
    if not (shm.is_dir() and os.access(shm, os.W_OK)):
        yield Pipeline(tmp_path)
        return
    with tempfile.TemporaryDirectory(dir=shm, prefix="balancing-fuzz-") as root:
        yield Pipeline(Path(root))


# --- mutations of the examples ------------------------------------------------------------------------------

SNIPPETS = [
    "\x00", "\x01", "\t", "\x1b", "\x7f", "\x85", "\ufeff", "\u202e", "é", "😀", "\ud7ff",
    "&a ", "*a", "*b ", "<<: *a\n", "---\n", "...\n", "[", "]", "{", "}", ": ", "- ", "? ", "'", '"',
    "|\n", ">-\n", "!!binary ", "!!python/object:os.system ", "!!set ", "!!omap ", "%YAML 1.1\n", "#",
    ",", "\n  ", "\n    x: y\n", BIG_INT, "-" + BIG_INT, "1e999", ".nan", "0x" + "f" * 100, "~",
]  # fmt: skip


def edge_values(rng: random.Random) -> list[Any]:
    return [
        0, -1, 1, 65535, 65536, 2**31 - 1, 2**31, 2**63, -(2**63), 2**64, "__BIG_INT__", 0.5, -0.0,
        1e308, float("inf"), float("nan"), None, "", " ", "\x00", "\x01", "\x7f", "é", "😀", "\u202e",
        "a" * 300, "-1", "0x10", "10.0.0.1", "::1", "999.1.1.1", "TCP", "tcp", True, False, [], {},
        [None], ["x"] * 500, f"__DEEP_{rng.choice(DEPTHS)}__", {"kind": "List", "items": [{}]},
    ]  # fmt: skip


def placeholders(text: str) -> str:
    """The values a dumper cannot write (too long an int, too deep a list) put in after dumping."""
    text = text.replace('"__BIG_INT__"', BIG_INT).replace("__BIG_INT__", BIG_INT)
    for depth in DEPTHS:
        deep = "[" * depth + "1" + "]" * depth
        text = text.replace(f'"__DEEP_{depth}__"', deep).replace(f"__DEEP_{depth}__", deep)
    return text


def mutate_bytes(rng: random.Random, data: bytes) -> bytes:
    """Flip, cut, delete, repeat or insert, at random places."""
    out = bytearray(data)
    for _ in range(rng.randint(1, 4)):
        at = rng.randrange(len(out) + 1)
        kind = rng.randrange(7)
        if kind == 0 and out:
            out[min(at, len(out) - 1)] = rng.randrange(256)
        elif kind == 1:
            del out[at:]
        elif kind == 2:
            del out[at : at + rng.randint(1, 40)]
        elif kind in (3, 4):
            lines = bytes(out).split(b"\n")
            i = rng.randrange(len(lines))
            lines.insert(
                i + 1 if rng.random() < 0.7 else rng.randrange(len(lines) + 1), lines[i]
            )  # a key twice
            out = bytearray(b"\n".join(lines))
        else:
            out[at:at] = rng.choice(SNIPPETS).encode("utf-8", "surrogatepass")
    return bytes(out)


def paths(node: Any, prefix: tuple[Any, ...] = ()) -> Iterator[tuple[Any, ...]]:
    """Every path to a value in a parsed document."""
    yield prefix
    if isinstance(node, dict):
        for key, value in node.items():
            yield from paths(value, (*prefix, key))
    elif isinstance(node, list):
        for i, value in enumerate(node):
            yield from paths(value, (*prefix, i))


def mutate_document(rng: random.Random, documents: list[Any]) -> list[Any]:
    """Replace, delete, wrap, move or duplicate one value of one document."""
    documents = json.loads(json.dumps(documents))  # a deep copy
    doc_index = rng.randrange(len(documents))
    where = rng.choice(list(paths(documents[doc_index])))
    if not where:
        documents[doc_index] = rng.choice([*edge_values(rng), {"apiVersion": "v1", "kind": "List",
                                                               "items": [documents[doc_index]]}])  # fmt: skip
        return documents
    parent = documents[doc_index]
    for part in where[:-1]:
        parent = parent[part]
    last, kind = where[-1], rng.randrange(5)
    if kind == 0 and isinstance(parent, dict):
        del parent[last]
    elif kind == 1:
        parent[last] = [parent[last]] if rng.random() < 0.5 else {"value": parent[last]}
    elif kind == 2 and isinstance(parent, list):
        parent.insert(rng.randrange(len(parent) + 1), parent[last])
    elif kind == 3 and isinstance(parent, dict):
        parent[rng.choice(["kind", "apiVersion", "metadata", "spec", "status", "items", "unknown", 7])] = (
            parent[last]
        )
    else:
        parent[last] = rng.choice(edge_values(rng))
    return documents


def dump(rng: random.Random, documents: list[Any], as_json: bool) -> bytes:
    if as_json:
        doc = (
            documents[0] if len(documents) == 1 else {"apiVersion": "v1", "kind": "List", "items": documents}
        )
        text = json.dumps(doc, ensure_ascii=rng.random() < 0.5, indent=rng.choice([None, 2]))
    else:
        text = yaml.dump_all(documents, Dumper=DUMPER, sort_keys=False, allow_unicode=rng.random() < 0.5)
    return placeholders(text).encode()


def with_aliases(rng: random.Random, documents: list[Any]) -> list[Any]:
    """One value shared at two places (the dumper writes an anchor and an alias), sometimes inside itself,
    sometimes a nest of nine-fold shares (an alias bomb, over the alias budget from depth 6)."""
    documents = json.loads(json.dumps(documents))
    doc = documents[rng.randrange(len(documents))]
    places = [where for where in paths(doc) if where]
    if not places:
        return documents
    source, target = rng.choice(places), rng.choice(places)
    value = doc
    for part in source:
        value = value[part]
    if rng.random() < 0.3:
        value = ["lol"]
        for _ in range(rng.choice([2, 3, 6, 9])):
            value = [value] * 9
    parent = doc
    for part in target[:-1]:
        parent = parent[part]
    parent[target[-1]] = value  # inside itself when ``source`` is above ``target``
    return documents


def mutations(seed: int, count: int) -> Iterator[tuple[str, bytes]]:
    """``count`` (file name, content) cases from the examples, the same for the same seed."""
    rng = random.Random(seed)
    sources = [(p.read_bytes(), list(yaml.safe_load_all(p.read_bytes()))) for p in EXAMPLES]
    for _ in range(count):
        raw, documents = rng.choice(sources)
        as_json = rng.random() < 0.4
        kind = rng.randrange(4)
        if kind == 0:
            data = mutate_bytes(rng, dump(rng, documents, as_json) if as_json else raw)
        elif kind == 1:
            data = dump(rng, mutate_document(rng, documents), as_json)
        elif kind == 2:
            twice = mutate_document(rng, mutate_document(rng, documents))
            data = (
                mutate_bytes(rng, dump(rng, twice, as_json))
                if rng.random() < 0.3
                else dump(rng, twice, as_json)
            )
        else:
            as_json = False
            data = dump(rng, with_aliases(rng, mutate_document(rng, documents)), False)
        yield ("a-fuzz.json" if as_json else "a-fuzz.yaml"), data


def test_mutated_examples(pipeline: Pipeline) -> None:
    for name, data in mutations(seed=20240611, count=MUTATION_CASES):
        pipeline.case(name, data)
    assert pipeline.cases == MUTATION_CASES
    assert MUTATION_CASES // 20 < pipeline.applied < MUTATION_CASES * 19 // 20  # both outcomes well covered


def test_examples_themselves_apply(pipeline: Pipeline) -> None:
    for path in EXAMPLES:
        for name, data in [(path.name, path.read_bytes()), (path.stem + ".json", json_of(path))]:
            assert pipeline.case(name, data).errors == [], name


def json_of(path: Path) -> bytes:
    items = list(yaml.safe_load_all(path.read_bytes()))
    return json.dumps({"apiVersion": "v1", "kind": "List", "items": items}).encode()


# --- hypothesis ---------------------------------------------------------------------------------------------


@FUZZ
@given(data=st.binary(max_size=400), as_json=st.booleans())
def test_random_bytes(pipeline: Pipeline, data: bytes, as_json: bool) -> None:
    pipeline.case("a-fuzz.json" if as_json else "a-fuzz.yaml", data)


SCALARS = (
    st.none()
    | st.booleans()
    | st.integers()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats()
    | st.text(max_size=30)
    | st.sampled_from(["10.96.0.1", "fd00::1", "TCP", "UDP", "SCTP", "http", "80", "-1", "", "web"])
)
VALUES = st.recursive(
    SCALARS,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=12), inner, max_size=4),
    max_leaves=12,
)
SERVICE_FIELDS = [
    ("metadata", "name"), ("metadata", "namespace"), ("metadata", "labels"), ("metadata", "annotations"),
    ("spec", "type"), ("spec", "clusterIP"), ("spec", "clusterIPs"), ("spec", "ports"), ("spec", "selector"),
    ("spec", "externalIPs"), ("spec", "sessionAffinity"), ("spec", "internalTrafficPolicy"),
    ("spec", "ports", 0, "port"), ("spec", "ports", 0, "protocol"), ("spec", "ports", 0, "targetPort"),
    ("spec", "ports", 0, "nodePort"), ("spec", "ports", 0, "name"), ("kind",), ("apiVersion",),
]  # fmt: skip


def service_doc() -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": "web", "namespace": "demo"},
        "spec": {"clusterIP": "10.96.0.10", "ports": [{"name": "http", "port": 80, "targetPort": 8080}]},
    }


def put(doc: Any, where: tuple[Any, ...], value: Any) -> None:
    for part in where[:-1]:
        if not isinstance(doc, (dict, list)):
            return
        if isinstance(doc, dict):
            doc = doc.setdefault(part, {})
        elif isinstance(part, int) and part < len(doc):
            doc = doc[part]
        else:
            return
    if isinstance(doc, dict) or (
        isinstance(doc, list) and isinstance(where[-1], int) and where[-1] < len(doc)
    ):
        doc[where[-1]] = value


def encode(documents: list[Any], as_json: bool) -> bytes:
    if as_json:
        return json.dumps({"apiVersion": "v1", "kind": "List", "items": documents}).encode()
    return yaml.dump_all(documents, Dumper=DUMPER, allow_unicode=True).encode()


@FUZZ
@given(
    changes=st.lists(st.tuples(st.sampled_from(SERVICE_FIELDS), VALUES), min_size=1, max_size=4),
    as_json=st.booleans(),
)
def test_services_with_arbitrary_field_values(
    pipeline: Pipeline, changes: list[tuple[tuple[Any, ...], Any]], as_json: bool
) -> None:
    doc = service_doc()
    for where, value in changes:
        put(doc, where, value)
    pipeline.case("a-fuzz.json" if as_json else "a-fuzz.yaml", encode([doc], as_json))


def test_the_suite_is_big_enough() -> None:
    total = MUTATION_CASES + 2 * HYPOTHESIS_CASES + 2 * len(EXAMPLES)
    assert total >= 10_000 and len(EXAMPLES) >= 6
