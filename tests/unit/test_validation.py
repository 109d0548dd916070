"""The typed model refuses what the API server refuses, at the field, and what it accepts never crashes.

A table of named cases, a valid and an invalid one per rule (ports, names, labels, IP addresses, integers,
nulls), each invalid one with the field path the sources report (``model.fielderrors``) and a piece of the
message. Then a property (hypothesis): objects built from valid and hostile values alike either fail
validation or go through ``ClusterStore`` into a desired state whose every number fits the map field it is
written to (u16 ports, a u32 QoS limit, affinity seconds), and whose health check ports can be bound.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from balancing.model import objects
from balancing.model.config import ModelConfig
from balancing.model.fielderrors import field_errors
from balancing.model.store import ClusterStore
from helpers.docedit import DELETE, edit

POLICY_API = "balancing.elf.io/v1beta1"
SERVICE: dict[str, Any] = {
    "apiVersion": "v1",
    "kind": "Service",
    "metadata": {"name": "web", "namespace": "default", "labels": {"app": "web"}},
    "spec": {"clusterIP": "10.96.0.10", "ports": [{"name": "http", "port": 80, "targetPort": 8080}]},
}
NODE_PORT = edit(SERVICE, {"spec.type": "NodePort", "spec.ports.0.nodePort": 30080})
LOCAL_LB = edit(
    SERVICE,
    {"spec.type": "LoadBalancer", "spec.externalTrafficPolicy": "Local", "spec.healthCheckNodePort": 32000},
)
TWO_PORTS = edit(SERVICE, {"spec.ports.1": {"name": "https", "port": 443}})
SLICE: dict[str, Any] = {
    "apiVersion": "discovery.k8s.io/v1",
    "kind": "EndpointSlice",
    "metadata": {
        "name": "web-abc12",
        "namespace": "default",
        "labels": {"kubernetes.io/service-name": "web"},
    },
    "addressType": "IPv4",
    "endpoints": [{"addresses": ["10.0.0.1"], "nodeName": "node-1", "conditions": {"ready": True}}],
    "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}],
}
POD: dict[str, Any] = {
    "apiVersion": "v1",
    "kind": "Pod",
    "metadata": {"name": "web-1", "namespace": "default", "labels": {"app": "web"}, "uid": "u-1"},
    "spec": {
        "nodeName": "node-1",
        "containers": [{"name": "web", "ports": [{"name": "http", "containerPort": 8080}]}],
    },
    "status": {"phase": "Running", "podIP": "10.0.0.1", "podIPs": [{"ip": "10.0.0.1"}]},
}
NODE: dict[str, Any] = {
    "apiVersion": "v1",
    "kind": "Node",
    "metadata": {"name": "node-1", "labels": {"topology.kubernetes.io/zone": "zone-a"}},
    "status": {"addresses": [{"type": "InternalIP", "address": "192.168.0.1"}]},
}
DNS_PORT = {"port": "53", "protocol": "UDP"}
LRP: dict[str, Any] = {
    "apiVersion": POLICY_API,
    "kind": "LocalRedirectPolicy",
    "metadata": {"name": "dns-cache"},
    "spec": {
        "frontend": {"serviceMatcher": {"serviceName": "kube-dns", "namespace": "kube-system"}},
        "backend": {"endpointSelector": {"matchLabels": {"app": "cache"}}, "toPorts": [DNS_PORT]},
    },
}
BP: dict[str, Any] = {
    "apiVersion": POLICY_API,
    "kind": "BalancingPolicy",
    "metadata": {"name": "web.edge"},
    "spec": {
        "frontend": {"addressMatcher": {"ip": "10.250.0.10", "toPorts": [{"port": 80, "protocol": "TCP"}]}},
        "backend": {
            "addressEndpoint": {
                "addresses": ["192.168.10.11"],
                "toPorts": [{"port": 8080, "protocol": "TCP"}],
            }
        },
    },
}

RANGE = "must be between 1 and 65535, inclusive"
INTEGER = "valid integer"
STRING = "valid string"
BOOLEAN = "valid boolean"
REQUIRED = "Field required"
NOT_IP = "must be a valid IP address"
LABEL_1123 = "lowercase RFC 1123 label"
SUBDOMAIN = "lowercase RFC 1123 subdomain"
DNS1035 = "DNS-1035 label"
LETTER = "must contain at least one letter (a-z)"
DUPLICATE = "Duplicate value"
KEY = "label key"
VALUE = "label value"


@dataclass(frozen=True)
class Case:
    name: str
    doc: dict[str, Any]
    path: str | None = None  # None: valid
    message: str = ""


def ok(name: str, doc: dict[str, Any]) -> Case:
    return Case(name, doc)


def bad(name: str, doc: dict[str, Any], path: str, message: str) -> Case:
    return Case(name, doc, path, message)


P0 = "spec.ports[0]"
CASES: list[Case] = [
    # --- Service ports: port, nodePort, healthCheckNodePort (IsValidPortNum; 0 is "unset" for node ports)
    ok("service/port-1", edit(SERVICE, {"spec.ports.0.port": 1})),
    ok("service/port-65535", edit(SERVICE, {"spec.ports.0.port": 65535})),
    bad("service/port-0", edit(SERVICE, {"spec.ports.0.port": 0}), f"{P0}.port", RANGE),
    bad("service/port-65536", edit(SERVICE, {"spec.ports.0.port": 65536}), f"{P0}.port", RANGE),
    bad("service/port-2**64", edit(SERVICE, {"spec.ports.0.port": 2**64}), f"{P0}.port", RANGE),
    bad("service/port-negative", edit(SERVICE, {"spec.ports.0.port": -80}), f"{P0}.port", RANGE),
    bad("service/port-quoted", edit(SERVICE, {"spec.ports.0.port": "80"}), f"{P0}.port", INTEGER),
    bad("service/port-float", edit(SERVICE, {"spec.ports.0.port": 80.0}), f"{P0}.port", INTEGER),
    bad("service/port-bool", edit(SERVICE, {"spec.ports.0.port": True}), f"{P0}.port", INTEGER),
    bad("service/port-missing", edit(SERVICE, {"spec.ports.0.port": DELETE}), f"{P0}.port", REQUIRED),
    bad("service/port-null", edit(SERVICE, {"spec.ports.0.port": None}), f"{P0}.port", REQUIRED),
    ok("service/node-port", NODE_PORT),
    ok("service/node-port-65535", edit(NODE_PORT, {"spec.ports.0.nodePort": 65535})),
    ok("service/node-port-0-is-unset", edit(NODE_PORT, {"spec.ports.0.nodePort": 0})),
    ok("service/node-port-null-is-unset", edit(NODE_PORT, {"spec.ports.0.nodePort": None})),
    bad(
        "service/node-port-70000", edit(NODE_PORT, {"spec.ports.0.nodePort": 70000}), f"{P0}.nodePort", RANGE
    ),
    bad(
        "service/node-port-negative", edit(NODE_PORT, {"spec.ports.0.nodePort": -1}), f"{P0}.nodePort", RANGE
    ),
    bad(
        "service/node-port-quoted",
        edit(NODE_PORT, {"spec.ports.0.nodePort": "30080"}),
        f"{P0}.nodePort",
        INTEGER,
    ),
    ok("service/health-check-node-port", LOCAL_LB),
    ok("service/health-check-node-port-0", edit(LOCAL_LB, {"spec.healthCheckNodePort": 0})),
    ok("service/health-check-node-port-null", edit(LOCAL_LB, {"spec.healthCheckNodePort": None})),
    bad(
        "service/health-check-node-port-70000",
        edit(LOCAL_LB, {"spec.healthCheckNodePort": 70000}),
        "spec.healthCheckNodePort",
        RANGE,
    ),
    bad(
        "service/health-check-node-port-float",
        edit(LOCAL_LB, {"spec.healthCheckNodePort": 32000.5}),
        "spec.healthCheckNodePort",
        INTEGER,
    ),
    # targetPort: a number 1-65535 or an IANA_SVC_NAME; a quoted number is a name with no letter
    ok("service/target-port-number", edit(SERVICE, {"spec.ports.0.targetPort": 65535})),
    ok("service/target-port-name", edit(SERVICE, {"spec.ports.0.targetPort": "http-alt"})),
    ok("service/target-port-name-15", edit(SERVICE, {"spec.ports.0.targetPort": "a" * 15})),
    ok("service/target-port-name-with-digits", edit(SERVICE, {"spec.ports.0.targetPort": "h2c-8080"})),
    ok("service/target-port-absent", edit(SERVICE, {"spec.ports.0.targetPort": DELETE})),
    ok("service/target-port-null", edit(SERVICE, {"spec.ports.0.targetPort": None})),
    bad("service/target-port-0", edit(SERVICE, {"spec.ports.0.targetPort": 0}), f"{P0}.targetPort", RANGE),
    bad(
        "service/target-port-99999",
        edit(SERVICE, {"spec.ports.0.targetPort": 99999}),
        f"{P0}.targetPort",
        RANGE,
    ),
    bad(
        "service/target-port-quoted-99999",
        edit(SERVICE, {"spec.ports.0.targetPort": "99999"}),
        f"{P0}.targetPort",
        LETTER,
    ),
    bad(
        "service/target-port-quoted-0",
        edit(SERVICE, {"spec.ports.0.targetPort": "0"}),
        f"{P0}.targetPort",
        LETTER,
    ),
    bad(
        "service/target-port-quoted-8080",
        edit(SERVICE, {"spec.ports.0.targetPort": "8080"}),
        f"{P0}.targetPort",
        "written without quotes",
    ),
    bad(
        "service/target-port-upper-case",
        edit(SERVICE, {"spec.ports.0.targetPort": "HTTP"}),
        f"{P0}.targetPort",
        "only alpha-numeric",
    ),
    bad(
        "service/target-port-16-chars",
        edit(SERVICE, {"spec.ports.0.targetPort": "a" * 16}),
        f"{P0}.targetPort",
        "no more than 15",
    ),
    bad(
        "service/target-port-double-dash",
        edit(SERVICE, {"spec.ports.0.targetPort": "a--b"}),
        f"{P0}.targetPort",
        "consecutive hyphens",
    ),
    bad(
        "service/target-port-leading-dash",
        edit(SERVICE, {"spec.ports.0.targetPort": "-http"}),
        f"{P0}.targetPort",
        "begin or end with a hyphen",
    ),
    bad(
        "service/target-port-underscore",
        edit(SERVICE, {"spec.ports.0.targetPort": "dns_tcp"}),
        f"{P0}.targetPort",
        "only alpha-numeric",
    ),
    bad(
        "service/target-port-empty",
        edit(SERVICE, {"spec.ports.0.targetPort": ""}),
        f"{P0}.targetPort",
        LETTER,
    ),
    bad(
        "service/target-port-newline",
        edit(SERVICE, {"spec.ports.0.targetPort": "http\n"}),
        f"{P0}.targetPort",
        "only alpha-numeric",
    ),
    bad(
        "service/target-port-unicode-digits",
        edit(SERVICE, {"spec.ports.0.targetPort": "\u0663"}),
        f"{P0}.targetPort",
        "only alpha-numeric",
    ),
    bad(
        "service/target-port-float",
        edit(SERVICE, {"spec.ports.0.targetPort": 80.5}),
        f"{P0}.targetPort",
        "port",
    ),
    bad(
        "service/target-port-bool",
        edit(SERVICE, {"spec.ports.0.targetPort": True}),
        f"{P0}.targetPort",
        "port",
    ),
    # port names: DNS-1123 labels, required with more than one port, unique; (protocol, port) unique
    ok("service/one-port-unnamed", edit(SERVICE, {"spec.ports.0.name": DELETE})),
    ok("service/two-ports-named", TWO_PORTS),
    ok(
        "service/same-port-other-protocol",
        edit(TWO_PORTS, {"spec.ports.1.port": 80, "spec.ports.1.protocol": "UDP"}),
    ),
    bad(
        "service/port-name-upper-case", edit(SERVICE, {"spec.ports.0.name": "HTTP"}), f"{P0}.name", LABEL_1123
    ),
    bad("service/port-name-dot", edit(SERVICE, {"spec.ports.0.name": "a.b"}), f"{P0}.name", LABEL_1123),
    bad("service/port-name-64", edit(SERVICE, {"spec.ports.0.name": "a" * 64}), f"{P0}.name", LABEL_1123),
    bad(
        "service/port-name-newline", edit(SERVICE, {"spec.ports.0.name": "http\n"}), f"{P0}.name", LABEL_1123
    ),
    bad(
        "service/two-ports-one-unnamed",
        edit(TWO_PORTS, {"spec.ports.1.name": ""}),
        "spec.ports[1].name",
        "Required",
    ),
    bad(
        "service/duplicate-port-name",
        edit(TWO_PORTS, {"spec.ports.1.name": "http"}),
        "spec.ports[1].name",
        DUPLICATE,
    ),
    bad("service/duplicate-port", edit(TWO_PORTS, {"spec.ports.1.port": 80}), "spec.ports[1]", DUPLICATE),
    bad(
        "service/duplicate-node-port",
        edit(NODE_PORT, {"spec.ports.1": {"name": "b", "port": 81, "nodePort": 30080}}),
        "spec.ports[1].nodePort",
        DUPLICATE,
    ),
    ok("service/protocol-udp", edit(SERVICE, {"spec.ports.0.protocol": "UDP"})),
    ok("service/protocol-sctp", edit(SERVICE, {"spec.ports.0.protocol": "SCTP"})),
    bad(
        "service/protocol-lower-case",
        edit(SERVICE, {"spec.ports.0.protocol": "tcp"}),
        f"{P0}.protocol",
        "supported",
    ),
    bad(
        "service/protocol-icmp",
        edit(SERVICE, {"spec.ports.0.protocol": "ICMP"}),
        f"{P0}.protocol",
        "supported",
    ),
    bad("service/protocol-number", edit(SERVICE, {"spec.ports.0.protocol": 6}), f"{P0}.protocol", "string"),
    # a Service needs ports, unless headless or ExternalName; null lists and objects are absent
    bad("service/no-ports", edit(SERVICE, {"spec.ports": []}), "spec.ports", "Required"),
    bad("service/ports-null", edit(SERVICE, {"spec.ports": None}), "spec.ports", "Required"),
    bad("service/spec-null", edit(SERVICE, {"spec": None}), "spec", "Required"),
    ok("service/headless-no-ports", edit(SERVICE, {"spec.clusterIP": "None", "spec.ports": []})),
    ok(
        "service/external-name-no-ports",
        edit(SERVICE, {"spec.type": "ExternalName", "spec.clusterIP": DELETE, "spec.ports": []}),
    ),
    ok("service/status-null", edit(SERVICE, {"status": None})),
    ok("service/labels-null", edit(SERVICE, {"metadata.labels": None})),
    ok("service/selector-null", edit(SERVICE, {"spec.selector": None})),
    ok("service/label-value-null-is-empty", edit(SERVICE, {"metadata.labels.app": None})),
    ok("service/load-balancer-null", edit(SERVICE, {"status.loadBalancer": None})),
    # names: a Service's is a DNS-1035 label; namespaces are RFC 1123 labels
    ok("service/name-63", edit(SERVICE, {"metadata.name": "a" * 63})),
    bad("service/name-starts-with-digit", edit(SERVICE, {"metadata.name": "1web"}), "metadata.name", DNS1035),
    bad("service/name-upper-case", edit(SERVICE, {"metadata.name": "Web"}), "metadata.name", DNS1035),
    bad("service/name-dot", edit(SERVICE, {"metadata.name": "web.x"}), "metadata.name", DNS1035),
    bad("service/name-64", edit(SERVICE, {"metadata.name": "a" * 64}), "metadata.name", DNS1035),
    bad(
        "service/name-newline", edit(SERVICE, {"metadata.name": "web\nINFO forged"}), "metadata.name", DNS1035
    ),
    bad("service/name-empty", edit(SERVICE, {"metadata.name": ""}), "metadata.name", "at least 1 character"),
    bad("service/name-number", edit(SERVICE, {"metadata.name": 7}), "metadata.name", STRING),
    ok("service/namespace-starts-with-digit", edit(SERVICE, {"metadata.namespace": "1-team"})),
    bad(
        "service/namespace-upper-case",
        edit(SERVICE, {"metadata.namespace": "Prod"}),
        "metadata.namespace",
        LABEL_1123,
    ),
    bad(
        "service/namespace-dot",
        edit(SERVICE, {"metadata.namespace": "a.b"}),
        "metadata.namespace",
        LABEL_1123,
    ),
    bad(
        "service/namespace-64",
        edit(SERVICE, {"metadata.namespace": "a" * 64}),
        "metadata.namespace",
        LABEL_1123,
    ),
    bad(
        "service/namespace-escape",
        edit(SERVICE, {"metadata.namespace": "a\x1b[2J"}),
        "metadata.namespace",
        LABEL_1123,
    ),
    # labels (qualified-name keys, label values), annotation keys; annotation values are free text
    ok("labels/prefixed-key", edit(SERVICE, {"metadata.labels": {"app.kubernetes.io/name": "web", "x": ""}})),
    bad("labels/key-space", edit(SERVICE, {"metadata.labels": {"a b": "x"}}), "metadata.labels", KEY),
    bad("labels/key-newline", edit(SERVICE, {"metadata.labels": {"app\n": "x"}}), "metadata.labels", KEY),
    bad(
        "labels/key-upper-prefix",
        edit(SERVICE, {"metadata.labels": {"Example.com/a": "x"}}),
        "metadata.labels",
        KEY,
    ),
    bad("labels/key-64", edit(SERVICE, {"metadata.labels": {"a" * 64: "x"}}), "metadata.labels", KEY),
    bad("labels/value-space", edit(SERVICE, {"metadata.labels.app": "a b"}), "metadata.labels.app", VALUE),
    bad(
        "labels/value-newline", edit(SERVICE, {"metadata.labels.app": "web\n"}), "metadata.labels.app", VALUE
    ),
    bad("labels/value-64", edit(SERVICE, {"metadata.labels.app": "a" * 64}), "metadata.labels.app", VALUE),
    bad("labels/value-number", edit(SERVICE, {"metadata.labels.app": 1}), "metadata.labels.app", STRING),
    ok("annotations/value-free-text", edit(SERVICE, {"metadata.annotations": {"note": "two\nlines {x}"}})),
    ok("annotations/key-upper-case-prefix", edit(SERVICE, {"metadata.annotations": {"Example.com/a": "x"}})),
    bad(
        "annotations/key-space",
        edit(SERVICE, {"metadata.annotations": {"a b": "x"}}),
        "metadata.annotations",
        "annotation key",
    ),
    bad(
        "annotations/too-big",
        edit(SERVICE, {"metadata.annotations": {"a": "x" * (256 * 1024)}}),
        "metadata.annotations",
        "bytes",
    ),
    bad(
        "metadata/uid-control", edit(SERVICE, {"metadata.uid": "u\r1"}), "metadata.uid", "control characters"
    ),
    bad(
        "metadata/timestamp-control",
        edit(SERVICE, {"metadata.creationTimestamp": "2024\n"}),
        "metadata.creationTimestamp",
        "control characters",
    ),
    bad(
        "metadata/generation-negative", edit(SERVICE, {"metadata.generation": -1}), "metadata.generation", "0"
    ),
    ok("service/selector", edit(SERVICE, {"spec.selector": {"app": "web", "tier": ""}})),
    ok("service/selector-null-value-is-empty", edit(SERVICE, {"spec.selector": {"app": None}})),
    bad("service/selector-key", edit(SERVICE, {"spec.selector": {"a b": "x"}}), "spec.selector", KEY),
    bad(
        "service/selector-value", edit(SERVICE, {"spec.selector": {"app": "a/b"}}), "spec.selector.app", VALUE
    ),
    # IP addresses: no zone ids, spaces, NULs or integers; externalIPs not special
    ok("service/cluster-ip-v6", edit(SERVICE, {"spec.clusterIP": "fd00::10"})),
    ok("service/cluster-ip-empty", edit(SERVICE, {"spec.clusterIP": ""})),
    bad(
        "service/cluster-ip-zone", edit(SERVICE, {"spec.clusterIP": "fe80::1%eth0"}), "spec.clusterIP", NOT_IP
    ),
    bad(
        "service/cluster-ip-nul",
        edit(SERVICE, {"spec.clusterIP": "10.96.0.10\x00"}),
        "spec.clusterIP",
        NOT_IP,
    ),
    bad(
        "service/cluster-ip-space", edit(SERVICE, {"spec.clusterIP": " 10.96.0.10"}), "spec.clusterIP", NOT_IP
    ),
    bad(
        "service/cluster-ip-octet", edit(SERVICE, {"spec.clusterIP": "10.96.0.256"}), "spec.clusterIP", NOT_IP
    ),
    bad("service/cluster-ip-integer", edit(SERVICE, {"spec.clusterIP": 174063626}), "spec.clusterIP", STRING),
    ok("service/cluster-ips-dual-stack", edit(SERVICE, {"spec.clusterIPs": ["10.96.0.10", "fd00::10"]})),
    ok(
        "service/cluster-ips-only", edit(SERVICE, {"spec.clusterIP": DELETE, "spec.clusterIPs": ["fd00::10"]})
    ),
    bad(
        "service/cluster-ips-zone",
        edit(SERVICE, {"spec.clusterIPs": ["10.96.0.10", "fe80::1%eth0"]}),
        "spec.clusterIPs[1]",
        NOT_IP,
    ),
    bad(
        "service/cluster-ips-same-family",
        edit(SERVICE, {"spec.clusterIPs": ["10.96.0.10", "10.96.0.11"]}),
        "spec.clusterIPs",
        "one IP for each IP family",
    ),
    bad(
        "service/cluster-ips-three",
        edit(SERVICE, {"spec.clusterIPs": ["10.96.0.10", "fd00::10", "fd00::11"]}),
        "spec.clusterIPs",
        "up to 2",
    ),
    bad(
        "service/cluster-ips-none-not-alone",
        edit(SERVICE, {"spec.clusterIP": "None", "spec.clusterIPs": ["None", "fd00::10"]}),
        "spec.clusterIPs",
        "first and only",
    ),
    bad(
        "service/cluster-ips-first-differs",
        edit(SERVICE, {"spec.clusterIPs": ["10.96.0.11"]}),
        "spec.clusterIPs",
        "must match `clusterIP`",
    ),
    bad(
        "service/ip-families-twice",
        edit(SERVICE, {"spec.ipFamilies": ["IPv4", "IPv4"]}),
        "spec.ipFamilies",
        DUPLICATE,
    ),
    ok("service/external-ip", edit(SERVICE, {"spec.externalIPs": ["198.51.100.7", "2001:db8::7"]})),
    bad(
        "service/external-ip-text",
        edit(SERVICE, {"spec.externalIPs": ["nope"]}),
        "spec.externalIPs[0]",
        NOT_IP,
    ),
    bad(
        "service/external-ip-zone",
        edit(SERVICE, {"spec.externalIPs": ["fe80::1%eth0"]}),
        "spec.externalIPs[0]",
        NOT_IP,
    ),
    bad(
        "service/external-ip-loopback",
        edit(SERVICE, {"spec.externalIPs": ["127.0.0.2"]}),
        "spec.externalIPs[0]",
        "loopback",
    ),
    bad(
        "service/external-ip-unspecified",
        edit(SERVICE, {"spec.externalIPs": ["::"]}),
        "spec.externalIPs[0]",
        "unspecified",
    ),
    bad(
        "service/external-ip-link-local",
        edit(SERVICE, {"spec.externalIPs": ["169.254.1.1"]}),
        "spec.externalIPs[0]",
        "link-local",
    ),
    bad(
        "service/external-ip-multicast",
        edit(SERVICE, {"spec.externalIPs": ["ff02::1"]}),
        "spec.externalIPs[0]",
        "multicast",
    ),
    ok(
        "service/lb-ingress",
        edit(SERVICE, {"status.loadBalancer.ingress": [{"ip": "198.51.100.1", "ipMode": "VIP"}]}),
    ),
    ok(
        "service/lb-ingress-hostname",
        edit(SERVICE, {"status.loadBalancer.ingress": [{"hostname": "lb.example.com"}]}),
    ),
    bad(
        "service/lb-ingress-zone",
        edit(SERVICE, {"status.loadBalancer.ingress": [{"ip": "fe80::1%eth0"}]}),
        "status.loadBalancer.ingress[0].ip",
        NOT_IP,
    ),
    bad(
        "service/lb-ingress-hostname-newline",
        edit(SERVICE, {"status.loadBalancer.ingress": [{"hostname": "lb\n"}]}),
        "status.loadBalancer.ingress[0].hostname",
        SUBDOMAIN,
    ),
    bad(
        "service/lb-ingress-ip-mode-without-ip",
        edit(SERVICE, {"status.loadBalancer.ingress": [{"hostname": "lb.example.com", "ipMode": "Proxy"}]}),
        "status.loadBalancer.ingress[0]",
        "ipMode",
    ),
    # integers reaching u32 map fields and booleans
    ok(
        "service/affinity-max",
        edit(
            SERVICE,
            {"spec.sessionAffinity": "ClientIP", "spec.sessionAffinityConfig.clientIP.timeoutSeconds": 86400},
        ),
    ),
    bad(
        "service/affinity-0",
        edit(SERVICE, {"spec.sessionAffinityConfig.clientIP.timeoutSeconds": 0}),
        "spec.sessionAffinityConfig.clientIP.timeoutSeconds",
        "greater than 0",
    ),
    bad(
        "service/affinity-2**40",
        edit(SERVICE, {"spec.sessionAffinityConfig.clientIP.timeoutSeconds": 2**40}),
        "spec.sessionAffinityConfig.clientIP.timeoutSeconds",
        "86400",
    ),
    bad(
        "service/affinity-float",
        edit(SERVICE, {"spec.sessionAffinityConfig.clientIP.timeoutSeconds": 60.0}),
        "spec.sessionAffinityConfig.clientIP.timeoutSeconds",
        INTEGER,
    ),
    ok("service/traffic-distribution", edit(SERVICE, {"spec.trafficDistribution": "PreferSameNode"})),
    bad(
        "service/traffic-distribution-unknown",
        edit(SERVICE, {"spec.trafficDistribution": "Nearby"}),
        "spec.trafficDistribution",
        "PreferClose",
    ),
    bad(
        "service/publish-not-ready-text",
        edit(SERVICE, {"spec.publishNotReadyAddresses": "true"}),
        "spec.publishNotReadyAddresses",
        BOOLEAN,
    ),
    # --- EndpointSlice
    ok("slice/port-null-is-all-ports", edit(SLICE, {"ports.0.port": None})),
    ok("slice/port-name-null-is-empty", edit(SLICE, {"ports.0.name": None})),
    ok("slice/ports-null", edit(SLICE, {"ports": None})),
    ok("slice/name-subdomain", edit(SLICE, {"metadata.name": "web.abc-1"})),
    bad("slice/name-upper-case", edit(SLICE, {"metadata.name": "Web"}), "metadata.name", SUBDOMAIN),
    bad("slice/name-254", edit(SLICE, {"metadata.name": "a" * 254}), "metadata.name", SUBDOMAIN),
    bad("slice/port-0", edit(SLICE, {"ports.0.port": 0}), "ports[0].port", RANGE),
    bad("slice/port-70000", edit(SLICE, {"ports.0.port": 70000}), "ports[0].port", RANGE),
    bad("slice/port-quoted", edit(SLICE, {"ports.0.port": "8080"}), "ports[0].port", INTEGER),
    bad("slice/port-name-upper-case", edit(SLICE, {"ports.0.name": "HTTP"}), "ports[0].name", LABEL_1123),
    bad(
        "slice/port-names-twice",
        edit(SLICE, {"ports.1": {"name": "http", "port": 8443}}),
        "ports[1].name",
        DUPLICATE,
    ),
    bad(
        "slice/two-unnamed-ports",
        edit(SLICE, {"ports": [{"port": 1}, {"port": 2}]}),
        "ports[1]",  # (the absent name: the path stops at the port)
        DUPLICATE,
    ),
    bad("slice/protocol", edit(SLICE, {"ports.0.protocol": "HTTP"}), "ports[0].protocol", "supported"),
    bad("slice/address-type", edit(SLICE, {"addressType": "IP"}), "addressType", "IPv4"),
    bad(
        "slice/no-addresses",
        edit(SLICE, {"endpoints.0.addresses": []}),
        "endpoints[0].addresses",
        "at least 1",
    ),
    bad(
        "slice/node-name", edit(SLICE, {"endpoints.0.nodeName": "Node_1"}), "endpoints[0].nodeName", SUBDOMAIN
    ),
    bad(
        "slice/ready-text",
        edit(SLICE, {"endpoints.0.conditions.ready": "yes"}),
        "endpoints[0].conditions.ready",
        BOOLEAN,
    ),
    ok(
        "slice/hints",
        edit(SLICE, {"endpoints.0.hints": {"forZones": [{"name": "zone-a"}], "forNodes": [{"name": "n.1"}]}}),
    ),
    bad(
        "slice/zone-hint-space",
        edit(SLICE, {"endpoints.0.hints": {"forZones": [{"name": "zone a"}]}}),
        "endpoints[0].hints.forZones[0].name",
        VALUE,
    ),
    bad(
        "slice/zone-hint-twice",
        edit(SLICE, {"endpoints.0.hints": {"forZones": [{"name": "a"}, {"name": "a"}]}}),
        "endpoints[0].hints.forZones[1].name",
        DUPLICATE,
    ),
    bad(
        "slice/zone-hints-over-8",
        edit(SLICE, {"endpoints.0.hints": {"forZones": [{"name": f"z{i}"} for i in range(9)]}}),
        "endpoints[0].hints.forZones",
        "at most 8",
    ),
    bad(
        "slice/node-hint-name",
        edit(SLICE, {"endpoints.0.hints": {"forNodes": [{"name": "Node 1"}]}}),
        "endpoints[0].hints.forNodes[0].name",
        SUBDOMAIN,
    ),
    # --- Pod
    ok("pod/host-port", edit(POD, {"spec.containers.0.ports.0.hostPort": 8080})),
    ok("pod/host-port-0", edit(POD, {"spec.containers.0.ports.0.hostPort": 0})),
    ok("pod/name-subdomain", edit(POD, {"metadata.name": "web-1.x"})),
    ok("pod/dual-stack", edit(POD, {"status.podIPs": [{"ip": "10.0.0.1"}, {"ip": "fd00::1"}]})),
    bad("pod/name-upper-case", edit(POD, {"metadata.name": "Web-1"}), "metadata.name", SUBDOMAIN),
    bad("pod/node-name", edit(POD, {"spec.nodeName": "node 1"}), "spec.nodeName", SUBDOMAIN),
    bad(
        "pod/container-name",
        edit(POD, {"spec.containers.0.name": "Web"}),
        "spec.containers[0].name",
        LABEL_1123,
    ),
    bad(
        "pod/container-port-0",
        edit(POD, {"spec.containers.0.ports.0.containerPort": 0}),
        "spec.containers[0].ports[0].containerPort",
        RANGE,
    ),
    bad(
        "pod/container-port-70000",
        edit(POD, {"spec.containers.0.ports.0.containerPort": 70000}),
        "spec.containers[0].ports[0].containerPort",
        RANGE,
    ),
    bad(
        "pod/host-port-70000",
        edit(POD, {"spec.containers.0.ports.0.hostPort": 70000}),
        "spec.containers[0].ports[0].hostPort",
        RANGE,
    ),
    bad(
        "pod/port-name-digits",
        edit(POD, {"spec.containers.0.ports.0.name": "8080"}),
        "spec.containers[0].ports[0].name",
        LETTER,
    ),
    bad(
        "pod/port-name-16",
        edit(POD, {"spec.containers.0.ports.0.name": "a" * 16}),
        "spec.containers[0].ports[0].name",
        "15",
    ),
    bad(
        "pod/port-names-twice",
        edit(POD, {"spec.containers.0.ports.1": {"name": "http", "containerPort": 9090}}),
        "spec.containers[0].ports[1].name",
        DUPLICATE,
    ),
    bad("pod/host-network-text", edit(POD, {"spec.hostNetwork": "true"}), "spec.hostNetwork", BOOLEAN),
    bad("pod/pod-ip-zone", edit(POD, {"status.podIP": "fe80::1%eth0"}), "status.podIP", NOT_IP),
    bad("pod/pod-ips-zone", edit(POD, {"status.podIPs.0.ip": "fe80::1%eth0"}), "status.podIPs[0].ip", NOT_IP),
    bad(
        "pod/pod-ips-same-family",
        edit(POD, {"status.podIPs": [{"ip": "10.0.0.1"}, {"ip": "10.0.0.2"}]}),
        "status.podIPs",
        "one IP for each IP family",
    ),
    bad("pod/pod-ip-not-first", edit(POD, {"status.podIP": "10.0.0.9"}), "status", "first of podIPs"),
    # --- Node
    ok("node/name-fqdn", edit(NODE, {"metadata.name": "node-1.example.com"})),
    ok("node/address-unparsed", edit(NODE, {"status.addresses.0.address": "node-1.example.com"})),
    bad("node/name-underscore", edit(NODE, {"metadata.name": "node_1"}), "metadata.name", SUBDOMAIN),
    bad(
        "node/zone-label-value",
        edit(NODE, {"metadata.labels": {"topology.kubernetes.io/zone": "zone a"}}),
        "metadata.labels.topology.kubernetes.io/zone",
        VALUE,
    ),
    # --- the policy kinds
    ok("lrp/valid", LRP),
    ok("lrp/status-null", edit(LRP, {"status": None})),
    ok("bp/valid", BP),
    bad("lrp/spec-null", edit(LRP, {"spec": None}), "spec", REQUIRED),
    bad("lrp/name-upper-case", edit(LRP, {"metadata.name": "DNS"}), "metadata.name", SUBDOMAIN),
    bad("bp/name-underscore", edit(BP, {"metadata.name": "web_edge"}), "metadata.name", SUBDOMAIN),
    bad(
        "lrp/service-name",
        edit(LRP, {"spec.frontend.serviceMatcher.serviceName": "Kube-dns"}),
        "spec.frontend.serviceMatcher.serviceName",
        DNS1035,
    ),
    bad(
        "lrp/service-namespace",
        edit(LRP, {"spec.frontend.serviceMatcher.namespace": "kube\nsystem"}),
        "spec.frontend.serviceMatcher.namespace",
        LABEL_1123,
    ),
    bad(
        "lrp/qos-limit-over-u32",
        edit(LRP, {"spec.config": {"qosLimit": 2**32}}),
        "spec.config.qosLimit",
        "4294967295",
    ),
    bad(
        "lrp/qos-limit-float", edit(LRP, {"spec.config": {"qosLimit": 10.0}}), "spec.config.qosLimit", INTEGER
    ),
    bad(
        "lrp/port-99999",
        edit(LRP, {"spec.backend.toPorts.0.port": "99999"}),
        "spec.backend.toPorts[0].port",
        "1-65535",
    ),
    bad(
        "bp/port-70000",
        edit(BP, {"spec.frontend.addressMatcher.toPorts.0.port": 70000}),
        "spec.frontend.addressMatcher.toPorts[0].port",
        "1-65535",
    ),
    bad(
        "bp/address-zone",
        edit(BP, {"spec.backend.addressEndpoint.addresses": ["fe80::1%eth0"]}),
        "spec.backend.addressEndpoint.addresses[0]",
        "not an IPv4 or IPv6 address",
    ),
]


def test_case_names_are_unique() -> None:
    names = [c.name for c in CASES]
    assert len(names) == len(set(names))


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_validation(case: Case) -> None:
    if case.path is None:
        objects.parse_object(case.doc)
        return
    with pytest.raises(ValidationError) as info:
        objects.parse_object(case.doc)
    errors = field_errors(case.doc, info.value)
    assert case.path in errors, errors
    assert any(case.message in m for m in errors[case.path]), errors


def test_messages_quote_bad_text_escaped() -> None:
    """A message names the bad value as Python's repr does: no raw control character reaches a log line."""
    for name in ("web\nINFO forged", "web\x1b[2J", "web\r"):
        with pytest.raises(ValidationError) as info:
            objects.parse_object(edit(SERVICE, {"metadata.name": name, "spec.ports.0.targetPort": name}))
        for messages in field_errors({}, info.value).values():
            for message in messages:
                assert not any(ord(c) < 0x20 or c == "\x7f" for c in message), message


