"""The admission webhooks: AdmissionReview v1 decisions, defaults as JSONPatch, conflicts with older
policies, and the HTTPS server with a generated CA (a real, verified TLS handshake)."""

from __future__ import annotations

import asyncio
import base64
import copy
import json
import ssl
from pathlib import Path
from typing import Any

import pytest

from balancing.controller import (
    Webhook,
    admission_response,
    frontend_claims,
    load_or_generate,
    mutate,
    serve,
    service_dns_names,
    validate,
)
from balancing.model import objects, policies

API = "balancing.elf.io/v1beta1"


def port(number: str, protocol: str, name: str) -> dict[str, Any]:
    return {"port": number, "protocol": protocol, "name": name}


def lrp_doc(name: str = "node-local-dns", created: str = "2026-01-01T00:00:00Z") -> dict[str, Any]:
    return {
        "apiVersion": API,
        "kind": "LocalRedirectPolicy",
        "metadata": {"name": name, "creationTimestamp": created},
        "spec": {
            "frontend": {"serviceMatcher": {"serviceName": "kube-dns", "namespace": "kube-system"}},
            "backend": {
                "endpointSelector": {"matchLabels": {"k8s-app": "node-local-dns"}},
                "toPorts": [port("53", "UDP", "dns"), port("53", "TCP", "dns-tcp")],
            },
        },
    }


def bp_doc(
    name: str = "vip", ip: str = "169.254.0.90", created: str = "2026-01-01T00:00:00Z"
) -> dict[str, Any]:
    return {
        "apiVersion": API,
        "kind": "BalancingPolicy",
        "metadata": {"name": name, "creationTimestamp": created},
        "spec": {
            "frontend": {"addressMatcher": {"ip": ip, "toPorts": [port("80", "TCP", "http")]}},
            "backend": {"serviceEndpoint": {"endpointSelector": {"matchLabels": {"app": "web"}},
                                            "toPorts": [port("8080", "TCP", "http")]}},
        },
    }  # fmt: skip


def parsed(doc: dict[str, Any]) -> policies.Policy:
    obj = objects.parse_object(doc)
    assert isinstance(obj, policies.LocalRedirectPolicy | policies.BalancingPolicy)
    return obj


def request(operation: str, obj: dict[str, Any] | None, old: dict[str, Any] | None = None) -> dict[str, Any]:
    kind = (obj or old or {}).get("kind", "")
    return {
        "uid": "705ab4f5-6393-11e8-b7cc-42010a800002",
        "kind": {"group": "balancing.elf.io", "version": "v1beta1", "kind": kind},
        "operation": operation,
        "name": (obj or old or {}).get("metadata", {}).get("name", ""),
        "object": obj,
        "oldObject": old,
    }


def review(operation: str, obj: dict[str, Any] | None, old: dict[str, Any] | None = None) -> bytes:
    body = {
        "apiVersion": "admission.k8s.io/v1",
        "kind": "AdmissionReview",
        "request": request(operation, obj, old),
    }
    return json.dumps(body).encode()


def call(webhook: Webhook, path: str, body: bytes) -> dict[str, Any]:
    code, ctype, payload = webhook.handle("POST", path, body)
    assert code == 200 and ctype == "application/json"
    answer: dict[str, Any] = json.loads(payload)
    assert answer["apiVersion"] == "admission.k8s.io/v1" and answer["kind"] == "AdmissionReview"
    assert answer["response"]["uid"] == "705ab4f5-6393-11e8-b7cc-42010a800002"
    return answer


def no_policies() -> list[policies.Policy]:
    return []


# --- validation --------------------------------------------------------------------------------------


@pytest.mark.parametrize("doc", [lrp_doc(), bp_doc()], ids=["lrp", "bp"])
def test_valid_create_allowed(doc: dict[str, Any]) -> None:
    answer = call(Webhook(no_policies), "/validate", review("CREATE", doc))
    assert answer["response"]["allowed"] is True
    assert "status" not in answer["response"] and "patch" not in answer["response"]


