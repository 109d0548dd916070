"""The fast lane (``model.fastparse``) against the plain way (``objects.parse_object`` on dicts).

Generated Service, EndpointSlice, Node and Pod documents (valid ones, then mutated: a field set to an edge
value, to null or removed) must come out of the fast lane either refused or as an object equal to the plain
way's, and refused whenever the plain way refuses them; a list read from JSON bytes likewise per item, each
refused item handed back as its plain JSON value. Through the sources, the manifest parse and the
informer's list give the same objects and the same error text with the lane as without it. Valid documents
must take the lane (else it would only be slow).
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx2 as httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from balancing.model import fastparse, objects
from balancing.sources import informer, manifests

CASES = settings(
    max_examples=400,
    derandomize=True,
    database=None,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
Doc = dict[str, Any]

# --- documents ---------------------------------------------------------------------------------------------

LABEL_NAMES = st.sampled_from(["web", "a", "svc-1", "a" * 63])  # Service names: DNS-1035 labels
NAMES = st.one_of(LABEL_NAMES, st.sampled_from(["x.y", "db-0.db", "0a"]))
LABEL_KEYS = st.sampled_from(["app", "app.kubernetes.io/name", "example.com/x_y.z", "k" * 63])
LABEL_VALUES = st.sampled_from(["", "v", "v1.2_3-x", "x" * 63])
LABELS = st.dictionaries(LABEL_KEYS, LABEL_VALUES, max_size=3)
ANNOTATIONS = st.dictionaries(
    st.sampled_from(["a", "Example.COM/Note", "meta.helm.sh/release-name"]),
    st.sampled_from(["", "text", "x" * 1500, "ünïcode"]),
    max_size=3,
)
IPV4 = st.sampled_from(["10.0.0.1", "10.96.0.10", "0.0.0.0", "255.255.255.255", "192.168.1.100"])
IPV6 = st.sampled_from(["fd00::1", "2001:db8::ffff"])
PORTS = st.integers(1, 65535)
PROTOCOLS = st.sampled_from(["TCP", "UDP", "SCTP"])

# What a mutation may put in place of any value: edges of every rule the lane makes native.
EDGES = [
    None,
    "",
    "x",
    "X",
    "-a",
    "a-",
    "a" * 64,
    "a" * 254,
    "a..b",
    "a_b",
    "web\n",
    "\x7f",
    "\u0131",
    "a/b",
    "/b",
    "A.B/c",
    "a/b/c",
    "None",
    "TCP",
    "tcp",
    "http",
    "a--b",
    "80",
    0,
    -1,
    1,
    65535,
    65536,
    True,
    False,
    1.5,
    [],
    {},
    ["10.0.0.1"],
    ["None"],
    ["10.0.0.1", "fd00::1"],
    ["10.0.0.1", "10.0.0.2"],
    "10.0.0.1",
    "010.0.0.1",
    "10.0.0.256",
    " 10.0.0.1",
    "fd00::1",
    "fe80::1%eth0",
    {"a": None},
    {"a/": "b"},
    {"app": "x" * 64},
    {"Example.com/x": "y"},
    {"a": "x" * 300_000},
    ["IPv4", "IPv4"],
    ["IPv6"],
    [{"name": "a"}, {"name": "a"}],
]


@st.composite
def metadata(draw: st.DrawFn, *, namespaced: bool = True, names: st.SearchStrategy[str] = NAMES) -> Doc:
    meta: Doc = {"name": draw(names)}
    if namespaced and draw(st.booleans()):
        meta["namespace"] = draw(st.sampled_from(["default", "ns-1", ""]))
    if draw(st.booleans()):
        meta |= {"uid": "0f7c-11", "resourceVersion": "123", "creationTimestamp": "2026-01-01T00:00:00Z"}
        meta["generation"] = draw(st.integers(0, 3))
    meta["labels"] = draw(LABELS)
    meta["annotations"] = draw(ANNOTATIONS)
    return meta


@st.composite
def service(draw: st.DrawFn) -> Doc:
    ports = []
    numbers = draw(st.lists(PORTS, min_size=1, max_size=3, unique=True))
    for i, number in enumerate(numbers):
        port: Doc = {"port": number, "protocol": draw(PROTOCOLS)}
        if len(numbers) > 1 or draw(st.booleans()):
            port["name"] = f"p{i}"
        port["targetPort"] = draw(st.one_of(PORTS, st.sampled_from(["http", "metrics"])))
        if draw(st.booleans()):
            port["nodePort"] = 30000 + i
        ports.append(port)
    spec: Doc = {"ports": ports, "selector": draw(LABELS)}
    family = draw(st.sampled_from(["v4", "v6", "dual", "headless", "none"]))
    if family == "v4":
        ip = draw(IPV4)
        spec |= {"clusterIP": ip, "clusterIPs": [ip], "ipFamilies": ["IPv4"]}
    elif family == "v6":
        ip = draw(IPV6)
        spec |= {"clusterIP": ip, "clusterIPs": [ip], "ipFamilies": ["IPv6"]}
    elif family == "dual":
        spec |= {
            "clusterIP": "10.0.0.9",
            "clusterIPs": ["10.0.0.9", "fd00::9"],
            "ipFamilies": ["IPv4", "IPv6"],
        }
    elif family == "headless":
        spec |= {"clusterIP": "None", "clusterIPs": ["None"]}
    spec["type"] = draw(st.sampled_from(["ClusterIP", "NodePort", "LoadBalancer"]))
    if draw(st.booleans()):
        spec |= {"sessionAffinity": "ClientIP", "sessionAffinityConfig": {"clientIP": {"timeoutSeconds": 60}}}
    if draw(st.booleans()):
        spec["externalIPs"] = [draw(st.sampled_from(["10.0.0.1", "192.168.1.100"]))]
    doc: Doc = {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": draw(metadata(names=LABEL_NAMES)),
        "spec": spec,
    }
    if draw(st.booleans()):
        doc["status"] = {"loadBalancer": {"ingress": [{"ip": draw(IPV4)}]}}
    return doc


@st.composite
def endpoint_slice(draw: st.DrawFn) -> Doc:
    endpoints = []
    for _ in range(draw(st.integers(0, 4))):
        endpoint: Doc = {"addresses": [draw(IPV4)]}
        endpoint["conditions"] = draw(
            st.dictionaries(st.sampled_from(["ready", "serving", "terminating"]), st.booleans())
        )
        if draw(st.booleans()):
            endpoint["nodeName"] = draw(st.sampled_from(["node-1", "n.example.com"]))
        if draw(st.booleans()):
            endpoint["zone"] = draw(st.sampled_from(["z1", "eu-west-1a"]))
        if draw(st.booleans()):
            endpoint["hints"] = {"forZones": [{"name": "z1"}]}
        endpoint["targetRef"] = {"kind": "Pod", "name": "p"}
        endpoints.append(endpoint)
    ports = [
        {"name": n, "protocol": draw(PROTOCOLS), "port": draw(PORTS)}
        for n in ["http", "m"][: draw(st.integers(0, 2))]
    ]
    return {
        "apiVersion": "discovery.k8s.io/v1",
        "kind": "EndpointSlice",
        "metadata": draw(metadata()),
        "addressType": draw(st.sampled_from(["IPv4", "IPv6"])),
        "endpoints": endpoints,
        "ports": ports,
    }


@st.composite
def node(draw: st.DrawFn) -> Doc:
    addresses = [{"type": "InternalIP", "address": draw(IPV4)}, {"type": "Hostname", "address": "n1"}]
    return {
        "apiVersion": "v1",
        "kind": "Node",
        "metadata": draw(metadata(namespaced=False)),
        "status": {"addresses": addresses},
    }


@st.composite
def pod(draw: st.DrawFn) -> Doc:
    ip = draw(IPV4)
    container = {"name": "app", "ports": [{"name": "http", "containerPort": draw(PORTS), "protocol": "TCP"}]}
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": draw(metadata()),
        "spec": {"nodeName": "node-1", "containers": [container]},
        "status": {
            "phase": "Running",
            "podIP": ip,
            "podIPs": [{"ip": ip}],
            "conditions": [{"type": "Ready", "status": "True"}],
        },
    }


VALID = st.one_of(service(), endpoint_slice(), node(), pod())


def _paths(value: Any, at: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    """Every path to a value inside a document (keys and list indices), but the kind's own."""
    found = [at] if at else []
    if isinstance(value, dict):
        for key, item in value.items():
            if at or key not in ("apiVersion", "kind"):
                found += _paths(item, (*at, key))
    elif isinstance(value, list):
        for i, item in enumerate(value):
            found += _paths(item, (*at, i))
    return found


