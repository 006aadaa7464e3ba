"""The job runner: the calls the servicers make (submit, resume, cancel, watch...) on any
replica, and a trainer's worker loop, which claims the store's oldest queued job, runs it, and
goes on."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import os
import threading
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

from convserve.contracts.durable_files import touch
from convserve.contracts.gate_policy import GatePolicy
from convserve.contracts.job_dir import (
    CANCEL_MARKER,
    EVENTS_FILE,
    EventTail,
    JobState,
    timestamp,
    write_claim,
)
from convserve.contracts.store import IntegrityError
from convserve.errors import AlreadyExists, Conflict, InvalidInput, NotFound, Unavailable
from convserve.jobs.child import ChildSupervision, first_of
from convserve.jobs.params import MAX_IDEMPOTENCY_KEY, TrainParams
from convserve.jobs.records import Attempt, JobRecord

log = logging.getLogger("convserve.jobs")


class JobRunner(ChildSupervision):
    """Submit/get/list/cancel/watch from any thread or coroutine, on any replica; `run` is the
    worker of a replica with the train role.

    `submit`, `resume` and `cancel` block (file I/O, the store's locks; `cancel` of a running job
    waits for its child to end): call them from a worker thread in async code, as the servicers
    do.
    """

    def running_here(self) -> int:
        """1 while this replica's worker runs a job (a metric: counted from memory)."""
        with self._lock:
            return int(self._current is not None)

    def queued(self) -> int:
        """Jobs waiting in the store's queue (the same number on every replica)."""
        return len(self._queue.job_ids())

    def validate(self, params: TrainParams) -> GatePolicy:
        """This server's limits on top of the training spec's ranges (checked when the request's
        TrainConfig was built); returns the job's gate policy."""
        c, config = self._config, params.config
        if config.epochs > c.max_epochs:
            raise InvalidInput(f"epochs={config.epochs} is out of range: expected an integer in "
                               f"1..{c.max_epochs} (this server's --max-epochs)")
        if config.batch_size % c.processes:
            raise InvalidInput(f"batch_size={config.batch_size}: this server trains with "
                               f"{c.processes} processes, so the (global) batch size must be a "
                               f"multiple of {c.processes}")
        return params.validate(c.gate_defaults, c.gate_bounds)

    def submit(self, params: TrainParams, idempotency_key: str = "") -> JobRecord:
        """Validate and queue a job in the store; returns at once. With an idempotency key a
        retry (here or on another replica) returns the job the first call created."""
        policy = self.validate(params)
        if not isinstance(idempotency_key, str) or len(idempotency_key) > MAX_IDEMPOTENCY_KEY:
            raise InvalidInput(f"idempotency_key must be a string of at most "
                               f"{MAX_IDEMPOTENCY_KEY} characters")
        if idempotency_key:
            digest = hashlib.sha256(idempotency_key.encode("utf-8", "surrogatepass"))
            job_id = "k" + digest.hexdigest()[:20]
        else:
            job_id = uuid.uuid4().hex[:20]
        job_dir = self._store.job_dir(job_id)
        if not (idempotency_key and job_dir.exists()):
            with self._queue.bounded(self._config.max_queue):
                try:
                    # mkdir is atomic across replicas sharing the store: of two racing retries
                    # with the same key exactly one creates the job.
                    os.mkdir(job_dir)
                except FileExistsError:
                    if not idempotency_key:
                        raise Unavailable(f"job id {job_id} collided; retry") from None
                else:
                    now = timestamp()
                    record = JobRecord(id=job_id, state=JobState.QUEUED, params=params,
                                       created_at=now, replica=self._config.replica_id,
                                       idempotency_key=idempotency_key, queued_at=now)
                    self._append_event(job_id, "state", state=JobState.QUEUED.value,
                                       replica=self._config.replica_id,
                                       gate_policy=policy.to_dict())
                    # The record before its queue file: a trainer never finds a file without one
                    # (a crash in between is repaired by `recover`).
                    self._write(record)
                    self._queue.add(job_id, now)
                    self._wake_worker()
                    return record
        existing = self._existing(job_id)
        if existing.params != params:
            changed = sorted(k for k, v in params.to_dict().items()
                             if existing.params.to_dict().get(k) != v)
            raise AlreadyExists(
                f"idempotency key {idempotency_key!r} already names job {job_id}, created with "
                f"other parameters ({', '.join(changed)} differ); resend the same parameters to "
                "get that job, or use a new key for a new job")
        return existing

    def resume(self, job_id: str) -> JobRecord:
        """Queue an INTERRUPTED job again; it continues from its checkpoint. Of replicas racing
        to resume the same job exactly one does (under the job's lock); the others, and
        retries, get the job as it now is."""
        record = self.get(job_id)
        if record.resumes and record.state in (JobState.QUEUED, JobState.RUNNING):
            return record  # already resumed: a retried or racing request gets the job
        if record.state != JobState.INTERRUPTED:
            raise Conflict(f"job {job_id} is {record.state.value}: only an INTERRUPTED job can be "
                           "resumed")
        with self._queue.bounded(self._config.max_queue), self._job_locked(job_id):
            record = self.get(job_id)
            if record.state != JobState.INTERRUPTED:
                return record  # a racing resume won
            now = timestamp()
            record.resumes += 1
            record.state, record.error, record.finished_at, record.pid = (
                JobState.QUEUED, "", "", None)
            record.replica, record.queued_at = self._config.replica_id, now
            self._append_event(job_id, "state", state=JobState.QUEUED.value,
                               replica=self._config.replica_id, resumed=record.resumes)
            self._write(record)
            self._queue.add(job_id, now)
        self._wake_worker()
        return record

    def queue_positions(self) -> dict[str, int]:
        """job id -> place in the store's queue (1 = next); absent: not queued."""
        return self._queue.positions()

    def queue_position(self, job_id: str) -> int:
        return self.queue_positions().get(job_id, 0)

    def cancel(self, job_id: str) -> JobRecord:
        """Cancel a queued or running job, from any replica. A queued job is CANCELLED at once;
        a running one's trainer stops its child (SIGTERM, then SIGKILL after `cancel_grace_s`)
        at its next heartbeat, at once when it runs here, and this waits for that."""
        record = self.get(job_id)
        if record.state.final:
            raise Conflict(f"job {job_id} already finished: {record.state.value}")
        # The marker first: a trainer claiming the job this instant sees it and cancels it.
        touch(self._store.job_dir(job_id) / CANCEL_MARKER)
        with self._job_locked(job_id):
            record = self.get(job_id)
            if record.state == JobState.QUEUED:
                self._queue.remove(job_id)
                return self._finish(record, JobState.CANCELLED, error="cancelled while queued")
        with self._lock:
            if job_id == self._current:
                self._wake_worker()
        if threading.get_ident() != self._loop_thread:  # never block the worker's own loop
            deadline = (time.monotonic() + self._config.cancel_grace_s
                        + self._config.heartbeat_s + 5.0)
            while not record.state.final and time.monotonic() < deadline:
                time.sleep(0.05)
                record = self.get(job_id)
        return self.get(job_id)

    async def watch(self, job_id: str, after_sequence: int = 0,
                    poll_s: float = 0.2) -> AsyncIterator[tuple[int, dict[str, Any]]]:
        """(sequence, event) for each complete line of the job's events.jsonl after
        `after_sequence` (sequence = 1-based line number), following the file as it grows, until
        the record is final and every line has been read. NotFound before the first yield."""
        self.get(job_id)
        tail = EventTail(self._store.job_dir(job_id) / EVENTS_FILE)
        while True:
            # The record first: a final state's event is appended before the record turns final.
            final = self.get(job_id).state.final
            for sequence, event in tail.read():
                if sequence > after_sequence and event is not None:
                    yield sequence, event
            if final:
                return
            await asyncio.sleep(poll_s)

    def claim_next(self) -> JobRecord | None:
        """Claim the oldest queued job for this trainer: under the job's lock, so of trainers
        racing for it exactly one gets it; the others go on to the next. None: nothing waits."""
        me = self._config.replica_id
        for job_id in self._queue.job_ids():
            with self._job_locked(job_id):
                try:
                    record = self.get(job_id)
                except (NotFound, IntegrityError) as error:
                    log.warning("queue: dropping job %s: %s", job_id, error)
                    self._queue.remove(job_id)
                    continue
                if record.state != JobState.QUEUED:
                    self._queue.remove(job_id)  # claimed or cancelled: a stale queue file
                    continue
                if (self._store.job_dir(job_id) / CANCEL_MARKER).exists():
                    self._queue.remove(job_id)
                    self._finish(record, JobState.CANCELLED, error="cancelled while queued")
                    continue
                now = timestamp()
                number = len(record.attempts) + 1
                record.attempts.append(Attempt(number=number, trainer=me, claimed_at=now))
                record.state, record.trainer, record.pid, record.error = (
                    JobState.RUNNING, me, None, "")
                record.started_at, record.heartbeat_at = record.started_at or now, now
                self._append_event(job_id, "state", state=JobState.RUNNING.value, trainer=me,
                                   attempt=number)
                write_claim(self._store.job_dir(job_id), number, me)
                self._write(record)
                self._queue.remove(job_id)
            log.info("job %s: claimed (attempt %d)", job_id, number)
            return record
        return None

    async def run(self, stop: asyncio.Event) -> None:
        """A trainer's worker: claim the oldest queued job, run it, repeat, until `stop` is set.
        A bad job is recorded FAILED and the loop goes on."""
        self._loop, self._loop_thread = asyncio.get_running_loop(), threading.get_ident()
        self._wake = asyncio.Event()
        while not stop.is_set():
            self._wake.clear()
            try:
                record = await asyncio.to_thread(self.claim_next)
            except Exception:  # an unreadable store must not end the loop
                log.exception("claiming a job failed")
                record = None
            if record is None:
                await first_of(self._config.poll_s, stop.wait(), self._wake.wait())
                continue
            with self._lock:
                self._current = record.id
            try:
                await self._run_job(record, stop)
            except Exception as error:
                log.exception("job %s failed in the runner", record.id)
                with contextlib.suppress(Exception):
                    self._end_attempt(record, JobState.FAILED,
                                      error=f"runner error: {type(error).__name__}: {error}")
            finally:
                with self._lock:
                    self._current = None
