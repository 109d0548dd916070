"""The model: typed Kubernetes objects in, one node's desired frontends and backends out.

Pure functions and plain data only. May import the standard library and pydantic; never the kernel, files,
clocks or other stages. ``meta`` holds the base of every typed object, ``objects`` the input types (and the
``KINDS`` the sources read), ``fastparse`` the same objects validated without Python calls per nested object
(the sources' fast lane), ``policies`` the LocalRedirectPolicy and BalancingPolicy types with their
validation, ``status`` their status subresource as read back, ``fielderrors`` validation errors as messages
per field path, ``selectors`` label selectors, ``desired`` the output contract read by the datapath,
``config`` the model's settings (node name, NodePort CIDRs, externalIP and out-of-cluster modes),
``endpoints`` the endpoint selection rules, ``frontends`` one Service's frontends, ``policy_frontends`` one
policy's frontends on this node, ``layering`` the precedence of policies over Services, ``healthcheck`` the
healthCheckNodePort counts, ``store`` the indexed set of objects that recomputes only what a change touches.
"""