@st.composite
def documents(draw: st.DrawFn) -> Doc:
    """A valid document with 0-3 mutations: a value replaced by an edge value, or a key removed."""
    doc: Doc = draw(VALID)
    for _ in range(draw(st.integers(0, 3))):
        paths = _paths(doc)
        if not paths:
            break
        path = draw(st.sampled_from(paths))
        parent: Any = doc
        for step in path[:-1]:
            parent = parent[step]
        value = parent[path[-1]]
        if isinstance(parent, dict) and draw(st.integers(0, 4)) == 0:
            del parent[path[-1]]
        elif isinstance(value, str) and draw(st.integers(0, 2)) > 0:
            edit = draw(st.sampled_from(TEXT_EDITS))(value)
            parent[path[-1]] = draw(st.one_of(st.just(edit), st.text(ALPHABET, max_size=6)))
        elif isinstance(value, int) and not isinstance(value, bool) and draw(st.booleans()):
            parent[path[-1]] = draw(st.sampled_from(NUMBER_EDITS))(value)
        else:
            parent[path[-1]] = copy.deepcopy(draw(st.sampled_from(EDGES)))  # edges are shared
    return doc


# Edits of a valid value to just past a rule (or just within it), and short texts of the characters rules
# tell apart.
ALPHABET = "aZ09-._/: %\n\x7f\u0131"
TEXT_EDITS: list[Callable[[str], str]] = [
    str.upper,
    str.title,
    lambda t: f"-{t}",
    lambda t: f"{t}-",
    lambda t: f"{t}\n",
    lambda t: f"{t}\t",
    lambda t: f"{t}.",
    lambda t: f".{t}",
    lambda t: f"{t}..x",
    lambda t: f"{t}_x",
    lambda t: f"{t}/x",
    lambda t: f"x/{t}",
    lambda t: f"{t}//x",
    lambda t: f"/{t}",
    lambda t: (t * 64)[:64],
    lambda t: (t * 64)[:63],
    lambda t: (t * 254)[:254],
    lambda t: (t * 254)[:253],
    lambda t: f"{t}\u0131",
    lambda t: f"{t}\x7f",
    lambda t: "",
    lambda t: f" {t}",
    lambda t: f"0{t}",
    lambda t: f"{t}%eth0",
    lambda t: t.replace(".", ":"),
    lambda t: f"{t}.0",
]
NUMBER_EDITS: list[Callable[[int], Any]] = [
    lambda n: n + 1,
    lambda n: n - 1,
    lambda n: -n,
    lambda n: 0,
    lambda n: 65535,
    lambda n: 65536,
    str,
    float,
    lambda n: n + 0.5,
    bool,
    lambda n: 10**30,
]