def test_invalid_create_denied_with_the_model_message() -> None:
    doc = bp_doc()
    doc["spec"]["frontend"]["addressMatcher"]["toPorts"][0]["port"] = "70000"
    doc["spec"]["backend"]["serviceEndpoint"]["redirectMode"] = "teleport"
    response = call(Webhook(no_policies), "/validate", review("CREATE", doc))["response"]
    assert response["allowed"] is False
    assert response["status"]["code"] == 403
    message = response["status"]["message"]
    assert "spec.frontend.addressMatcher.toPorts[0].port: port must be 1-65535" in message
    assert "spec.backend.serviceEndpoint.redirectMode:" in message


def test_missing_field_and_exactly_one_rule() -> None:
    doc = lrp_doc()
    del doc["spec"]["backend"]["endpointSelector"]
    doc["spec"]["frontend"]["addressMatcher"] = {"ip": "10.0.0.1", "toPorts": [port("53", "UDP", "dns")]}
    allowed, message = validate(request("CREATE", doc), no_policies)
    assert not allowed
    assert "spec.backend.endpointSelector: Field required" in message
    assert "spec.frontend: exactly one of serviceMatcher or addressMatcher" in message


def test_update_validated() -> None:
    old = lrp_doc()
    new = copy.deepcopy(old)
    new["spec"]["backend"]["toPorts"][1]["name"] = "dns"
    allowed, message = validate(request("UPDATE", new, old), lambda: [parsed(old)])
    assert not allowed
    assert message == "spec.backend.toPorts: port name 'dns' is used more than once"
    ok = copy.deepcopy(old)
    ok["spec"]["config"] = {"qosLimit": 100}
    assert validate(request("UPDATE", ok, old), lambda: [parsed(old)]) == (True, "")


def test_unknown_kind_denied() -> None:
    doc = lrp_doc()
    doc["apiVersion"] = "balancing.elf.io/v2"
    allowed, message = validate(request("CREATE", doc), no_policies)
    assert not allowed and "is not read by balancing" in message


def test_update_of_a_policy_being_deleted_is_allowed_even_if_invalid_or_conflicting() -> None:
    """Removing a finalizer from a policy on its way out must never be refused (Kubernetes < 1.28 has no
    matchConditions to skip such requests before they reach the webhook)."""
    older = parsed(lrp_doc("older", "2020-01-01T00:00:00Z"))
    leaving = lrp_doc("newer")
    leaving["metadata"]["deletionTimestamp"] = "2026-02-01T00:00:00Z"
    assert validate(request("UPDATE", leaving), lambda: [older]) == (True, "")
    broken = {
        "kind": "LocalRedirectPolicy",
        "metadata": {"name": "x", "deletionTimestamp": "2026-02-01T00:00:00Z"},
    }
    assert validate(request("UPDATE", broken), no_policies) == (True, "")
    assert not validate(request("UPDATE", lrp_doc("newer")), lambda: [older])[0], "not leaving: conflict"


@pytest.mark.parametrize("doc", [lrp_doc(), {"kind": "BalancingPolicy", "spec": "garbage"}, None])
def test_delete_always_allowed(doc: dict[str, Any] | None) -> None:
    older = parsed(lrp_doc("older", "2020-01-01T00:00:00Z"))
    answer = call(Webhook(lambda: [older]), "/validate", review("DELETE", None, doc))
    assert answer["response"]["allowed"] is True
    assert call(Webhook(no_policies), "/mutate", review("DELETE", None, doc))["response"] == {
        "uid": "705ab4f5-6393-11e8-b7cc-42010a800002",
        "allowed": True,
    }


# --- conflicts ---------------------------------------------------------------------------------------


def test_conflict_with_older_policy_denied() -> None:
    older = parsed(lrp_doc("older", "2025-06-01T00:00:00Z"))
    new = lrp_doc("newer")
    new["metadata"].pop("creationTimestamp")  # a CREATE: not set yet, the newest of all
    allowed, message = validate(request("CREATE", new), lambda: [older])
    assert not allowed
    assert "Service kube-system/kube-dns" in message and "older LocalRedirectPolicy older" in message


