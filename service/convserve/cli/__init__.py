"""The `convserve` command: local store commands (main), commands that talk to a server (remote),
the demo, and starting a server and waiting for it (launch)."""

from convserve.cli.main import main

__all__ = ["main"]