# --- anything that validates can be computed and written -------------------------------------------------

PORTS = [
    1,
    80,
    8080,
    65535,
    0,
    -1,
    65536,
    70000,
    2**31,
    2**64,
    "80",
    "99999",
    "0",
    "http",
    80.0,
    80.5,
    True,
    None,
]
NAMES = ["web", "db", "a" * 63, "Web", "1web", "web.x", "web\n", "", None, 7]
IPS_V4 = ["10.96.0.10", "10.0.0.1", "10.0.0.2", "192.168.0.1", "198.51.100.7"]
IPS = [
    *IPS_V4,
    "fd00::10",
    "fe80::1%eth0",
    "10.0.0.1\x00",
    " 10.0.0.1",
    "10.0.0.256",
    "::",
    "127.0.0.1",
    167772161,
    None,
]


def one_of(values: list[Any], valid: list[Any]) -> st.SearchStrategy[Any]:
    """Mostly a valid value (so whole objects validate often), one time in eight any of ``values``."""
    return st.integers(0, 7).flatmap(lambda n: st.sampled_from(values if n == 0 else valid))


@st.composite
def service_docs(draw: st.DrawFn) -> dict[str, Any]:
    def port() -> dict[str, Any]:
        return {
            "name": draw(st.sampled_from(["http", "https", "dns"])),
            "port": draw(one_of(PORTS, [80, 443, 53])),
            "targetPort": draw(one_of(PORTS, [8080, "http", None])),
            "nodePort": draw(one_of(PORTS, [30080, 0, None])),
            "protocol": draw(one_of(["TCP", "UDP", "SCTP", "tcp", 6], ["TCP", "UDP"])),
        }

    ports = [port() for _ in range(draw(one_of([0, 1, 2], [1, 2])))]
    if len(ports) == 2:
        ports[1]["name"] = "other"
        ports[1]["port"] = draw(one_of(PORTS, [8443, 9090]))
    spec = {
        "type": draw(st.sampled_from(["ClusterIP", "NodePort", "LoadBalancer"])),
        "clusterIP": draw(one_of(IPS, ["10.96.0.10", "fd00::10"])),
        "ports": ports,
        "selector": draw(one_of([{"app": "a b"}, {"a b": "web"}], [None, {"app": "web"}])),
        "externalIPs": draw(st.lists(one_of(IPS, ["198.51.100.7"]), max_size=2)),
        "externalTrafficPolicy": draw(st.sampled_from(["Cluster", "Local"])),
        "healthCheckNodePort": draw(one_of(PORTS, [32000, None])),
        "sessionAffinity": draw(st.sampled_from(["None", "ClientIP"])),
        "sessionAffinityConfig": {
            "clientIP": {"timeoutSeconds": draw(one_of([0, 1, 86400, 86401, 2**40, 1.5, None], [60, 86400]))}
        },
    }
    status = {"loadBalancer": {"ingress": [{"ip": draw(one_of(IPS, ["198.51.100.1"]))}]}}
    meta = {"name": draw(one_of(NAMES, ["web", "db"])), "namespace": draw(one_of(NAMES, ["default"]))}
    return {"apiVersion": "v1", "kind": "Service", "metadata": meta, "spec": spec, "status": status}


