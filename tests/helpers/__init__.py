"""Test harness for the kernel tests, the demo and the benchmarks (netns topology, backend and client)."""
