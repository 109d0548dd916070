"""The harness shared by the tests, the benchmarks and the demo; standard library only, no ``balancing``.

Modules:
    topology   a simulated cluster on one kernel: netns pods and clients, node cgroups, a bpffs dir (root)
    nstopology the north-south topology: an external client, a router, two routed nodes with pods
    backend    the backend process a pod runs (``Topology.start_backend``), by file path
    client     the client process (``Topology.run_client``), by file path
    fakeapi    a fake Kubernetes API server (list, watch, status patches) for the Kubernetes source

What only pytest needs (fixtures, the kernel tests' datapath and agent wrappers, manifest builders) stays in
``tests/helpers``; this package must not import ``pytest`` or anything under ``tests/``.
"""