# Every field a rule of the lane is about, in one valid document per kind, each set to a value drawn from
# edges of the rules (hitting each rule far more often than mutations at random paths do).
BASE: dict[str, Doc] = {
    "Service": {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {
            "name": "web",
            "namespace": "ns",
            "uid": "u",
            "resourceVersion": "1",
            "creationTimestamp": "t",
            "generation": 1,
            "labels": {"app": "web"},
            "annotations": {"note": "x"},
        },
        "spec": {
            "ports": [{"name": "http", "protocol": "TCP", "port": 80, "targetPort": 8080, "nodePort": 30080}],
            "selector": {"app": "web"},
            "clusterIP": "10.0.0.1",
            "clusterIPs": ["10.0.0.1"],
            "ipFamilies": ["IPv4"],
            "type": "NodePort",
            "externalIPs": ["10.1.0.1"],
            "sessionAffinity": "None",
        },
    },
    "EndpointSlice": {
        "apiVersion": "discovery.k8s.io/v1",
        "kind": "EndpointSlice",
        "metadata": {"name": "web-1", "namespace": "ns", "labels": {"kubernetes.io/service-name": "web"}},
        "addressType": "IPv4",
        "endpoints": [
            {
                "addresses": ["10.2.0.1"],
                "conditions": {"ready": True},
                "nodeName": "node-1",
                "zone": "z1",
                "hints": {"forZones": [{"name": "z1"}], "forNodes": [{"name": "node-1"}]},
            }
        ],
        "ports": [{"name": "http", "protocol": "TCP", "port": 8080}],
    },
    "Node": {
        "apiVersion": "v1",
        "kind": "Node",
        "metadata": {"name": "node-1", "annotations": {"a": "b"}},
        "status": {"addresses": [{"type": "InternalIP", "address": "10.3.0.1"}]},
    },
    "Pod": {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": "p", "namespace": "ns", "uid": "u"},
        "spec": {
            "nodeName": "node-1",
            "hostNetwork": False,
            "containers": [
                {"name": "app", "ports": [{"name": "http", "containerPort": 80, "hostPort": 8080}]}
            ],
        },
        "status": {"phase": "Running", "podIP": "10.4.0.1", "podIPs": [{"ip": "10.4.0.1"}]},
    },
}