@st.composite
def slice_docs(draw: st.DrawFn) -> dict[str, Any]:
    endpoints = [
        {"addresses": [draw(one_of(IPS, IPS_V4))], "nodeName": draw(one_of(NAMES, ["node-1", "node-2"])),
         "conditions": {"ready": draw(st.booleans())}}
        for _ in range(draw(st.integers(0, 3)))
    ]  # fmt: skip
    return {
        "apiVersion": "discovery.k8s.io/v1",
        "kind": "EndpointSlice",
        "metadata": {"name": draw(st.sampled_from(["s1", "s2"])), "namespace": "default",
                     "labels": {"kubernetes.io/service-name": draw(st.sampled_from(["web", "db"]))}},
        "addressType": "IPv4",
        "endpoints": endpoints,
        "ports": [{"name": draw(st.sampled_from(["http", "dns", None])),
                   "port": draw(one_of(PORTS, [8080]))}],
    }  # fmt: skip


@st.composite
def pod_docs(draw: st.DrawFn) -> dict[str, Any]:
    cport = {"name": draw(one_of(["http", "8080", "HTTP", ""], ["http"])),
             "containerPort": draw(one_of(PORTS, [8080, 53])),
             "hostPort": draw(one_of(PORTS, [0, 8081]))}  # fmt: skip
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": draw(st.sampled_from(["p1", "p2"])), "namespace": "default", "uid": "u",
                     "labels": {"app": draw(st.sampled_from(["web", "cache"]))}},
        "spec": {"nodeName": draw(st.sampled_from(["node-1", "node-2"])),
                 "containers": [{"name": "c", "ports": [cport]}]},
        "status": {"phase": "Running", "podIPs": [{"ip": draw(one_of(IPS, IPS_V4))}],
                   "conditions": [{"type": "Ready", "status": "True"}]},
    }  # fmt: skip


