"""A trainer's worker loop: claim the oldest queued job, run it, repeat; one job at a time."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading

from convserve.contracts.errors import Unavailable
from convserve.contracts.job_state import JobState
from convserve.jobs.backend import JobStore
from convserve.jobs.child import ChildSupervisor, first_of
from convserve.jobs.config import RunnerConfig
from convserve.jobs.records import Attempt, JobRecord
from convserve.jobs.transitions import finish
from convserve.store.job_dir import timestamp

log = logging.getLogger("convserve.jobs")


class Trainer:
    def __init__(self, jobs: JobStore, child: ChildSupervisor, config: RunnerConfig) -> None:
        self._jobs, self._child, self._config = jobs, child, config
        # Guards the running job's id (RPC threads cancel while the loop runs the job).
        self._lock = threading.Lock()
        self._current: str | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._wake: asyncio.Event | None = None

    def runs(self, job_id: str) -> bool:
        with self._lock:
            return self._current == job_id

    def busy(self) -> bool:
        with self._lock:
            return self._current is not None

    def in_worker_loop(self) -> bool:
        """True on the worker's own event loop thread (which must never block)."""
        try:
            return asyncio.get_running_loop() is self._loop
        except RuntimeError:
            return False

    def wake(self) -> None:
        """Look at the queue (or the running job's cancel request) now; from any thread."""
        loop, wake = self._loop, self._wake
        if loop is not None and wake is not None and not loop.is_closed():
            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(wake.set)

    def claim_next(self) -> JobRecord | None:
        """Claim the oldest queued job for this trainer; of trainers racing for it exactly one
        gets it, the others go on to the next. None: nothing waits."""
        me = self._config.replica_id
        while True:
            with self._jobs.next_queued() as transaction:
                if transaction is None:
                    return None
                record = transaction.record
                if transaction.cancel_requested:
                    finish(transaction, JobState.CANCELLED, error="cancelled while queued")
                    continue
                now = timestamp()
                number = record.attempt + 1
                record.attempts.append(Attempt(number=number, trainer=me, claimed_at=now))
                record.state, record.trainer, record.pid, record.error = (
                    JobState.RUNNING, me, None, "")
                record.started_at, record.heartbeat_at = record.started_at or now, now
                transaction.event("state", state=JobState.RUNNING.value, trainer=me,
                                  attempt=number)
                transaction.save()
            log.info("job %s: claimed (attempt %d)", record.id, number)
            return record

    async def run(self, stop: asyncio.Event) -> None:
        """Claim, run, repeat until `stop` is set. A bad job is recorded FAILED and the loop
        goes on; an unreachable job store is retried with backoff, logged once per outage."""
        self._loop = asyncio.get_running_loop()
        self._wake = wake = asyncio.Event()
        backoff = 0.0
        while not stop.is_set():
            wake.clear()
            try:
                record = await asyncio.to_thread(self.claim_next)
            except Exception as error:  # an unreadable store must not end the loop
                if not backoff:
                    if isinstance(error, Unavailable):
                        log.warning("claiming a job: %s; retrying with backoff", error)
                    else:
                        log.exception("claiming a job failed")
                backoff = min(max(backoff * 2, self._config.poll_s), self._config.max_backoff_s)
                await first_of(backoff, stop.wait())
                continue
            if backoff:
                log.info("the job store %s is reachable again", self._jobs.name)
                backoff = 0.0
            if record is None:
                await first_of(self._config.poll_s, stop.wait(), wake.wait())
                continue
            with self._lock:
                self._current = record.id
            try:
                await self._child.run(record, stop, wake)
            except Exception as error:
                log.exception("job %s failed in the runner", record.id)
                with contextlib.suppress(Exception):
                    await asyncio.to_thread(self._child.end_attempt, record, JobState.FAILED,
                                            error=f"runner error: {type(error).__name__}: {error}")
            finally:
                with self._lock:
                    self._current = None

