"""The datapath: BPF programs in the kernel and the Python that loads and programs them.

``abi`` mirrors bpf/balancing.h (the only module that knows byte layouts); ``libbpf`` binds the system
``libbpf.so.1`` through ctypes; ``bpffs`` and ``cgroups`` find and prepare mount points; ``loader`` opens,
pins, reuses and attaches; ``maps`` is the map I/O seam (kernel maps and an in-memory fake); ``writer``
diffs the desired state against what is programmed and applies it make-before-break.
May import ``balancing.model.desired`` (the DesiredState contract) and ``balancing.errors``; never YAML or
Kubernetes.
"""
