"""Labels that take a Service away from the default proxy: ``service.kubernetes.io/service-proxy-name``
(another proxy owns it) and ``service.kubernetes.io/headless`` (nobody proxies it).

Mirrors "[sig-network] Services should implement service.kubernetes.io/..." of test/e2e/network/service.go:
one Service created with the label stays down throughout; another is toggled, checked at each step.
"""

from __future__ import annotations

from helpers.twonodes import TwoNodes, ep, key, service, slice_for

DISABLED_VIP = "10.96.0.90"
TOGGLED_VIP = "10.96.0.91"


def _services(c: TwoNodes, label: dict[str, str], toggled_labelled: bool) -> None:
    disabled = service("service-disabled", [DISABLED_VIP], [("", 80, "TCP", 8080)], labels=label)
    toggled = service(
        "service-toggled", [TOGGLED_VIP], [("", 80, "TCP", 8080)], labels=label if toggled_labelled else {}
    )
    c.apply_synced(
        "services",
        [
            disabled,
            slice_for(
                "service-disabled",
                [ep(c.pod(n)) for n in ("pod-a2", "pod-b1", "pod-b2")],
                [("", 8080, "TCP")],
            ),
            toggled,
            slice_for(
                "service-toggled", [ep(c.pod(n)) for n in ("pod-a1", "pod-a2", "pod-b1")], [("", 8080, "TCP")]
            ),
        ],
    )


def _up(c: TwoNodes, vip: str, names: set[str]) -> None:
    """verifyServeHostnameServiceUp: from a pod and from a node, every endpoint answers (60 connects over 3
    endpoints: a miss has probability 3 * (2/3)^60 < 1e-10)."""
    for src in (c.a.client, c.b.host):
        res = c.tcp(src, vip, 80, 60)
        assert set(res["backends"]) == names and res["ok"] == 60, res


def _down(c: TwoNodes, vip: str) -> None:
    """verifyServeHostnameServiceDown: the VIP is not translated (nothing answers)."""
    for src in (c.a.client, c.b.host):
        res = c.tcp(src, vip, 80, 3)
        assert res["ok"] == 0 and res["errors"] == {"EHOSTUNREACH": 3}, res


def _label_test(c: TwoNodes, label: dict[str, str]) -> None:
    toggled_pods = {"pod-a1", "pod-a2", "pod-b1"}
    _services(c, label, toggled_labelled=False)
    c.wait_frontends(key(TOGGLED_VIP, 80), backends=3)
    c.wait_gone(key(DISABLED_VIP, 80))
    _up(c, TOGGLED_VIP, toggled_pods)
    _down(c, DISABLED_VIP)

    _services(c, label, toggled_labelled=True)  # add the label
    c.wait_gone(key(TOGGLED_VIP, 80))
    _down(c, TOGGLED_VIP)

    _services(c, label, toggled_labelled=False)  # remove it again
    c.wait_frontends(key(TOGGLED_VIP, 80), backends=3)
    _up(c, TOGGLED_VIP, toggled_pods)
    _down(c, DISABLED_VIP)


def test_should_implement_service_kubernetes_io_service_proxy_name(two_nodes: TwoNodes) -> None:
    """[sig-network] Services should implement service.kubernetes.io/service-proxy-name"""
    _label_test(two_nodes, {"service.kubernetes.io/service-proxy-name": "foo-bar"})


def test_should_implement_service_kubernetes_io_headless(two_nodes: TwoNodes) -> None:
    """[sig-network] Services should implement service.kubernetes.io/headless"""
    _label_test(two_nodes, {"service.kubernetes.io/headless": ""})