def _at(*path: str | int) -> Callable[[Doc, Any], None]:
    def put(doc: Doc, value: Any) -> None:
        node: Any = doc
        with contextlib.suppress(TypeError, KeyError, IndexError):  # an earlier edit took the path away
            for step in path[:-1]:
                node = node[step]
            node[path[-1]] = value

    return put


def _key(*path: str) -> Callable[[Doc, Any], None]:
    def put(doc: Doc, value: Any) -> None:
        node: Any = doc
        with contextlib.suppress(TypeError, KeyError, IndexError):
            for step in path:
                node = node[step]
            node[value if isinstance(value, str) else str(value)] = "v"

    return put


META = [
    "name",
    "namespace",
    "uid",
    "resourceVersion",
    "creationTimestamp",
    "generation",
    "labels",
    "annotations",
]
FIELDS: dict[str, list[Callable[[Doc, Any], None]]] = {
    "Service": [
        *(_at("metadata", f) for f in META),
        _at("metadata", "labels", "app"),
        _key("metadata", "labels"),
        _at("metadata", "annotations", "note"),
        _key("metadata", "annotations"),
        *(_at("spec", "ports", 0, f) for f in ("name", "protocol", "port", "targetPort", "nodePort")),
        _at("spec", "clusterIP"),
        _at("spec", "clusterIPs"),
        _at("spec", "ipFamilies"),
        _at("spec", "selector", "app"),
        _key("spec", "selector"),
        _at("spec", "type"),
        _at("spec", "externalIPs", 0),
        _at("spec", "ports"),
        lambda doc, value: doc["spec"].update(clusterIP=value, clusterIPs=[value]),
    ],
    "EndpointSlice": [
        *(_at("metadata", f) for f in META),
        _key("metadata", "labels"),
        _at("addressType"),
        *(_at("endpoints", 0, f) for f in ("addresses", "conditions", "nodeName", "zone", "hints")),
        _at("endpoints", 0, "addresses", 0),
        _at("endpoints", 0, "conditions", "ready"),
        _at("endpoints", 0, "hints", "forZones", 0, "name"),
        _at("endpoints", 0, "hints", "forNodes", 0, "name"),
        *(_at("ports", 0, f) for f in ("name", "protocol", "port")),
        _at("ports"),
        _at("endpoints"),
    ],
    "Node": [
        *(_at("metadata", f) for f in META),
        _at("status", "addresses", 0, "address"),
        _key("metadata", "annotations"),
    ],
    "Pod": [
        *(_at("metadata", f) for f in META),
        _at("spec", "nodeName"),
        _at("spec", "hostNetwork"),
        _at("spec", "containers", 0, "name"),
        *(
            _at("spec", "containers", 0, "ports", 0, f)
            for f in ("name", "containerPort", "hostPort", "protocol")
        ),
        _at("status", "podIP"),
        _at("status", "podIPs"),
        _at("status", "podIPs", 0, "ip"),
        lambda doc, value: doc["status"].update(podIP=value, podIPs=[{"ip": value}]),
    ],
}
SEEDS = ["web", "10.0.0.1", "fd00::1", "app.kubernetes.io/name", "z1", "TCP", "http", "a" * 63, "a.b" * 84]
VALUES = st.one_of(
    st.text(ALPHABET, max_size=3),
    st.text(ALPHABET, max_size=8),
    st.builds(lambda edit, seed: edit(seed), st.sampled_from(TEXT_EDITS), st.sampled_from(SEEDS)),
    st.sampled_from(EDGES).map(copy.deepcopy),
    st.integers(-2, 70_000),
)


