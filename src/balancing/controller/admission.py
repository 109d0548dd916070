"""Admission decisions for the policy kinds: pure functions of an AdmissionReview's ``request``.

``validate`` answers ``(allowed, message)``; ``mutate`` the JSONPatch of the defaults to add;
``admission_response`` wraps either in an AdmissionReview v1 response. Nothing here does I/O.

Malformed input is denied, never an exception (an exception is a bug, and the server allows on a bug):
``metadata`` must be an object. Cost and answer are bounded: an object with more than ``MAX_VALUES`` JSON
values in its ``spec`` and ``metadata`` (the model's cost is per value, about 50 µs for an invalid one) is
denied before the model reads it, and a denial names at most ``MAX_MESSAGES`` problems ("and N more") in at
most ``MAX_MESSAGE_CHARS`` characters.
"""

from __future__ import annotations

import base64
import json
from collections.abc import Callable, Iterable
from datetime import UTC, datetime
from typing import Any

from pydantic import ValidationError

from balancing.model import objects, policies
from balancing.model.fielderrors import field_errors

__all__ = [
    "MAX_MESSAGES",
    "MAX_MESSAGE_CHARS",
    "MAX_VALUES",
    "POLICY_KINDS",
    "Claim",
    "admission_response",
    "conflicts",
    "frontend_claims",
    "message",
    "mutate",
    "validate",
    "validation_messages",
]

POLICY_KINDS = (policies.LOCAL_REDIRECT_POLICY, policies.BALANCING_POLICY)
Existing = Callable[[], Iterable[policies.Policy]]

# A frontend a policy claims: ("service", namespace, name, port, protocol) with port 0 / protocol "*" for
# every port of the Service, or ("address", ip, port, protocol).
Claim = tuple[str, ...]

MAX_VALUES = 10_000  # in spec and metadata; a policy the CRD's limits allow has about 5000 at most
MAX_MESSAGES = 20
MAX_MESSAGE_CHARS = 4096


def validation_messages(doc: dict[str, Any], exc: ValidationError) -> list[str]:
    """``field.path: message`` per field, as the agent reports them (a union's alternatives joined)."""
    return [f"{field or '(object)'}: {'; '.join(m)}" for field, m in field_errors(doc, exc).items()]


def parse_policy(doc: Any) -> tuple[policies.Policy | None, list[str]]:
    """The policy in ``doc``, or the reasons it is not a valid one."""
    if not isinstance(doc, dict):
        return None, ["the object is not a JSON object"]
    try:
        obj = objects.parse_object(doc)
    except objects.UnknownKind as exc:
        return None, [str(exc)]
    except ValidationError as exc:
        return None, validation_messages(doc, exc)
    if not isinstance(obj, policies.LocalRedirectPolicy | policies.BalancingPolicy):
        return None, [f"kind {obj.kind!r} is not a policy kind"]
    return obj, []


def frontend_claims(policy: policies.Policy) -> set[Claim]:
    """The frontends the policy claims (empty when ``spec.enabled`` is false: it claims nothing)."""
    if not policy.spec.enabled:
        return set()
    frontend = policy.spec.frontend
    if frontend.address_matcher is not None:
        ip = str(frontend.address_matcher.ip)
        return {("address", ip, str(p.port), p.protocol.name) for p in frontend.address_matcher.to_ports}
    matcher = frontend.service_matcher
    assert matcher is not None
    where = ("service", matcher.namespace, matcher.service_name)
    if not matcher.to_ports:
        return {(*where, "0", "*")}
    return {(*where, str(p.port), p.protocol.name) for p in matcher.to_ports}


def _overlap(a: set[Claim], b: set[Claim]) -> list[Claim]:
    found: set[Claim] = set(a & b)
    for x in a:
        for y in b:
            if x[0] == y[0] == "service" and x[1:3] == y[1:3] and "*" in (x[4], y[4]):
                found.add(x if x[4] != "*" else y)
    return sorted(found)


def describe_claim(claim: Claim) -> str:
    if claim[0] == "service":
        ports = "all ports" if claim[4] == "*" else f"{claim[3]}/{claim[4]}"
        return f"Service {claim[1]}/{claim[2]} {ports}"
    ip = f"[{claim[1]}]" if ":" in claim[1] else claim[1]
    return f"address {ip} {claim[2]}/{claim[3]}"


def _now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _age(policy: policies.Policy, *, new: bool) -> tuple[str, str]:
    """Precedence as the model ranks it (creationTimestamp, then name); a new policy without a timestamp
    (the API server sets it before admission, other callers may not) is as young as now."""
    created = policy.metadata.creation_timestamp or (_now() if new else "")
    return created, policy.metadata.name


def conflicts(
    policy: policies.Policy, existing: Iterable[policies.Policy], *, creating: bool = False
) -> list[str]:
    """Why ``policy`` loses a frontend to an older existing policy of its kind (empty: it loses none).

    ``creating``: ``policy`` does not exist yet, so every existing policy is older, whatever the timestamps
    say. The API server stamps creationTimestamp in whole seconds before admission, so a policy created in
    the same second as an existing one would otherwise win by name and take that one's frontend."""
    claims = frontend_claims(policy)
    if not claims:
        return []
    age = ("", "") if creating else _age(policy, new=True)
    found: list[str] = []
    for other in sorted(existing, key=lambda p: _age(p, new=False)):
        if other.kind != policy.kind or other.metadata.name == policy.metadata.name:
            continue
        other_age = _age(other, new=False)
        if not creating and other_age >= age:
            continue  # newer: this policy wins there, the other one is told so in its status
        for claim in _overlap(claims, frontend_claims(other)):
            created = other_age[0] or "no creationTimestamp"
            found.append(
                f"frontend {describe_claim(claim)} is already claimed by the older {other.kind} "
                f"{other.metadata.name} (created {created})"
            )
    return found


