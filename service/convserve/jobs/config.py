"""The job runner's settings."""

from __future__ import annotations

import os
import socket
import sys
from dataclasses import dataclass, field
from pathlib import Path

from convserve.contracts.gate_policy import GateBounds, GatePolicy
from convserve.contracts.spec import CompileChoice


@dataclass(frozen=True)
class RunnerConfig:
    datasets_root: Path
    python: str = sys.executable
    jobs_url: str = ""                        # "" / "files": the model store's directory
    max_queue: int = 8
    max_epochs: int = 200
    gate_defaults: GatePolicy = field(default_factory=GatePolicy)
    gate_bounds: GateBounds = field(default_factory=GateBounds)
    replica_id: str = field(default_factory=lambda: f"{socket.gethostname()}:{os.getpid()}")
    heartbeat_s: float = 2.0
    stale_after_s: float = 20.0               # the lease: a claim lasts this long unrenewed
    child_env: dict[str, str] | None = None   # extra environment for the child
    cancel_grace_s: float = 5.0               # SIGTERM, then SIGKILL after this long
    compile: CompileChoice = "auto"           # torch.compile in the child (spec.json)
    progress_interval_s: float = 1.0          # the child's progress events (spec.json)
    processes: int = 1                        # > 1: data-parallel under torchrun (one per GPU)
    max_attempts: int = 3                     # runs of a job whose trainer dies, then FAILED
    poll_s: float = 0.5                       # an idle trainer looks at the queue this often
    # A trainer copies its child's new events into a job store that is not the events file
    # itself (PostgreSQL) this often, so watchers see progress within about this long.
    forward_s: float = 0.2
    max_backoff_s: float = 10.0               # a trainer retries an unreachable job store