def test_create_in_the_same_second_loses_even_with_a_smaller_name() -> None:
    """The real API server stamps creationTimestamp (whole seconds) before admission: a newcomer created
    in the same second as an existing policy must not win by name and take that one's frontend."""
    existing = parsed(lrp_doc("zz-existing", "2026-06-01T00:00:00Z"))
    allowed, message = validate(
        request("CREATE", lrp_doc("aa-new", "2026-06-01T00:00:00Z")), lambda: [existing]
    )
    assert not allowed
    assert "older LocalRedirectPolicy zz-existing" in message


def test_conflict_with_newer_policy_allowed() -> None:
    newer = parsed(lrp_doc("newer", "2026-06-01T00:00:00Z"))
    doc = lrp_doc("existing-older", "2026-01-01T00:00:00Z")
    assert validate(request("UPDATE", doc, doc), lambda: [newer, parsed(doc)]) == (True, "")


def test_other_kind_or_other_frontend_no_conflict() -> None:
    older_bp = parsed(bp_doc("old-vip", created="2020-01-01T00:00:00Z"))
    assert validate(request("CREATE", bp_doc("vip2", ip="169.254.0.91", created="")), lambda: [older_bp])[0]
    lrp = lrp_doc("lrp")
    lrp["spec"]["frontend"] = {
        "addressMatcher": {"ip": "169.254.0.90", "toPorts": [port("80", "TCP", "http")]}
    }
    lrp["spec"]["backend"]["toPorts"] = [port("8080", "TCP", "http")]
    assert validate(request("CREATE", lrp), lambda: [older_bp]) == (True, "")


def test_update_creating_conflict_denied() -> None:
    older = parsed(bp_doc("old-vip", ip="169.254.0.90", created="2025-01-01T00:00:00Z"))
    old = bp_doc("vip2", ip="169.254.0.91", created="2026-01-01T00:00:00Z")
    existing = [older, parsed(old)]
    assert validate(request("UPDATE", old, old), lambda: existing) == (True, "")
    moved = copy.deepcopy(old)
    moved["spec"]["frontend"]["addressMatcher"]["ip"] = "169.254.0.90"
    allowed, message = validate(request("UPDATE", moved, old), lambda: existing)
    assert not allowed
    assert (
        "frontend address 169.254.0.90 80/TCP is already claimed by the older BalancingPolicy old-vip"
        in message
    )


def test_service_without_ports_overlaps_every_port() -> None:
    older = lrp_doc("older", "2025-01-01T00:00:00Z")
    older["spec"]["frontend"]["serviceMatcher"]["toPorts"] = [port("53", "UDP", "dns")]
    older["spec"]["backend"]["toPorts"] = [port("53", "UDP", "dns")]
    allowed, message = validate(request("CREATE", lrp_doc("all-ports", "")), lambda: [parsed(older)])
    assert not allowed and "Service kube-system/kube-dns 53/UDP" in message


def test_disabled_policies_claim_nothing() -> None:
    older = lrp_doc("older", "2025-01-01T00:00:00Z")
    older["spec"]["enabled"] = False
    assert frontend_claims(parsed(older)) == set()
    assert validate(request("CREATE", lrp_doc("new", "")), lambda: [parsed(older)]) == (True, "")


# --- mutation ----------------------------------------------------------------------------------------


def patch_of(answer: dict[str, Any]) -> list[dict[str, Any]]:
    response = answer["response"]
    assert response["allowed"] is True and response["patchType"] == "JSONPatch"
    result: list[dict[str, Any]] = json.loads(base64.b64decode(response["patch"]))
    return result


def test_mutate_adds_lrp_defaults() -> None:
    patch = patch_of(call(Webhook(no_policies), "/mutate", review("CREATE", lrp_doc())))
    assert patch == [
        {"op": "add", "path": "/spec/enabled", "value": True},
        {"op": "add", "path": "/spec/config", "value": {"enableOutCluster": True}},
        {"op": "add", "path": "/spec/skipRedirectFromBackend", "value": False},
    ]