@st.composite
def policy_docs(draw: st.DrawFn) -> dict[str, Any]:
    def port() -> dict[str, Any]:
        return {"port": draw(one_of(PORTS, [53, "8080"])), "protocol": draw(st.sampled_from(["TCP", "UDP"]))}

    frontend = draw(
        st.sampled_from(
            [
                {"serviceMatcher": {"serviceName": "web", "namespace": "default"}},
                {"addressMatcher": {"ip": draw(one_of(IPS, ["10.250.0.10"])), "toPorts": [port()]}},
            ]
        )
    )
    back = [port()]
    selector = {"matchLabels": {"app": "cache"}}
    if draw(st.booleans()):
        qos = draw(one_of([0, -1, 2**32 - 1, 2**32, 2**64, 1.5, "10"], [0, 100]))
        spec = {"frontend": frontend, "backend": {"endpointSelector": selector, "toPorts": back},
                "config": {"qosLimit": qos}}  # fmt: skip
        return {
            "apiVersion": POLICY_API,
            "kind": "LocalRedirectPolicy",
            "metadata": {"name": "lrp"},
            "spec": spec,
        }
    mode = draw(st.sampled_from(["podEndpoint", "hostPort", "nodeProxy"]))
    backend = draw(
        st.sampled_from(
            [
                {"serviceEndpoint": {"endpointSelector": selector, "toPorts": back, "redirectMode": mode}},
                {"addressEndpoint": {"addresses": [draw(one_of(IPS, IPS_V4))], "toPorts": back}},
            ]
        )
    )
    return {"apiVersion": POLICY_API, "kind": "BalancingPolicy", "metadata": {"name": "bp"},
            "spec": {"frontend": frontend, "backend": backend}}  # fmt: skip


