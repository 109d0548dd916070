"""The policy CRDs' table of named cases: every rule of deploy/crds/ broken at every place it sits.

Each ``Case`` is a whole policy document and the verdict the API server must give on create (``ok``: stored;
``bad``: refused, ``expect`` being a piece of the error the rule that fires gives in the local admission of
tests/unit/test_crds.py: the CRD's own message for a CEL rule, jsonschema's wording for the OpenAPI schema).
The model (``objects.parse_object``) must give the same verdicts. Two users: tests/unit/test_crds.py (the
CRDs evaluated locally with jsonschema and cel-python, and the model) and tests/cluster/test_apiserver_crds.py
(the same cases sent to the real API server with server-side dry-run).
"""

from __future__ import annotations

from typing import Any, NamedTuple

from helpers.docedit import DELETE, clone, edit

API_VERSION = "balancing.elf.io/v1beta1"


def port(number: Any, protocol: str = "TCP", name: str | None = None) -> dict[str, Any]:
    entry = {"port": number, "protocol": protocol}
    return entry if name is None else {**entry, "name": name}


def policy(kind: str, spec: dict[str, Any]) -> dict[str, Any]:
    return {"apiVersion": API_VERSION, "kind": kind, "metadata": {"name": "p"}, "spec": clone(spec)}


DNS_PORTS = [port("53", "UDP", "dns"), port("53", "TCP", "dns-tcp")]
LRP_SVC = policy(
    "LocalRedirectPolicy",
    {
        "frontend": {
            "serviceMatcher": {"serviceName": "kube-dns", "namespace": "kube-system", "toPorts": DNS_PORTS}
        },
        "backend": {"endpointSelector": {"matchLabels": {"k8s-app": "node-local-dns"}}, "toPorts": DNS_PORTS},
    },
)
LRP_ADDR = policy(
    "LocalRedirectPolicy",
    {
        "frontend": {"addressMatcher": {"ip": "169.254.20.10", "toPorts": [port("53", "UDP")]}},
        "backend": {"endpointSelector": {"matchLabels": {"app": "cache"}}, "toPorts": [port("5353", "UDP")]},
    },
)
WEB_PORTS = [port("443", "TCP", "https"), port("80", "TCP", "http")]
BP_SVC = policy(
    "BalancingPolicy",
    {
        "frontend": {"serviceMatcher": {"serviceName": "web", "namespace": "default", "toPorts": [port(80)]}},
        "backend": {
            "serviceEndpoint": {"endpointSelector": {"matchLabels": {"app": "web"}}, "toPorts": [port(8080)]}
        },
    },
)
BP_ADDR = policy(
    "BalancingPolicy",
    {
        "frontend": {"addressMatcher": {"ip": "10.250.0.10", "toPorts": WEB_PORTS}},
        "backend": {
            "addressEndpoint": {
                "addresses": ["192.168.10.11", "192.168.10.12"],
                "toPorts": [port("8443", "TCP", "https"), port("8080", "TCP", "http")],
            }
        },
    },
)

SM = "spec.frontend.serviceMatcher"
AM = "spec.frontend.addressMatcher"
BE = "spec.backend"
SE = "spec.backend.serviceEndpoint"
AE = "spec.backend.addressEndpoint"
SEL = "spec.backend.endpointSelector"


class Case(NamedTuple):
    id: str
    doc: dict[str, Any]
    valid: bool
    expect: str = ""  # for an invalid case: a piece of the error the CRD must give (the rule that fires)


def ok(case_id: str, doc: dict[str, Any]) -> Case:
    return Case(case_id, doc, True)


def bad(case_id: str, doc: dict[str, Any], expect: str) -> Case:
    return Case(case_id, doc, False, expect)


PORT_RANGE = "port must be a number from 1 to 65535"
NEEDS_NAME = "every port needs a name"
UNIQUE_NAME = "port names must be unique"
ONCE = "each port/protocol once"
PAIRING = "does not pair with frontend"
KEY = "label keys are"
UNSPECIFIED = "the unspecified address"
NOT_IP = "is not a 'ipv4'"
ONE_MATCHER = "exactly one of serviceMatcher or addressMatcher"
ONE_BACKEND = "exactly one of serviceEndpoint or addressEndpoint"
NOT_ONE_OF = "is not one of"
REQUIRED = "is a required property"
TOO_SHORT = "should be non-empty"
TYPE = "is not of type"
PATTERN = "should match"
TOO_LONG = "is too long"
LEADING_ZERO = "IPv4 parts have no leading zeros"