def test_mutate_adds_bp_defaults_into_existing_config() -> None:
    doc = bp_doc()
    doc["spec"]["enabled"] = False
    doc["spec"]["config"] = {"nodeLabelSelector": {"matchLabels": {"a": "b"}}}
    patch = patch_of(call(Webhook(no_policies), "/mutate", review("UPDATE", doc, bp_doc())))
    assert patch == [
        {"op": "add", "path": "/spec/config/enableOutCluster", "value": True},
        {"op": "add", "path": "/spec/backend/serviceEndpoint/redirectMode", "value": "podEndpoint"},
    ]


def test_mutate_nothing_to_add() -> None:
    doc = lrp_doc()
    doc["spec"].update(enabled=True, skipRedirectFromBackend=True, config={"enableOutCluster": False})
    assert mutate(request("CREATE", doc)) == []
    answer = call(Webhook(no_policies), "/mutate", review("CREATE", doc))
    assert answer["response"] == {"uid": "705ab4f5-6393-11e8-b7cc-42010a800002", "allowed": True}


def test_admission_response_shape() -> None:
    answer = admission_response({"uid": "u"}, False, "no")
    assert answer["response"] == {
        "uid": "u",
        "allowed": False,
        "status": {"code": 403, "reason": "Forbidden", "message": "no"},
    }


# --- HTTP routes and metrics -------------------------------------------------------------------------


def test_routes_and_metrics() -> None:
    ready = [False]
    webhook = Webhook(no_policies, ready=lambda: ready[0])
    assert webhook.handle("GET", "/healthz", b"")[0] == 200
    assert webhook.handle("GET", "/readyz", b"")[0] == 503
    ready[0] = True
    assert webhook.handle("GET", "/readyz", b"")[0] == 200
    assert webhook.handle("GET", "/nope", b"")[0] == 404
    assert webhook.handle("GET", "/validate", b"")[0] == 405
    assert webhook.handle("POST", "/validate", b"{not json")[0] == 400
    assert webhook.handle("POST", "/validate", b"{}")[0] == 400
    call(webhook, "/validate", review("CREATE", lrp_doc()))
    bad = lrp_doc()
    del bad["spec"]["backend"]
    call(webhook, "/validate", review("CREATE", bad))
    call(webhook, "/validate", review("DELETE", None, lrp_doc()))
    code, ctype, text = webhook.handle("GET", "/metrics", b"")
    assert code == 200 and ctype.startswith("text/plain")
    metrics = text.decode()
    for allowed, operation in (("true", "CREATE"), ("false", "CREATE"), ("true", "DELETE")):
        line = (
            "balancing_controller_admission_decisions_total{"
            f'allowed="{allowed}",kind="LocalRedirectPolicy",operation="{operation}",webhook="validate"}} 1.0'
        )
        assert line in metrics, metrics
    assert "python_gc" not in metrics  # its own registry, not the process default


# --- TLS ---------------------------------------------------------------------------------------------


async def _post(
    port_number: int, client: ssl.SSLContext, hostname: str, path: str, body: bytes
) -> tuple[int, bytes]:
    reader, writer = await asyncio.open_connection(
        "127.0.0.1", port_number, ssl=client, server_hostname=hostname
    )
    writer.write(
        f"POST {path} HTTP/1.1\r\nHost: {hostname}\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\n\r\n".encode()
        + body
    )
    await writer.drain()
    raw = await asyncio.wait_for(reader.read(), 5)
    writer.close()
    head, _, payload = raw.partition(b"\r\n\r\n")
    return int(head.split()[1]), payload