def validate(request: dict[str, Any], existing: Existing) -> tuple[bool, str]:
    """The validating webhook's decision on an AdmissionRequest: ``(allowed, message)``."""
    operation = request.get("operation", "")
    if operation not in ("CREATE", "UPDATE"):
        return True, ""  # DELETE (and CONNECT) are never refused
    doc = request.get("object")
    if isinstance(doc, dict):
        metadata = doc.get("metadata")
        if metadata is not None and not isinstance(metadata, dict):
            return False, "metadata: expected an object"
        if operation == "UPDATE" and metadata and metadata.get("deletionTimestamp"):
            return True, ""  # a policy on its way out (e.g. a finalizer being removed) is never held back
        too_large = _too_large(doc)
        if too_large:
            return False, too_large
    policy, problems = parse_policy(doc)
    if policy is None:
        return False, message(problems)
    found = conflicts(policy, existing(), creating=operation == "CREATE")
    if found:
        return False, message(found)
    return True, ""


def message(problems: list[str]) -> str:
    """The problems joined, at most ``MAX_MESSAGES`` of them ("; and N more") in at most
    ``MAX_MESSAGE_CHARS`` characters."""
    shown = problems[:MAX_MESSAGES]
    more = f"; and {len(problems) - len(shown)} more" if len(problems) > len(shown) else ""
    text = "; ".join(shown)
    room = MAX_MESSAGE_CHARS - len(more)
    if len(text) > room:
        text = text[: room - 1] + "…"
    return text + more


def _too_large(doc: dict[str, Any]) -> str:
    """Why the object is too large to check (``""``: it is not): over ``MAX_VALUES`` values in ``spec``
    and ``metadata`` (its ``managedFields`` aside), counted no further than that."""
    metadata = doc.get("metadata") or {}
    pending: list[Any] = [doc.get("spec"), {k: v for k, v in metadata.items() if k != "managedFields"}]
    count = 0
    while pending:
        value = pending.pop()
        inner = value.values() if isinstance(value, dict) else value if isinstance(value, list) else ()
        count += len(inner)
        if count > MAX_VALUES:
            return f"the object is too large to check: more than {MAX_VALUES} values in spec and metadata"
        pending.extend(inner)
    return ""


def _absent(parent: dict[str, Any], key: str) -> bool:
    return parent.get(key) is None  # null counts as absent (the API server prunes it)


def _escape(key: str) -> str:
    return key.replace("~", "~0").replace("/", "~1")


def mutate(request: dict[str, Any]) -> list[dict[str, Any]]:
    """The JSONPatch adding the defaults a CREATE or UPDATE leaves out (empty: nothing to add)."""
    doc = request.get("object")
    if request.get("operation") not in ("CREATE", "UPDATE") or not isinstance(doc, dict):
        return []
    kind = doc.get("kind")
    spec = doc.get("spec")
    if kind not in POLICY_KINDS or not isinstance(spec, dict):
        return []
    patch: list[dict[str, Any]] = []

    def add(path: list[str], value: Any) -> None:
        patch.append({"op": "add", "path": "/" + "/".join(_escape(p) for p in path), "value": value})

    if _absent(spec, "enabled"):
        add(["spec", "enabled"], True)
    config = spec.get("config")
    if config is None:
        add(["spec", "config"], {"enableOutCluster": True})
    elif isinstance(config, dict) and _absent(config, "enableOutCluster"):
        add(["spec", "config", "enableOutCluster"], True)
    if kind == policies.LOCAL_REDIRECT_POLICY and _absent(spec, "skipRedirectFromBackend"):
        add(["spec", "skipRedirectFromBackend"], False)
    backend = spec.get("backend")
    if kind == policies.BALANCING_POLICY and isinstance(backend, dict):
        endpoint = backend.get("serviceEndpoint")
        if isinstance(endpoint, dict) and _absent(endpoint, "redirectMode"):
            add(["spec", "backend", "serviceEndpoint", "redirectMode"], "podEndpoint")
    return patch


def admission_response(
    request: dict[str, Any], allowed: bool, message: str = "", patch: list[dict[str, Any]] | None = None
) -> dict[str, Any]:
    """An AdmissionReview v1 answering ``request``."""
    response: dict[str, Any] = {"uid": request.get("uid", ""), "allowed": allowed}
    if not allowed:
        # Forbidden, as the API server words a webhook's refusal itself (a reason Invalid without field
        # causes made clients classify a refused policy as a malformed request)
        response["status"] = {"code": 403, "reason": "Forbidden", "message": message}
    if patch:
        response["patchType"] = "JSONPatch"
        response["patch"] = base64.b64encode(json.dumps(patch).encode()).decode()
    return {"apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview", "response": response}