CASES: list[Case] = [
    # frontend: exactly one matcher
    ok("lrp/service-named-ports", LRP_SVC),
    ok("lrp/address-one-port", LRP_ADDR),
    ok("lrp/service-all-ports", edit(LRP_SVC, {f"{SM}.toPorts": DELETE})),
    ok("lrp/service-empty-toPorts-is-all-ports", edit(LRP_SVC, {f"{SM}.toPorts": []})),
    ok("lrp/null-other-matcher", edit(LRP_SVC, {"spec.frontend.addressMatcher": None})),
    bad(
        "lrp/both-matchers", edit(LRP_SVC, {AM: LRP_ADDR["spec"]["frontend"]["addressMatcher"]}), ONE_MATCHER
    ),
    bad("lrp/no-matcher", edit(LRP_SVC, {"spec.frontend": {}}), ONE_MATCHER),
    bad("lrp/no-frontend", edit(LRP_SVC, {"spec.frontend": DELETE}), REQUIRED),
    bad("lrp/no-backend", edit(LRP_SVC, {"spec.backend": DELETE}), REQUIRED),
    bad("lrp/no-spec", edit(LRP_SVC, {"spec": DELETE}), REQUIRED),
    bad("lrp/service-no-name", edit(LRP_SVC, {f"{SM}.serviceName": DELETE}), REQUIRED),
    bad("lrp/service-empty-name", edit(LRP_SVC, {f"{SM}.serviceName": ""}), TOO_SHORT),
    bad("lrp/service-no-namespace", edit(LRP_SVC, {f"{SM}.namespace": DELETE}), REQUIRED),
    # the Service's name and namespace as the API server checks a Service's (no dots, capitals, newlines)
    ok("lrp/service-name-63", edit(LRP_SVC, {f"{SM}.serviceName": "a" * 63})),
    ok("lrp/namespace-starts-with-digit", edit(LRP_SVC, {f"{SM}.namespace": "1-ns"})),
    bad("lrp/service-name-64", edit(LRP_SVC, {f"{SM}.serviceName": "a" * 64}), TOO_LONG),
    bad("lrp/service-name-upper-case", edit(LRP_SVC, {f"{SM}.serviceName": "Kube-dns"}), PATTERN),
    bad("lrp/service-name-starts-with-digit", edit(LRP_SVC, {f"{SM}.serviceName": "1dns"}), PATTERN),
    bad("lrp/service-name-dot", edit(LRP_SVC, {f"{SM}.serviceName": "kube.dns"}), PATTERN),
    bad("lrp/service-name-trailing-dash", edit(LRP_SVC, {f"{SM}.serviceName": "dns-"}), PATTERN),
    bad("lrp/service-name-newline", edit(LRP_SVC, {f"{SM}.serviceName": "kube-dns\n"}), PATTERN),
    bad("lrp/namespace-64", edit(LRP_SVC, {f"{SM}.namespace": "a" * 64}), TOO_LONG),
    bad("lrp/namespace-underscore", edit(LRP_SVC, {f"{SM}.namespace": "kube_system"}), PATTERN),
    bad("lrp/namespace-control-character", edit(LRP_SVC, {f"{SM}.namespace": "kube\x1bsystem"}), PATTERN),
    bad("lrp/address-no-ip", edit(LRP_ADDR, {f"{AM}.ip": DELETE}), REQUIRED),
    bad("lrp/address-no-toPorts", edit(LRP_ADDR, {f"{AM}.toPorts": DELETE}), REQUIRED),
    bad("lrp/address-empty-toPorts", edit(LRP_ADDR, {f"{AM}.toPorts": []}), TOO_SHORT),
    # IP addresses, both families
    ok("lrp/ip-v6", edit(LRP_ADDR, {f"{AM}.ip": "fd00::10"})),
    ok("lrp/ip-v6-upper-case", edit(LRP_ADDR, {f"{AM}.ip": "FD00::A"})),
    ok("lrp/ip-v4-mapped-v6", edit(LRP_ADDR, {f"{AM}.ip": "::ffff:10.0.0.1"})),
    ok("lrp/ip-loopback", edit(LRP_ADDR, {f"{AM}.ip": "127.0.0.1"})),
    bad("lrp/ip-octet-256", edit(LRP_ADDR, {f"{AM}.ip": "10.0.0.256"}), NOT_IP),
    bad("lrp/ip-three-octets", edit(LRP_ADDR, {f"{AM}.ip": "10.0.0"}), NOT_IP),
    # (the API server's ipv4 format accepts leading zeros, as Go's ParseIP once did; a CEL rule refuses them)
    bad("lrp/ip-leading-zero", edit(LRP_ADDR, {f"{AM}.ip": "010.0.0.1"}), LEADING_ZERO),
    bad("lrp/ip-leading-zero-last-octet", edit(LRP_ADDR, {f"{AM}.ip": "10.0.0.01"}), LEADING_ZERO),
    bad("lrp/ip-v4-mapped-leading-zero", edit(LRP_ADDR, {f"{AM}.ip": "::ffff:010.0.0.1"}), LEADING_ZERO),
    ok("lrp/ip-v6-group-leading-zeros", edit(LRP_ADDR, {f"{AM}.ip": "fd00::0010"})),
    ok("lrp/ip-zero-octets", edit(LRP_ADDR, {f"{AM}.ip": "10.0.0.0"})),
    bad("lrp/ip-cidr", edit(LRP_ADDR, {f"{AM}.ip": "10.0.0.1/32"}), NOT_IP),
    bad("lrp/ip-space", edit(LRP_ADDR, {f"{AM}.ip": " 10.0.0.1"}), NOT_IP),
    bad("lrp/ip-zone", edit(LRP_ADDR, {f"{AM}.ip": "fe80::1%eth0"}), NOT_IP),
    bad("lrp/ip-v6-two-gaps", edit(LRP_ADDR, {f"{AM}.ip": "fd00::1::2"}), NOT_IP),
    bad("lrp/ip-hostname", edit(LRP_ADDR, {f"{AM}.ip": "dns.example.com"}), NOT_IP),
    bad("lrp/ip-empty", edit(LRP_ADDR, {f"{AM}.ip": ""}), NOT_IP),
    bad("lrp/ip-integer", edit(LRP_ADDR, {f"{AM}.ip": 167772161}), TYPE),
    bad("lrp/ip-unspecified-v4", edit(LRP_ADDR, {f"{AM}.ip": "0.0.0.0"}), UNSPECIFIED),
    bad("lrp/ip-unspecified-v6", edit(LRP_ADDR, {f"{AM}.ip": "::"}), UNSPECIFIED),
    bad("lrp/ip-unspecified-v6-long", edit(LRP_ADDR, {f"{AM}.ip": "0:0::0.0.0.0"}), UNSPECIFIED),
    bad("lrp/ip-trailing-newline", edit(LRP_ADDR, {f"{AM}.ip": "10.0.0.1\n"}), NOT_IP),
    # ports: "1".."65535" or an integer, protocol TCP|UDP
    ok("lrp/port-integer", edit(LRP_ADDR, {f"{AM}.toPorts.0.port": 53})),
    ok("lrp/port-min", edit(LRP_ADDR, {f"{AM}.toPorts.0.port": "1"})),
    ok("lrp/port-max", edit(LRP_ADDR, {f"{AM}.toPorts.0.port": 65535})),
    ok("lrp/port-max-string", edit(LRP_ADDR, {f"{AM}.toPorts.0.port": "65535"})),
    bad("lrp/port-zero", edit(LRP_ADDR, {f"{AM}.toPorts.0.port": 0}), PORT_RANGE),
    bad("lrp/port-zero-string", edit(LRP_ADDR, {f"{AM}.toPorts.0.port": "0"}), PATTERN),
    bad("lrp/port-65536", edit(LRP_ADDR, {f"{AM}.toPorts.0.port": 65536}), PORT_RANGE),
    bad("lrp/port-65536-string", edit(LRP_ADDR, {f"{AM}.toPorts.0.port": "65536"}), PORT_RANGE),
    bad("lrp/port-99999-string", edit(LRP_ADDR, {f"{AM}.toPorts.0.port": "99999"}), PORT_RANGE),
    bad("lrp/port-negative", edit(LRP_ADDR, {f"{AM}.toPorts.0.port": -1}), PORT_RANGE),
    bad("lrp/port-leading-zero", edit(LRP_ADDR, {f"{AM}.toPorts.0.port": "053"}), PATTERN),
    bad("lrp/port-plus-sign", edit(LRP_ADDR, {f"{AM}.toPorts.0.port": "+53"}), PATTERN),
    bad("lrp/port-space", edit(LRP_ADDR, {f"{AM}.toPorts.0.port": " 53"}), PATTERN),
    bad("lrp/port-trailing-newline", edit(LRP_ADDR, {f"{AM}.toPorts.0.port": "53\n"}), PATTERN),
    bad("lrp/port-name-as-number", edit(LRP_ADDR, {f"{AM}.toPorts.0.port": "dns"}), PATTERN),
    bad("lrp/port-empty", edit(LRP_ADDR, {f"{AM}.toPorts.0.port": ""}), PATTERN),
    bad("lrp/port-fraction", edit(LRP_ADDR, {f"{AM}.toPorts.0.port": 53.5}), TYPE),
    bad("lrp/port-bool", edit(LRP_ADDR, {f"{AM}.toPorts.0.port": True}), TYPE),
    bad("lrp/port-missing", edit(LRP_ADDR, {f"{AM}.toPorts.0.port": DELETE}), REQUIRED),
    bad("lrp/port-null", edit(LRP_ADDR, {f"{AM}.toPorts.0.port": None}), REQUIRED),
    bad("lrp/backend-port-zero", edit(LRP_ADDR, {f"{BE}.toPorts.0.port": "0"}), PATTERN),
    ok(
        "lrp/protocol-tcp",
        edit(LRP_ADDR, {f"{AM}.toPorts.0.protocol": "TCP", f"{BE}.toPorts.0.protocol": "TCP"}),
    ),
    bad("lrp/protocol-sctp", edit(LRP_ADDR, {f"{AM}.toPorts.0.protocol": "SCTP"}), NOT_ONE_OF),
    bad("lrp/protocol-lower-case", edit(LRP_ADDR, {f"{AM}.toPorts.0.protocol": "udp"}), NOT_ONE_OF),
    bad("lrp/protocol-missing", edit(LRP_ADDR, {f"{AM}.toPorts.0.protocol": DELETE}), REQUIRED),
    bad("lrp/protocol-number", edit(LRP_ADDR, {f"{AM}.toPorts.0.protocol": 17}), TYPE),
    # port names: every port named when more than one, unique, well formed
    ok(
        "lrp/one-port-names-differ",
        edit(LRP_ADDR, {f"{AM}.toPorts.0.name": "a", f"{BE}.toPorts.0.name": "b"}),
    ),
    ok("lrp/one-port-empty-name", edit(LRP_ADDR, {f"{AM}.toPorts.0.name": ""})),
    ok(
        "lrp/name-upper-case-and-digits",
        edit(LRP_SVC, {f"{SM}.toPorts.0.name": "DNS1", f"{BE}.toPorts.0.name": "DNS1"}),
    ),
    ok("lrp/name-63-chars", edit(LRP_ADDR, {f"{AM}.toPorts.0.name": "a" * 63})),
    bad("lrp/two-ports-one-unnamed", edit(LRP_SVC, {f"{SM}.toPorts.1.name": DELETE}), NEEDS_NAME),
    bad("lrp/two-ports-one-empty-name", edit(LRP_SVC, {f"{BE}.toPorts.0.name": ""}), NEEDS_NAME),
    bad("lrp/duplicate-names", edit(LRP_SVC, {f"{BE}.toPorts.1.name": "dns"}), UNIQUE_NAME),
    bad("lrp/name-underscore", edit(LRP_ADDR, {f"{AM}.toPorts.0.name": "dns_tcp"}), PATTERN),
    bad("lrp/name-leading-dash", edit(LRP_ADDR, {f"{AM}.toPorts.0.name": "-dns"}), PATTERN),
    bad("lrp/name-64-chars", edit(LRP_ADDR, {f"{AM}.toPorts.0.name": "a" * 64}), TOO_LONG),
    bad("lrp/name-trailing-newline", edit(LRP_ADDR, {f"{AM}.toPorts.0.name": "dns\n"}), PATTERN),
    # a frontend lists each port/protocol once (a backend may repeat one under different names)
    bad(
        "lrp/frontend-repeats-port",
        edit(LRP_SVC, {f"{SM}.toPorts.1.protocol": "UDP", f"{BE}.toPorts.1.protocol": "UDP"}),
        ONCE,
    ),
    bad(
        "lrp/frontend-repeats-port-int-and-string",
        edit(LRP_SVC, {f"{SM}.toPorts.1": port(53, "UDP", "dns-tcp")}),
        ONCE,
    ),
    bad(
        "lrp/address-repeats-port",
        edit(LRP_ADDR, {f"{AM}.toPorts": [port(53, "UDP", "a"), port("53", "UDP", "b")]}),
        ONCE,
    ),
    ok(
        "lrp/backend-repeats-port",
        edit(LRP_SVC, {f"{BE}.toPorts": [port(53, "UDP", "dns"), port(53, "TCP", "dns-tcp")]}),
    ),
    ok(
        "lrp/upstream-example",
        edit(
            LRP_SVC,
            {
                f"{SM}.toPorts": [port("8080", "TCP", "p1"), port("80", "TCP", "p2")],
                f"{BE}.toPorts": [port("80", "TCP", "p1"), port("80", "TCP", "p2")],
            },
        ),
    ),
    # pairing: one port each side maps directly (same protocol), otherwise by name (same protocol)
    bad("lrp/one-port-protocols-differ", edit(LRP_ADDR, {f"{BE}.toPorts.0.protocol": "TCP"}), PAIRING),
    bad("lrp/names-differ", edit(LRP_SVC, {f"{BE}.toPorts.1.name": "tcp"}), PAIRING),
    bad(
        "lrp/named-protocols-differ",
        edit(LRP_SVC, {f"{BE}.toPorts": [port(53, "TCP", "dns"), port(53, "UDP", "dns-tcp")]}),
        PAIRING,
    ),
    bad("lrp/frontend-two-backend-one", edit(LRP_SVC, {f"{BE}.toPorts": [port(53, "UDP", "dns")]}), PAIRING),
    bad("lrp/frontend-one-unnamed-backend-two", edit(LRP_SVC, {f"{SM}.toPorts": [port(53, "UDP")]}), PAIRING),
    bad(
        "lrp/frontend-one-named-backend-two",
        edit(LRP_SVC, {f"{SM}.toPorts": [port(53, "UDP", "dns")]}),
        PAIRING,
    ),
    ok("lrp/all-service-ports-backend-two", edit(LRP_SVC, {f"{SM}.toPorts": DELETE})),
    ok(
        "lrp/three-ports-other-order",
        edit(
            LRP_SVC,
            {
                f"{SM}.toPorts": [port(1, "TCP", "a"), port(2, "TCP", "b"), port(3, "UDP", "c")],
                f"{BE}.toPorts": [port(30, "UDP", "c"), port(10, "TCP", "a"), port(20, "TCP", "b")],
            },
        ),
    ),
    bad(
        "lrp/backend-name-not-in-frontend",
        edit(LRP_SVC, {f"{BE}.toPorts": [*DNS_PORTS, port(9153, "TCP", "metrics")]}),
        PAIRING,
    ),
    # the backend
    bad("lrp/backend-no-selector", edit(LRP_SVC, {f"{BE}.endpointSelector": DELETE}), REQUIRED),
    bad("lrp/backend-no-toPorts", edit(LRP_SVC, {f"{BE}.toPorts": DELETE}), REQUIRED),
    bad("lrp/backend-empty-toPorts", edit(LRP_SVC, {f"{BE}.toPorts": []}), TOO_SHORT),
    # selectors: matchLabels and matchExpressions (In/NotIn need values, Exists/DoesNotExist take none)
    ok("lrp/selector-empty-selects-all", edit(LRP_SVC, {SEL: {}})),
    ok("lrp/selector-prefixed-key", edit(LRP_SVC, {SEL: {"matchLabels": {"app.kubernetes.io/name": "dns"}}})),
    ok("lrp/selector-empty-value", edit(LRP_SVC, {SEL: {"matchLabels": {"cache": ""}}})),
    ok(
        "lrp/selector-every-operator",
        edit(
            LRP_SVC,
            {
                SEL: {
                    "matchExpressions": [
                        {"key": "app", "operator": "In", "values": ["a", "b"]},
                        {"key": "tier", "operator": "NotIn", "values": ["x"]},
                        {"key": "cache", "operator": "Exists"},
                        {"key": "canary", "operator": "DoesNotExist", "values": []},
                    ]
                }
            },
        ),
    ),
    ok(
        "lrp/selector-key-63-name-253-prefix",
        edit(LRP_SVC, {SEL: {"matchLabels": {"a" * 253 + "/" + "b" * 63: "v"}}}),
    ),
    bad(
        "lrp/selector-in-without-values",
        edit(LRP_SVC, {SEL: {"matchExpressions": [{"key": "app", "operator": "In"}]}}),
        "non-empty when operator is In",
    ),
    bad(
        "lrp/selector-notin-empty-values",
        edit(LRP_SVC, {SEL: {"matchExpressions": [{"key": "app", "operator": "NotIn", "values": []}]}}),
        "non-empty when operator is In",
    ),
    bad(
        "lrp/selector-exists-with-values",
        edit(LRP_SVC, {SEL: {"matchExpressions": [{"key": "app", "operator": "Exists", "values": ["a"]}]}}),
        "empty when operator is Exists",
    ),
    bad(
        "lrp/selector-doesnotexist-with-values",
        edit(
            LRP_SVC, {SEL: {"matchExpressions": [{"key": "a", "operator": "DoesNotExist", "values": ["a"]}]}}
        ),
        "empty when operator is Exists",
    ),
    bad(
        "lrp/selector-unknown-operator",
        edit(LRP_SVC, {SEL: {"matchExpressions": [{"key": "app", "operator": "Equals", "values": ["a"]}]}}),
        NOT_ONE_OF,
    ),
    bad(
        "lrp/selector-lower-case-operator",
        edit(LRP_SVC, {SEL: {"matchExpressions": [{"key": "app", "operator": "in", "values": ["a"]}]}}),
        NOT_ONE_OF,
    ),
    bad(
        "lrp/selector-no-key", edit(LRP_SVC, {SEL: {"matchExpressions": [{"operator": "Exists"}]}}), REQUIRED
    ),
    bad("lrp/selector-no-operator", edit(LRP_SVC, {SEL: {"matchExpressions": [{"key": "app"}]}}), REQUIRED),
    bad(
        "lrp/selector-empty-key",
        edit(LRP_SVC, {SEL: {"matchExpressions": [{"key": "", "operator": "Exists"}]}}),
        KEY,
    ),
    bad(
        "lrp/selector-key-space",
        edit(LRP_SVC, {SEL: {"matchExpressions": [{"key": "a b", "operator": "Exists"}]}}),
        KEY,
    ),
    bad("lrp/selector-key-leading-dash", edit(LRP_SVC, {SEL: {"matchLabels": {"-app": "x"}}}), KEY),
    bad(
        "lrp/selector-key-upper-case-prefix",
        edit(LRP_SVC, {SEL: {"matchLabels": {"Example.com/app": "x"}}}),
        KEY,
    ),
    bad("lrp/selector-key-two-slashes", edit(LRP_SVC, {SEL: {"matchLabels": {"a/b/c": "x"}}}), KEY),
    bad("lrp/selector-key-empty-prefix", edit(LRP_SVC, {SEL: {"matchLabels": {"/app": "x"}}}), KEY),
    bad("lrp/selector-key-prefix-254", edit(LRP_SVC, {SEL: {"matchLabels": {"a" * 254 + "/b": "x"}}}), KEY),
    bad(
        "lrp/selector-key-name-64",
        edit(LRP_SVC, {SEL: {"matchExpressions": [{"key": "a" * 64, "operator": "Exists"}]}}),
        KEY,
    ),
    bad("lrp/selector-key-trailing-newline", edit(LRP_SVC, {SEL: {"matchLabels": {"app\n": "x"}}}), KEY),
    bad("lrp/selector-value-space", edit(LRP_SVC, {SEL: {"matchLabels": {"app": "a b"}}}), PATTERN),
    bad("lrp/selector-value-64", edit(LRP_SVC, {SEL: {"matchLabels": {"app": "a" * 64}}}), TOO_LONG),
    bad("lrp/selector-value-integer", edit(LRP_SVC, {SEL: {"matchLabels": {"app": 1}}}), TYPE),
    bad(
        "lrp/selector-values-item-invalid",
        edit(LRP_SVC, {SEL: {"matchExpressions": [{"key": "a", "operator": "In", "values": ["-x"]}]}}),
        PATTERN,
    ),
    # config, skipRedirectFromBackend, enabled
    ok(
        "lrp/config-full",
        edit(
            LRP_SVC,
            {
                "spec.config": {
                    "qosLimit": 100,
                    "enableOutCluster": False,
                    "nodeLabelSelector": {"matchLabels": {"role": "edge"}},
                }
            },
        ),
    ),
    ok("lrp/qos-limit-zero", edit(LRP_SVC, {"spec.config.qosLimit": 0})),
    ok("lrp/qos-limit-max", edit(LRP_SVC, {"spec.config.qosLimit": 2**32 - 1})),
    ok("lrp/skip-redirect-from-backend", edit(LRP_SVC, {"spec.skipRedirectFromBackend": True})),
    ok("lrp/enabled-false", edit(LRP_SVC, {"spec.enabled": False})),
    bad("lrp/qos-limit-negative", edit(LRP_SVC, {"spec.config.qosLimit": -1}), "less than the minimum"),
    bad("lrp/qos-limit-too-big", edit(LRP_SVC, {"spec.config.qosLimit": 2**32}), "greater than the maximum"),
    bad("lrp/qos-limit-string", edit(LRP_SVC, {"spec.config.qosLimit": "100"}), TYPE),
    bad("lrp/qos-limit-fraction", edit(LRP_SVC, {"spec.config.qosLimit": 1.5}), TYPE),
    bad(
        "lrp/node-selector-bad-operator",
        edit(
            LRP_SVC,
            {
                "spec.config.nodeLabelSelector": {
                    "matchExpressions": [{"key": "a", "operator": "Exists", "values": ["x"]}]
                }
            },
        ),
        "empty when operator is Exists",
    ),
    bad("lrp/enable-out-cluster-string", edit(LRP_SVC, {"spec.config.enableOutCluster": "true"}), TYPE),
    bad("lrp/skip-redirect-string", edit(LRP_SVC, {"spec.skipRedirectFromBackend": "yes"}), TYPE),
    bad("lrp/enabled-number", edit(LRP_SVC, {"spec.enabled": 0}), TYPE),
    # nulls and unknown fields: the API server drops them (kubectl --validate=strict refuses unknown fields)
    ok("lrp/unknown-field-dropped", edit(LRP_SVC, {"spec.weight": 3, f"{SM}.cluster": "a"})),
    ok("lrp/metadata-namespace-ignored", edit(LRP_SVC, {"metadata.namespace": "default"})),
    ok("lrp/null-port-name", edit(LRP_ADDR, {f"{AM}.toPorts.0.name": None})),
    ok("lrp/null-config", edit(LRP_SVC, {"spec.config": None})),
    ok("lrp/null-enabled", edit(LRP_SVC, {"spec.enabled": None})),
    ok("lrp/null-service-toPorts", edit(LRP_SVC, {f"{SM}.toPorts": None})),
    ok("lrp/null-match-label", edit(LRP_SVC, {f"{SEL}.matchLabels.tier": None})),
    ok("lrp/status-ignored-on-create", edit(LRP_SVC, {"status": {"conditions": "not a list", "nodes": 3}})),
    bad("lrp/no-metadata-name", edit(LRP_SVC, {"metadata": {}}), "metadata.name"),
    ok(
        "lrp/null-selector-values",
        edit(LRP_SVC, {SEL: {"matchExpressions": [{"key": "a", "operator": "Exists", "values": None}]}}),
    ),
    # bounds that keep the API server's CEL cost estimate in budget
    bad(
        "lrp/toPorts-over-64",
        edit(
            LRP_ADDR,
            {
                f"{AM}.toPorts": [port(p, "TCP", f"p{p}") for p in range(1, 66)],
                f"{BE}.toPorts": [port(p, "TCP", f"p{p}") for p in range(1, 66)],
            },
        ),
        "is too long",
    ),
    bad(
        "lrp/match-labels-over-64",
        edit(LRP_SVC, {SEL: {"matchLabels": {f"k{i}": "v" for i in range(65)}}}),
        "has too many properties",
    ),
    bad(
        "lrp/match-expressions-over-64",
        edit(
            LRP_SVC, {SEL: {"matchExpressions": [{"key": f"k{i}", "operator": "Exists"} for i in range(65)]}}
        ),
        "is too long",
    ),
    # BalancingPolicy: exactly one backend kind
    ok("bp/service-pod-endpoint", BP_SVC),
    ok("bp/address-endpoint", BP_ADDR),
    ok("bp/host-port", edit(BP_SVC, {f"{SE}.redirectMode": "hostPort"})),
    ok("bp/node-proxy", edit(BP_SVC, {f"{SE}.redirectMode": "nodeProxy"})),
    ok("bp/pod-endpoint-explicit", edit(BP_SVC, {f"{SE}.redirectMode": "podEndpoint"})),
    ok(
        "bp/address-endpoint-both-families",
        edit(BP_ADDR, {f"{AE}.addresses": ["192.168.10.11", "fd00:10::11"]}),
    ),
    ok(
        "bp/address-endpoint-v6-frontend",
        edit(BP_ADDR, {f"{AM}.ip": "fd00::10", f"{AE}.addresses": ["fd00:10::11"]}),
    ),
    ok(
        "bp/service-all-ports-address-endpoint",
        edit(BP_ADDR, {"spec.frontend": {"serviceMatcher": {"serviceName": "web", "namespace": "default"}}}),
    ),
    ok("bp/qos-limit-is-not-a-bp-field", edit(BP_SVC, {"spec.config.qosLimit": 5})),
    ok("bp/skip-redirect-is-not-a-bp-field", edit(BP_SVC, {"spec.skipRedirectFromBackend": True})),
    ok(
        "bp/config-node-selector",
        edit(
            BP_ADDR,
            {"spec.config.nodeLabelSelector": {"matchExpressions": [{"key": "edge", "operator": "Exists"}]}},
        ),
    ),
    bad("bp/both-backends", edit(BP_SVC, {AE: BP_ADDR["spec"]["backend"]["addressEndpoint"]}), ONE_BACKEND),
    bad("bp/no-backend-kind", edit(BP_SVC, {"spec.backend": {}}), ONE_BACKEND),
    bad("bp/redirect-mode-node-port", edit(BP_SVC, {f"{SE}.redirectMode": "nodePort"}), NOT_ONE_OF),
    bad("bp/redirect-mode-case", edit(BP_SVC, {f"{SE}.redirectMode": "PodEndpoint"}), NOT_ONE_OF),
    bad("bp/service-endpoint-no-selector", edit(BP_SVC, {f"{SE}.endpointSelector": DELETE}), REQUIRED),
    bad("bp/service-endpoint-no-toPorts", edit(BP_SVC, {f"{SE}.toPorts": DELETE}), REQUIRED),
    bad("bp/service-endpoint-empty-toPorts", edit(BP_SVC, {f"{SE}.toPorts": []}), TOO_SHORT),
    bad(
        "bp/service-endpoint-bad-selector",
        edit(BP_SVC, {f"{SE}.endpointSelector": {"matchExpressions": [{"key": "a", "operator": "In"}]}}),
        "non-empty when operator is In",
    ),
    bad("bp/address-endpoint-no-addresses", edit(BP_ADDR, {f"{AE}.addresses": DELETE}), REQUIRED),
    bad("bp/address-endpoint-empty-addresses", edit(BP_ADDR, {f"{AE}.addresses": []}), TOO_SHORT),
    bad(
        "bp/address-endpoint-bad-address",
        edit(BP_ADDR, {f"{AE}.addresses": ["192.168.10.11", "192.168.10.256"]}),
        NOT_IP,
    ),
    bad("bp/address-endpoint-unspecified", edit(BP_ADDR, {f"{AE}.addresses": ["0.0.0.0"]}), UNSPECIFIED),
    bad("bp/address-endpoint-no-toPorts", edit(BP_ADDR, {f"{AE}.toPorts": DELETE}), REQUIRED),
    bad("bp/address-endpoint-names-differ", edit(BP_ADDR, {f"{AE}.toPorts.1.name": "web"}), PAIRING),
    bad("bp/service-endpoint-pairing", edit(BP_SVC, {f"{SE}.toPorts.0.protocol": "UDP"}), PAIRING),
    bad(
        "bp/address-matcher-service-endpoint-pairing",
        edit(
            BP_ADDR,
            {
                "spec.backend": {
                    "serviceEndpoint": {"endpointSelector": {}, "toPorts": [port(8443, "TCP", "https")]}
                }
            },
        ),
        PAIRING,
    ),
    bad(
        "bp/service-matcher-address-endpoint-pairing",
        edit(
            BP_SVC,
            {
                "spec.backend": {
                    "addressEndpoint": {
                        "addresses": ["10.1.1.1"],
                        "toPorts": [port(8443, "TCP", "https"), port(8080, "TCP", "http")],
                    }
                }
            },
        ),
        PAIRING,
    ),
    bad("bp/frontend-port-invalid", edit(BP_SVC, {f"{SM}.toPorts.0.port": 0}), PORT_RANGE),
    bad("bp/address-endpoint-port-invalid", edit(BP_ADDR, {f"{AE}.toPorts.0.port": "65536"}), PORT_RANGE),
    bad(
        "bp/address-endpoint-over-64",
        edit(BP_ADDR, {f"{AE}.addresses": [f"192.168.10.{i}" for i in range(1, 66)]}),
        TOO_LONG,
    ),
]


