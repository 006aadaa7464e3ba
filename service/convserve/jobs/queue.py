"""The store's job queue: the jobs waiting for a trainer, shared by every replica.

One empty file per waiting job in the store's `queue/` folder, named `<queued-at>.<job id>` so
that sorted names are FIFO order (queued-at: UTC, microseconds; job ids cannot hold a dot). A
file is created by the replica that queues the job and removed by the trainer that claims it, or
by whoever cancels it; both under the job's lock (convserve.jobs.records), so the queue file is
a hint and job.json the truth: a file whose job is no longer QUEUED is stale and dropped.
Adding under the bound takes the queue's own lock, so racing replicas never overfill it.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path

from convserve.contracts.errors import LimitExceeded
from convserve.store.durable_files import locked, touch

LOCK_FILE = ".lock"


class JobQueue:
    def __init__(self, folder: Path) -> None:
        self.folder = folder

    def job_ids(self) -> list[str]:
        """Queued job ids, oldest first (each once, even if a crash left two files for it)."""
        seen: dict[str, None] = {}
        for name in sorted(os.listdir(self.folder)):
            _, dot, job_id = name.partition(".")
            if dot and job_id and not name.startswith("."):
                seen.setdefault(job_id)
        return list(seen)

    def positions(self) -> dict[str, int]:
        """job id -> place in the queue (1 = next)."""
        return {job_id: place for place, job_id in enumerate(self.job_ids(), 1)}

    @contextlib.contextmanager
    def bounded(self, limit: int) -> Iterator[None]:
        """Hold the queue's lock while a job is created and added; LimitExceeded when `limit`
        jobs already wait."""
        with locked(self.folder / LOCK_FILE):
            waiting = len(self.job_ids())
            if waiting >= limit:
                raise LimitExceeded(f"training queue is full ({waiting} jobs waiting); retry "
                                    "later")
            yield

    def add(self, job_id: str, queued_at: str) -> None:
        key = datetime.fromisoformat(queued_at).strftime("%Y%m%dT%H%M%S%f")
        touch(self.folder / f"{key}.{job_id}")

    def remove(self, job_id: str) -> None:
        for path in self.folder.glob(f"*.{job_id}"):
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
