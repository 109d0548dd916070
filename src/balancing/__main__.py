"""``python -m balancing``: the same entry point as the ``balancing`` command."""

from balancing.cli.main import app

app()
