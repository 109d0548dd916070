"""The ``balancing`` command: ``agent``, ``inspect``, ``cleanup``. Wiring and presentation only."""
