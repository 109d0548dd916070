"""The ``balancing`` command: wiring and presentation only (flags, output); the work happens in the stages.

Modules: ``main`` (the typer app and its subcommands), ``agent_cmd`` (``balancing agent``: the node agent's
flags) with ``configfile`` (its configuration file and environment, merged with the flags), ``status``
(``balancing status``: a running agent's ``/statusz``), ``controller_cmd`` (``balancing controller``: the
admission webhooks), ``inspect`` (what the maps hold) with ``inspect_data`` (its documents),
``inspect_render`` (its tables) and ``inspect_common`` (the pins, parsing and formatting shared with
``trace``), ``trace`` (replay the datapath's decision for one frontend) with ``inspect_trace`` (its human
output), ``monitor`` (the agent's resolution events, live), ``agentclient`` (the agent's ``GET /state`` for
the tools), ``flags`` (flag values shared by the commands, and how a bad one is reported), ``logs`` (log
level and text/JSON format of the commands that log), ``output`` (``-o json`` and ``-o yaml``).
May import every stage; the commands hold no business logic of their own.
"""