FIELD_CASES = [(kind, i) for kind in sorted(FIELDS) for i in range(len(FIELDS[kind]))]


def _plain(doc: Doc) -> objects.KubeObject | None:
    """The plain way: the model class's own validation."""
    model = objects.KINDS.get((doc.get("apiVersion"), doc.get("kind")))  # type: ignore[arg-type]
    try:
        return model.model_validate(doc) if model else None  # type: ignore[return-value]
    except (ValidationError, ValueError):
        return None


def _same(fast: objects.KubeObject, plain: objects.KubeObject | None) -> None:
    assert plain is not None, "the fast lane accepted what the plain way refuses"
    assert type(fast) is type(plain)
    assert fast == plain
    if isinstance(fast, objects.Service):
        assert isinstance(plain, objects.Service)
        assert fast.spec.service_ips() == plain.spec.service_ips()


# --- the lane itself -------------------------------------------------------------------------------------


@settings(CASES, max_examples=1500)
@given(documents())
def test_the_fast_lane_refuses_or_builds_what_the_plain_way_builds(doc: Doc) -> None:
    fast = fastparse.parse(json.loads(json.dumps(doc)))
    plain = _plain(doc)
    if fast is not None:
        _same(fast, plain)


@pytest.mark.parametrize(("kind", "field"), FIELD_CASES)
@settings(CASES, max_examples=120)
@given(value=VALUES)
def test_each_rule_refuses_or_builds_what_the_plain_way_builds(kind: str, field: int, value: Any) -> None:
    doc = copy.deepcopy(BASE[kind])
    FIELDS[kind][field](doc, value)
    fast = fastparse.parse(json.loads(json.dumps(doc)))
    if fast is not None:
        _same(fast, _plain(doc))


@CASES
@given(VALID)
def test_valid_documents_take_the_fast_lane(doc: Doc) -> None:
    plain = _plain(doc)
    assert plain is not None, "the generator makes valid documents"
    fast = fastparse.parse(doc)
    assert fast is not None
    _same(fast, plain)


@CASES
@given(st.lists(documents(), max_size=5), st.sampled_from(sorted(fastparse.FAST_KINDS)))
def test_a_list_read_from_bytes_gives_each_item_or_its_plain_value(
    docs: list[Doc], key: tuple[str, str]
) -> None:
    items = [{k: v for k, v in d.items() if k not in ("apiVersion", "kind")} for d in docs]
    data = json.dumps({"metadata": {"resourceVersion": "7"}, "items": items}).encode()
    reader = fastparse.list_reader(*key)
    assert reader is not None
    meta, read = reader.read(data)
    assert meta == {"resourceVersion": "7"}
    assert len(read) == len(items)
    for item, got in zip(items, read, strict=True):
        plain = _plain({**item, "apiVersion": key[0], "kind": key[1]})
        if isinstance(got, objects.KubeModel):
            _same(got, plain)  # type: ignore[arg-type]
        else:
            assert got == json.loads(json.dumps(item))


