"""The model: typed Kubernetes objects in, one node's desired frontends and backends out.

Pure functions and plain data only. May import the standard library and pydantic; never the kernel, files,
clocks or other stages. ``objects`` holds the input types, ``desired`` the output contract read by the
datapath, ``endpoints`` the endpoint selection rules, ``frontends`` one Service's frontends, ``store`` the
indexed set of objects that recomputes only the services a change touches.
"""
