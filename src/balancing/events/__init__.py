"""Resolution events: ring buffer → attribution to pods → sinks (log, metrics) and the live stream.

Modules, in the order records flow: ``pipeline`` (reads the pinned ring buffer through
``datapath.ringbuf``, counts seen/lost/dropped, fans out), ``attribution`` (cgroup id → pod and container,
or the host), ``record`` (the JSON schema), ``sinks`` (JSON lines on stdout and a rotating file),
``stream`` (NDJSON on a unix socket for ``balancing monitor``).

May import ``balancing.model`` types, ``balancing.datapath.podcgroups``, the datapath ABI and ring buffer
reader, and ``balancing.datapath.owners`` (frontend id → owner, the agent's index); never writes maps (the
agent writes the events config through ``datapath.settings``).
"""
