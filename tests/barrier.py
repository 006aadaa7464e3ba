"""A start line for processes that must race: each one signs in, then all are let go at once.

Replaces "start at wall-clock time T", which fails whenever an interpreter takes longer than
expected to start on a loaded machine. Files are the signal, so any process can take part.
"""

from __future__ import annotations

import os
from pathlib import Path

from tests.waits import wait_until

GO = "go"
LIMIT_S = 300.0  # interpreters importing torch on a loaded machine


def arrive_and_wait(barrier: Path) -> None:
    """In a racer: sign in, then block until the starter lets everyone go."""
    (barrier / f"ready-{os.getpid()}").touch()
    wait_until((barrier / GO).exists, "the starter's go", LIMIT_S, interval=0.005)


def release_when_ready(barrier: Path, racers: int) -> None:
    """In the starter: wait until `racers` processes have signed in, then let them all go."""
    wait_until(lambda: len(list(barrier.glob("ready-*"))) >= racers, f"{racers} racers", LIMIT_S,
               interval=0.005)
    (barrier / GO).touch()

