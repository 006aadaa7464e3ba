"""The job runner's settings and the state its parts share (one replica's queue, its running job,
the worker loop it wakes)."""

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


class RunnerState:
    """What every part of the runner reads: the store, the settings, the queue and the loop."""

    def __init__(self, store: ModelStore, config: RunnerConfig) -> None:
        self._store = store
        self._config = config
        # Guards the in-memory queue, the running job's id, and this process's record writes
        # (RPC threads cancel/submit while the loop heartbeats and finishes jobs).
        self._lock = threading.RLock()
        self._queue: list[str] = []          # this replica's QUEUED jobs, FIFO
        self._current: str | None = None     # taken from the queue by the worker, not yet final
        self._loop: asyncio.AbstractEventLoop | None = None
        self._loop_thread: int | None = None
        self._wake: asyncio.Event | None = None
        self._last_queued_beat = 0.0
        # The running job's latest "progress" images/s (0 when none runs): a metrics gauge.
        self.training_images_per_s = 0.0

