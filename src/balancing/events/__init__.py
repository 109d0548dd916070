"""Resolution events: ring buffer → attribution to pods → sinks (log, metrics). Filled in by the events work.

May import ``balancing.model`` types and the datapath ABI; never writes maps.
"""