ODD_ADDRESSES = [
    {"type": "InternalIP", "address": "fe80::1%eth0"},
    {"type": "ExternalIP", "address": "not IP"},
]
NODES = [
    edit(NODE, {}),
    edit(NODE, {"metadata.name": "node-2", "status.addresses.0.address": "192.168.0.2"}),
    edit(NODE, {"metadata.name": "node-3", "status.addresses": ODD_ADDRESSES}),
]
U16 = range(1, 65536)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.lists(
        st.one_of(service_docs(), slice_docs(), pod_docs(), policy_docs()),
        min_size=1,
        max_size=8,
    ),
    st.sampled_from(["node-1", "node-2"]),
)
def test_what_validates_can_be_computed_and_written(docs: list[dict[str, Any]], node_name: str) -> None:
    store = ClusterStore(ModelConfig(node_name))
    for doc in [*NODES, *docs]:
        try:
            obj = objects.parse_object(doc)
        except ValidationError:
            continue
        store.upsert(obj)
    state = store.desired()
    for key, frontend in state.frontends.items():
        assert key.port in U16, key
        for backend in (*frontend.backends, *(frontend.fallback or ())):
            assert backend.port in U16, backend
        for backend_pod in frontend.backend_pods:
            assert backend_pod.backend.port in U16, backend_pod
        assert 0 <= frontend.affinity_timeout <= 86400
        assert 0 <= frontend.qos_limit <= 2**32 - 1
    for port in store.health_checks():
        assert port in U16
    store.policy_status()
    store.conflicts()
