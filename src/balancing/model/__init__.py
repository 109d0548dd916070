"""The model: typed Kubernetes objects in, one node's desired frontends and backends out.

Pure functions and plain data only. May import the standard library and pydantic; never the kernel, files,
clocks or other stages. ``objects`` holds the input types, ``desired`` the output contract read by the
datapath, ``config`` the model's settings (node name, NodePort CIDRs, externalIP and out-of-cluster modes),
``endpoints`` the endpoint selection rules, ``frontends`` one Service's frontends, ``healthcheck`` the
healthCheckNodePort counts, ``store`` the indexed set of objects that recomputes only what a change touches.
"""
