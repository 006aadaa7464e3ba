"""The job runner: the calls the servicers make (submit, resume, cancel, watch...) and the worker
loop that runs this replica's queue, one job at a time."""

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

from convserve.contracts.gate_policy import GatePolicy
from convserve.contracts.job_dir import CANCEL_MARKER, EVENTS_FILE, EventTail, JobState, timestamp
from convserve.errors import AlreadyExists, Conflict, InvalidInput, LimitExceeded, Unavailable
from convserve.jobs.child import ChildSupervision, first_of
from convserve.jobs.params import MAX_IDEMPOTENCY_KEY, TrainParams
from convserve.jobs.records import JobRecord, touch

log = logging.getLogger("convserve.jobs")


class JobRunner(ChildSupervision):
    """Submit/get/list/cancel/watch from any thread or coroutine; `run` is the worker.

    `submit` and `cancel` may block briefly (file I/O; `cancel` of a running job waits for the
    child to end): call them from a worker thread in async code, as the servicers do.
    """

    def own_jobs(self) -> dict[str, int]:
        """This replica's QUEUED and RUNNING jobs: counted from memory (a metrics scrape must
        not read every record of the shared store)."""
        with self._lock:
            return {JobState.QUEUED.value: len(self._queue),
                    JobState.RUNNING.value: int(self._current is not None)}

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
        """Validate and queue a job on this replica; returns at once. With an idempotency key a
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
        with self._lock:
            if not (idempotency_key and job_dir.exists()):
                if len(self._queue) >= self._config.max_queue:
                    raise LimitExceeded(f"training queue is full ({len(self._queue)} jobs "
                                        "waiting); retry later")
                try:
                    # mkdir is atomic across replicas sharing the store: of two racing retries
                    # with the same key exactly one creates the job.
                    os.mkdir(job_dir)
                except FileExistsError:
                    if not idempotency_key:
                        raise Unavailable(f"job id {job_id} collided; retry") from None
                else:
                    record = JobRecord(id=job_id, state=JobState.QUEUED, params=params,
                                       created_at=timestamp(), replica=self._config.replica_id,
                                       heartbeat_at=timestamp(), idempotency_key=idempotency_key)
                    self._append_event(job_id, "state", state=JobState.QUEUED.value,
                                       replica=self._config.replica_id,
                                       gate_policy=policy.to_dict())
                    self._write(record)
                    self._queue.append(job_id)
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
        """Queue an INTERRUPTED job again on this replica; it continues from its checkpoint. Of
        replicas racing to resume the same job exactly one does (mkdir of a per-attempt marker);
        the others, and retries, get the job as it now is."""
        record = self.get(job_id)
        if record.resumes and record.state in (JobState.QUEUED, JobState.RUNNING):
            return record  # already resumed: a retried or racing request gets the job
        if record.state != JobState.INTERRUPTED:
            raise Conflict(f"job {job_id} is {record.state.value}: only an INTERRUPTED job can be "
                           "resumed")
        with self._lock:
            if len(self._queue) >= self._config.max_queue:
                raise LimitExceeded(f"training queue is full ({len(self._queue)} jobs waiting); "
                                    "retry later")
            try:
                os.mkdir(self._store.job_dir(job_id) / f"resume-{record.resumes + 1}")
            except FileExistsError:
                return self.get(job_id)
            record.resumes += 1
            record.state, record.error, record.finished_at, record.pid = (
                JobState.QUEUED, "", "", None)
            record.replica, record.heartbeat_at = self._config.replica_id, timestamp()
            self._append_event(job_id, "state", state=JobState.QUEUED.value,
                               replica=self._config.replica_id, resumed=record.resumes)
            self._write(record)
            self._queue.append(job_id)
            self._wake_worker()
        return record

    def queue_position(self, job_id: str) -> int:
        """1 = next among this replica's queued jobs; 0 when not queued here."""
        with self._lock:
            return self._queue.index(job_id) + 1 if job_id in self._queue else 0

    def cancel(self, job_id: str) -> JobRecord:
        """Cancel a queued or running job. The owner acts: here at once (a running child gets
        SIGTERM, then SIGKILL after `cancel_grace_s`); another replica within its heartbeat,
        and the record is returned as it stands."""
        record = self.get(job_id)
        if record.state.final:
            raise Conflict(f"job {job_id} already finished: {record.state.value}")
        touch(self._store.job_dir(job_id) / CANCEL_MARKER)
        with self._lock:
            if job_id in self._queue:
                self._queue.remove(job_id)
                return self._finish(self.get(job_id), JobState.CANCELLED,
                                    error="cancelled while queued")
            running_here = job_id == self._current
        if running_here:
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

    async def run(self, stop: asyncio.Event) -> None:
        """Run this replica's queued jobs one at a time, FIFO, until `stop` is set. A bad job is
        recorded FAILED and the loop goes on."""
        self._loop, self._loop_thread = asyncio.get_running_loop(), threading.get_ident()
        self._wake = asyncio.Event()
        while not stop.is_set():
            self._wake.clear()
            with self._lock:
                job_id = self._queue.pop(0) if self._queue else None
                self._current = job_id
            if job_id is None:
                self._heartbeat_queued()
                await first_of(self._config.heartbeat_s, stop.wait(), self._wake.wait())
                continue
            try:
                await self._run_job(job_id, stop)
            except Exception as error:
                log.exception("job %s failed in the runner", job_id)
                with contextlib.suppress(Exception):
                    self._finish(self.get(job_id), JobState.FAILED,
                                 error=f"runner error: {type(error).__name__}: {error}")
            finally:
                with self._lock:
                    self._current = None

