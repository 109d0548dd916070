"""The datapath: BPF programs in the kernel and the Python that loads, programs and reads them.

Modules: ``abi`` mirrors bpf/balancing.h (the only module that knows byte layouts); ``libbpf`` binds the
system ``libbpf.so.1`` through ctypes; ``mounts`` finds and prepares bpffs and the cgroup2 hierarchy;
``loader`` opens, pins, reuses and attaches; ``maps`` is the map I/O seam (kernel maps and an in-memory fake);
``writer`` diffs the desired state against what is programmed and applies it make-before-break; ``programmed``
reads what the maps hold back into model terms; ``owners`` follows the writer's frontend ids to their owners
(for metrics and events); ``replay`` replays the datapath's decision for one connect, read-only; ``settings``
writes the run-time settings map (event mode, wakeup threshold, the host's netns); ``ringbuf`` reads the
events ring buffer and its lost counter; ``percpu`` sums per-CPU counters and counts map entries in bulk;
``netns`` enters network namespaces and reads their cookies; ``podcgroups`` finds the cgroups of this node's
pods; ``sockterm`` destroys connected UDP sockets whose backend left; ``sockmigrate`` moves connected sockets'
reverse state out of 0.3's cookie-keyed map on the upgrade (run by ``loader``); ``bpfobjects`` finds the
compiled BPF objects (the installed package's, else a checkout's build/bpf). North-south (TC on the node's
devices): ``northsouth`` loads ``nodeport.o`` against the datapath's pins, writes its settings and devices and
attaches it through ``tcattach`` (tcx links, else clsact filters); ``maglev`` builds the Maglev tables of the
frontends it serves (the same on every node), which the writer swaps in; ``conntrack`` expires its connection
tracking; ``replay_ns`` replays its decision for one packet from an outside client, read-only.
May import ``balancing.model.desired`` (the DesiredState contract) and ``balancing.errors``; never YAML or
Kubernetes.
"""