def test_https_with_generated_ca(tmp_path: Path) -> None:
    names = service_dns_names("balancing-controller", "kube-system")
    assert "balancing-controller.kube-system.svc" in names
    bundle = tmp_path / "out/ca-bundle.crt"
    context = load_or_generate(None, None, dns_names=names, cert_dir=tmp_path / "certs", ca_bundle=bundle)
    assert bundle.read_bytes().startswith(b"-----BEGIN CERTIFICATE-----")
    assert (tmp_path / "certs/tls.key").stat().st_mode & 0o077 == 0
    older = parsed(lrp_doc("older", "2020-01-01T00:00:00Z"))

    async def go() -> None:
        server = await serve(Webhook(lambda: [older]), "127.0.0.1", 0, context)
        port_number = server.sockets[0].getsockname()[1]
        client = ssl.create_default_context(cafile=str(bundle))
        try:
            code, payload = await _post(
                port_number, client, "balancing-controller.kube-system.svc", "/validate",
                review("CREATE", lrp_doc("newer", "")),
            )  # fmt: skip
            assert code == 200
            response = json.loads(payload)["response"]
            assert (
                response["allowed"] is False
                and "older LocalRedirectPolicy older" in response["status"]["message"]
            )
            code, payload = await _post(
                port_number, client, "balancing-controller", "/mutate", review("CREATE", bp_doc())
            )
            assert code == 200 and json.loads(payload)["response"]["patchType"] == "JSONPatch"
            # the name the certificate does not carry fails verification
            with pytest.raises(ssl.SSLCertVerificationError):
                await _post(port_number, client, "elsewhere.example", "/validate", b"{}")
            # a client trusting only the system roots refuses the self-signed chain
            with pytest.raises(ssl.SSLCertVerificationError):
                await _post(
                    port_number, ssl.create_default_context(), "balancing-controller", "/validate", b"{}"
                )
        finally:
            server.close()
            await server.wait_closed()

    asyncio.run(go())


def test_provided_cert_and_key(tmp_path: Path) -> None:
    load_or_generate(None, None, dns_names=["webhook.local"], cert_dir=tmp_path / "gen")
    bundle = tmp_path / "bundle.crt"
    context = load_or_generate(
        tmp_path / "gen/tls.crt",
        tmp_path / "gen/tls.key",
        dns_names=[],
        cert_dir=tmp_path / "unused",
        ca_bundle=bundle,
    )
    assert isinstance(context, ssl.SSLContext)
    assert bundle.read_bytes() == (tmp_path / "gen/tls.crt").read_bytes()
    assert not (tmp_path / "unused").exists()
    with pytest.raises(ValueError, match="both"):
        load_or_generate(tmp_path / "gen/tls.crt", None, dns_names=["x"], cert_dir=tmp_path)


@pytest.mark.asyncio
async def test_existing_policies_come_from_the_api_server() -> None:
    """The conflict check follows the API server: not ready before the first list; an existing older policy
    there makes a conflicting CREATE be denied."""
    import asyncio
    import contextlib

    from balancing.controller.policyindex import PolicyIndex
    from balancing.sources.kube import KubeSource, Timing
    from balancing_testkit.fakeapi import FakeApi, serving

    fake = FakeApi()
    older = lrp_doc("older", "2025-06-01T00:00:00Z")
    fake.put(f"/apis/{API}/localredirectpolicies", older)
    fake.put(f"/apis/{API}/balancingpolicies", bp_doc())  # selects pods: the agent's source would watch them
    index = PolicyIndex()
    webhook = Webhook(index.existing, ready=index.ready)
    assert webhook.handle("GET", "/readyz", b"")[0] == 503
    timing = Timing(resync=3600, watch_timeout=60, read_slack=5, backoff_base=0.02, backoff_cap=0.1)
    async with serving(fake) as (_, url):
        follow = asyncio.create_task(index.follow(KubeSource("", api_base_url=url, timing=timing)))
        try:
            for _ in range(200):
                if index.ready():
                    break
                await asyncio.sleep(0.01)
            assert sorted(p.metadata.name for p in index.existing()) == ["older", "vip"]
            assert webhook.handle("GET", "/readyz", b"")[0] == 200
            new = lrp_doc("newer")
            new["metadata"].pop("creationTimestamp")
            answer = call(webhook, "/validate", review("CREATE", new))
            assert answer["response"]["allowed"] is False
            assert "older LocalRedirectPolicy older" in answer["response"]["status"]["message"]
            pods = [path for path, _ in fake.requests if "pods" in path]
            assert not pods, "the controller may not read pods"
        finally:
            follow.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await follow


# --- bounds: malformed, deep and huge input ------------------------------------------------------------


def denial(answer: dict[str, Any]) -> str:
    response = answer["response"]
    assert response["allowed"] is False, response
    message = response["status"]["message"]
    assert isinstance(message, str)
    return message