def _per_location_cases() -> list[Case]:
    """The rules that sit at several places (toPorts lists, selectors, addresses), broken at each place."""
    cases: list[Case] = []
    port_lists = [
        ("lrp", LRP_SVC, f"{SM}.toPorts", True),
        ("lrp", LRP_ADDR, f"{AM}.toPorts", True),
        ("lrp", LRP_SVC, f"{BE}.toPorts", False),
        ("bp", BP_SVC, f"{SM}.toPorts", True),
        ("bp", BP_ADDR, f"{AM}.toPorts", True),
        ("bp", BP_SVC, f"{SE}.toPorts", False),
        ("bp", BP_ADDR, f"{AE}.toPorts", False),
    ]
    for kind, base, where, frontend in port_lists:
        at = f"{kind}/{where.removeprefix('spec.')}"
        cases += [
            bad(f"{at}/unnamed", edit(base, {where: [port(1, "TCP", "a"), port(2, "TCP")]}), NEEDS_NAME),
            bad(
                f"{at}/same-name",
                edit(base, {where: [port(1, "TCP", "a"), port(2, "TCP", "a")]}),
                UNIQUE_NAME,
            ),
            bad(f"{at}/port-range", edit(base, {where: [port(65536, "TCP")]}), PORT_RANGE),
        ]
        if frontend:
            twice = [port(1, "TCP", "a"), port("1", "TCP", "b")]
            cases.append(bad(f"{at}/same-port", edit(base, {where: twice}), ONCE))
    selectors = [
        ("lrp", LRP_SVC, SEL),
        ("lrp", LRP_SVC, "spec.config.nodeLabelSelector"),
        ("bp", BP_SVC, f"{SE}.endpointSelector"),
        ("bp", BP_SVC, "spec.config.nodeLabelSelector"),
    ]
    for kind, base, where in selectors:
        at = f"{kind}/{where.removeprefix('spec.')}"
        expressions = f"{where}.matchExpressions"
        cases += [
            bad(f"{at}/in-no-values", edit(base, {expressions: [{"key": "a", "operator": "In"}]}), "is In"),
            bad(
                f"{at}/exists-values",
                edit(base, {expressions: [{"key": "a", "operator": "Exists", "values": ["v"]}]}),
                "is Exists",
            ),
            bad(
                f"{at}/expression-key", edit(base, {expressions: [{"key": "a b", "operator": "Exists"}]}), KEY
            ),
            bad(f"{at}/label-key", edit(base, {f"{where}.matchLabels": {"a b": "v"}}), KEY),
        ]
    both_matchers = {AM: BP_ADDR["spec"]["frontend"]["addressMatcher"]}
    cases += [
        bad("bp/both-matchers", edit(BP_SVC, both_matchers), ONE_MATCHER),
        bad("bp/address-matcher-unspecified", edit(BP_ADDR, {f"{AM}.ip": "::"}), UNSPECIFIED),
        bad("bp/service-name-upper-case", edit(BP_SVC, {f"{SM}.serviceName": "Web"}), PATTERN),
        bad("bp/service-namespace-dot", edit(BP_SVC, {f"{SM}.namespace": "a.b"}), PATTERN),
        bad("bp/address-matcher-bad-ip", edit(BP_ADDR, {f"{AM}.ip": "10.250.0.1000"}), NOT_IP),
        bad("bp/address-matcher-leading-zero", edit(BP_ADDR, {f"{AM}.ip": "10.250.0.010"}), LEADING_ZERO),
        bad(
            "bp/address-endpoint-leading-zero",
            edit(BP_ADDR, {f"{AE}.addresses.1": "192.168.010.12"}),
            LEADING_ZERO,
        ),
    ]
    return cases


CASES += _per_location_cases()
