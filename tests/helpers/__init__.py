"""What only the tests need; importable as ``helpers`` (pytest's ``pythonpath`` puts ``tests/`` on the path).

Modules:
    kernel_fixtures  the kernel tests' pytest plugin (skip logic, leftover sweep, fixtures), registered in
                     ``tests/conftest.py``
    support          the kernel tests' datapath loaded in-process, the agent as a process, manifest builders
    twonodes         the conformance suite's two-node cluster and its manifest builders
    nsagents         agents on the north-south topology (one per node namespace) and their manifests
    kubelet          the kubelet's cgroup layouts, as test parameters
    wheel            the project's wheel of the current sources, built once per source digest (test_wheel,
                     the arm64 guest)

The harness shared with bench/ and scripts/ (topology, backend, client, fakeapi) is ``balancing_testkit``
(``testkit/``); nothing outside ``tests/`` imports this package.
"""