@pytest.mark.parametrize(
    "metadata",
    [[], "vip", 7, {"name": 5}, {"name": {"x": 1}}, {"name": ["vip"]}, {"name": "vip", "labels": []}],
)
@pytest.mark.parametrize("operation", ["CREATE", "UPDATE"])
def test_malformed_metadata_is_denied_not_allowed(metadata: Any, operation: str) -> None:
    doc = bp_doc()
    doc["metadata"] = metadata
    webhook = Webhook(lambda: [parsed(bp_doc("older", created="2020-01-01T00:00:00Z"))])
    body = {"request": {**request(operation, bp_doc(), bp_doc()), "object": doc}}
    assert "metadata" in denial(call(webhook, "/validate", json.dumps(body).encode()))


def test_deep_json_is_a_400_not_a_recursion_error() -> None:
    webhook = Webhook(no_policies)
    deep = (
        b'{"request": {"uid": "u", "operation": "CREATE", "object": ' + b"[" * 10_000 + b"]" * 10_000 + b"}}"
    )
    code, _, body = webhook.handle("POST", "/validate", deep)
    assert code == 400 and b"nested deeper than 64 levels" in body
    code, _, body = webhook.handle("POST", "/validate", b"[" * 100_000)
    assert code == 400


def test_a_huge_invalid_policy_is_denied_quickly_with_a_bounded_message() -> None:
    """Many invalid addresses: denied before the model runs (its cost is per value), in a few KiB."""
    import time

    webhook = Webhook(no_policies)
    doc = bp_doc()
    doc["spec"]["backend"] = {"addressEndpoint": {"addresses": [f"bad-{i}" for i in range(250_000)],
                                                  "toPorts": [port("8080", "TCP", "http")]}}  # fmt: skip
    body = review("CREATE", doc)
    assert len(body) > 3_000_000
    started = time.monotonic()
    code, _, raw = webhook.handle("POST", "/validate", body)
    assert code == 200 and len(raw) < 5000 and time.monotonic() - started < 2.0
    assert "too large to check" in denial(json.loads(raw))


def test_many_problems_are_summed_up_in_a_bounded_message() -> None:
    from balancing.controller import admission

    webhook = Webhook(no_policies)
    doc = bp_doc()
    doc["spec"]["backend"] = {"addressEndpoint": {"addresses": [f"bad-{i}-" + "x" * 500 for i in range(500)],
                                                  "toPorts": [port("8080", "TCP", "http")]}}  # fmt: skip
    message = denial(call(webhook, "/validate", review("CREATE", doc)))
    assert message.endswith("; and 480 more") and len(message) <= admission.MAX_MESSAGE_CHARS
    assert message.startswith("spec.backend.addressEndpoint.addresses[0]: ")
    few = admission.message(["a: 1", "b: 2"])
    assert few == "a: 1; b: 2"
    long = admission.message(["x" * 10_000])
    assert len(long) == admission.MAX_MESSAGE_CHARS and long.endswith("…")


def test_metric_labels_take_only_known_kinds_and_operations() -> None:
    webhook = Webhook(no_policies)
    for i in range(50):
        hostile = {**request("CREATE", None), "operation": f"OP{i}", "kind": {"kind": f"Kind{i}"}}
        call(webhook, "/validate", json.dumps({"request": hostile}).encode())
    metrics = webhook.handle("GET", "/metrics", b"")[2].decode()
    lines = [
        line
        for line in metrics.splitlines()
        if line.startswith("balancing_controller_admission_decisions_total")
    ]
    assert lines == [
        'balancing_controller_admission_decisions_total{allowed="true",kind="other",operation="other",'
        'webhook="validate"} 50.0'
    ]


@pytest.mark.parametrize("uid", [7, None, ["u"], "u" * 129])
def test_a_review_whose_uid_is_not_a_short_string_is_a_400(uid: Any) -> None:
    body = json.dumps({"request": {"uid": uid, "operation": "CREATE", "object": bp_doc()}}).encode()
    assert Webhook(no_policies).handle("POST", "/validate", body)[0] == 400
