"""The job runner's settings and the state its parts share (the store's queue, the job this
trainer runs, the worker loop it wakes)."""

from __future__ import annotations

import asyncio
import os
import socket
import sys
import threading
from dataclasses import dataclass, field
from pathlib import Path

from convserve.contracts.gate_policy import GateBounds, GatePolicy
from convserve.contracts.spec import CompileChoice
from convserve.contracts.store import ModelStore
from convserve.jobs.queue import JobQueue


@dataclass(frozen=True)
class RunnerConfig:
    datasets_root: Path
    python: str = sys.executable
    max_queue: int = 8
    max_epochs: int = 200
    gate_defaults: GatePolicy = field(default_factory=GatePolicy)
    gate_bounds: GateBounds = field(default_factory=GateBounds)
    replica_id: str = field(default_factory=lambda: f"{socket.gethostname()}:{os.getpid()}")
    heartbeat_s: float = 2.0
    stale_after_s: float = 20.0
    child_env: dict[str, str] | None = None   # extra environment for the child
    cancel_grace_s: float = 5.0               # SIGTERM, then SIGKILL after this long
    compile: CompileChoice = "auto"           # torch.compile in the child (spec.json)
    progress_interval_s: float = 1.0          # the child's progress events (spec.json)
    processes: int = 1                        # > 1: data-parallel under torchrun (one per GPU)
    max_attempts: int = 3                     # runs of a job whose trainer dies, then FAILED
    poll_s: float = 0.5                       # an idle trainer looks at the queue this often


class RunnerState:
    """What every part of the runner reads: the store, the settings, the queue and the loop."""

    def __init__(self, store: ModelStore, config: RunnerConfig) -> None:
        self._store = store
        self._config = config
        self._queue = JobQueue(store.queue_dir)
        # Guards the running job's id (RPC threads cancel while the loop runs the job).
        self._lock = threading.RLock()
        self._current: str | None = None     # claimed by this trainer, not yet final
        self._loop: asyncio.AbstractEventLoop | None = None
        self._loop_thread: int | None = None
        self._wake: asyncio.Event | None = None
        # The running job's latest "progress" images/s (0 when none runs): a metrics gauge.
        self.training_images_per_s = 0.0