def test_null_fields_and_duplicate_keys_read_as_the_plain_way_reads_them() -> None:
    reader = fastparse.list_reader("v1", "Service")
    assert reader is not None
    data = (
        b'{"items": [{"metadata": {"name": "a", "name": "b", "namespace": null},'
        b' "spec": {"ports": [{"port": 80}], "clusterIP": null}}]}'
    )
    _, (got,) = reader.read(data)
    plain = _plain({**json.loads(data)["items"][0], "apiVersion": "v1", "kind": "Service"})
    if isinstance(got, objects.Service):
        _same(got, plain)
    else:
        assert plain is not None  # refused by the lane, read by the plain way


def test_a_body_that_is_no_list_is_a_value_error() -> None:
    reader = fastparse.list_reader("v1", "Node")
    assert reader is not None
    for data in (b"[]", b'{"items": 5}', b"{", b'{"metadata": {}}', b"\xff"):
        with pytest.raises(ValueError):
            reader.read(data)
    assert fastparse.list_reader("v1", "Namespace") is None
    assert fastparse.parse({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "a"}}) is None


# --- through the sources -----------------------------------------------------------------------------------


def _no_lane(monkeypatch: pytest.MonkeyPatch) -> None:
    """The sources as they were without the lane: documents parsed whole, validated by the model classes,
    namespaces defaulted on the objects built."""
    monkeypatch.setattr(fastparse, "parse", lambda doc: None)
    monkeypatch.setattr(fastparse, "list_reader", lambda api_version, kind: None)
    monkeypatch.setattr(manifests, "_in_default_namespace", lambda item: item)


def _manifest(docs: list[Doc], as_json: bool) -> tuple[list[objects.KubeObject], list[str]]:
    data = json.dumps({"apiVersion": "v1", "kind": "List", "items": docs}) if as_json else json.dumps(docs[0])
    name = "m.json" if as_json else "m.yaml"  # one JSON document is YAML too
    found, errors = manifests.parse_manifest(Path(name), data.encode())
    return found, [str(e) for e in errors]


@CASES
@given(docs=st.lists(documents(), min_size=1, max_size=4), as_json=st.booleans())
def test_manifests_give_the_same_objects_and_errors_with_the_lane_as_without(
    docs: list[Doc], as_json: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    fast = _manifest(docs, as_json)
    with monkeypatch.context() as patch:
        _no_lane(patch)
        plain = _manifest(docs, as_json)
    assert fast == plain


async def _relist(
    body: bytes, kind: tuple[str, str]
) -> tuple[list[objects.KubeObject], list[str], list[Any]]:
    def answer(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, content=body)

    transport = httpx.MockTransport(answer)
    async with httpx.AsyncClient(base_url="http://api", transport=transport) as client:
        resource = informer.Resource("/list", *kind)
        update = await informer.Informer(client, resource, dict, informer.Timing()).relist()
    return update.upserts, [str(e) for e in update.errors], update.deletes


@CASES
@given(docs=st.lists(documents(), max_size=4), key=st.sampled_from(sorted(fastparse.FAST_KINDS)))
def test_the_informer_lists_the_same_objects_and_errors_with_the_lane_as_without(
    docs: list[Doc], key: tuple[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    items = [{k: v for k, v in d.items() if k not in ("apiVersion", "kind")} for d in docs]
    body = json.dumps({"metadata": {"resourceVersion": "5"}, "items": items}).encode()
    fast = asyncio.run(_relist(body, key))
    with monkeypatch.context() as patch:
        _no_lane(patch)
        plain = asyncio.run(_relist(body, key))
    assert fast == plain
