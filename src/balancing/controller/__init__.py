"""The admission controller: validating (``/validate``) and mutating (``/mutate``) webhooks for the two
policy kinds, ``LocalRedirectPolicy`` and ``BalancingPolicy``, served over HTTPS by a small asyncio server
(with ``/healthz``, ``/readyz`` and ``/metrics`` on the same port).

- ``admission``: the decisions, pure functions of an AdmissionReview and the existing policies. CREATE and
  UPDATE are validated with the model (the messages are the model's: field path and message) and refused
  when the policy claims a frontend an *older* policy of the same kind already claims (the model lets the
  older one win, so the newer one would silently do nothing there). DELETE is always allowed. ``/mutate``
  only adds the defaults the model assumes (``enabled``, ``config.enableOutCluster``,
  ``skipRedirectFromBackend``, ``serviceEndpoint.redirectMode``) as a JSONPatch.
- ``tls``: a provided certificate and key, or a generated self-signed CA and a serving certificate for
  the Service's DNS names, the CA bundle written where the webhook configuration is rendered from.
- ``server``: the HTTPS server, ``serve``, and the admission decision counter (its own registry).
- ``policyindex``: the existing policies and the Nodes' names, followed from the API server (conflict
  check, status).
- ``status``: each policy's ``Ready`` condition, aggregated from the agents' ``status.nodes`` entries and
  the controller's own validation and conflict check, written by server-side apply (``sources.kubestatus``);
  the entries of departed nodes are removed.

**failurePolicy: Ignore.** With ``Fail``, a controller outage (a crash loop, a bad rollout, the one node it
runs on going away) would block every CREATE and UPDATE of a policy, which is exactly when an operator may
need to change policies to route around the trouble. The webhook is a convenience that refuses mistakes
early; it is not the last line of defence: every agent validates each policy with the same model, skips
the invalid ones and reports them (and the older-wins conflict rule) in the policy's status. So an invalid
policy admitted during an outage is visible and harmless, while a blocked change is not. The webhook
configuration's rules match only CREATE and UPDATE: a controller outage must never block a DELETE (the
handler allows DELETE anyway, should a configuration ask). ``timeoutSeconds`` should stay short (5 s).
"""

from balancing.controller.admission import (
    admission_response,
    frontend_claims,
    mutate,
    validate,
)
from balancing.controller.server import Webhook, serve
from balancing.controller.tls import (
    ServingCert,
    generate_serving_cert,
    load_or_generate,
    service_dns_names,
)

__all__ = [
    "ServingCert",
    "Webhook",
    "admission_response",
    "frontend_claims",
    "generate_serving_cert",
    "load_or_generate",
    "mutate",
    "serve",
    "service_dns_names",
    "validate",
]
