"""The job runner: the calls the servicers make (submit, resume, cancel, watch...) on any replica,
and, on a replica with the train role, the trainer that claims and runs queued jobs. Built by
composition over one job store (convserve.jobs.backend): the trainer's loop, its child's
supervision and the recovery of dead trainers' jobs are parts it holds, not classes it is."""

from __future__ import annotations

import asyncio
import builtins
import hashlib
import math
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

from convserve.contracts.errors import AlreadyExists, Conflict, InvalidInput, NotFound, Unavailable
from convserve.contracts.gate_policy import GatePolicy
from convserve.contracts.job_state import JobState
from convserve.jobs.backend import JobStore, open_job_store
from convserve.jobs.child import ChildSupervisor
from convserve.jobs.config import RunnerConfig
from convserve.jobs.params import MAX_IDEMPOTENCY_KEY, TrainParams
from convserve.jobs.records import JobRecord
from convserve.jobs.recovery import Recovery
from convserve.jobs.trainer import Trainer
from convserve.jobs.transitions import finish
from convserve.store.base import ModelStore
from convserve.store.job_dir import timestamp

WATCH_WAIT_S = 5.0  # a watcher re-reads at least this often, notified or not


class JobRunner:
    """Submit/get/list/cancel/watch from any thread or coroutine, on any replica; `run` is the
    worker of a replica with the train role.

    `submit`, `resume` and `cancel` block (the job store's I/O and locks; `cancel` of a running
    job waits for its child to end): call them from a worker thread in async code, as the
    servicers do.
    """

    def __init__(self, models: ModelStore, config: RunnerConfig,
                 jobs: JobStore | None = None) -> None:
        self.models, self.config = models, config
        self.jobs = jobs or open_job_store(config.jobs_url, models, lease_s=config.stale_after_s)
        self.child = ChildSupervisor(self.jobs, models, config)
        self.trainer = Trainer(self.jobs, self.child, config)
        self.recovery = Recovery(self.jobs, models, config, self.trainer.runs, self.trainer.wake)

    # ------------------------------------------------------------------- what any replica does

    def get(self, job_id: str) -> JobRecord:
        return self.jobs.get(job_id)

    def list(self) -> builtins.list[JobRecord]:
        return self.jobs.list()

    def running_here(self) -> int:
        """1 while this replica's worker runs a job (a metric: counted from memory)."""
        return int(self.trainer.busy())

    @property
    def training_images_per_s(self) -> float:
        return self.child.training_images_per_s

    def queued(self) -> float:
        """Jobs waiting in the queue (the same number on every replica); NaN while the job
        store is unreachable (a metric: the scrape goes on)."""
        try:
            return len(self.jobs.queued())
        except Unavailable:
            return math.nan

    def queue_positions(self) -> dict[str, int]:
        """job id -> place in the queue (1 = next); absent: not queued."""
        return {job_id: place for place, job_id in enumerate(self.jobs.queued(), 1)}

    def queue_position(self, job_id: str) -> int:
        return self.queue_positions().get(job_id, 0)

    def validate(self, params: TrainParams) -> GatePolicy:
        """This server's limits on top of the training spec's ranges (checked when the request's
        TrainConfig was built); returns the job's gate policy."""
        c, config = self.config, params.config
        if config.epochs > c.max_epochs:
            raise InvalidInput(f"epochs={config.epochs} is out of range: expected an integer in "
                               f"1..{c.max_epochs} (this server's --max-epochs)")
        if config.batch_size % c.processes:
            raise InvalidInput(f"batch_size={config.batch_size}: this server trains with "
                               f"{c.processes} processes, so the (global) batch size must be a "
                               f"multiple of {c.processes}")
        return params.validate(c.gate_defaults, c.gate_bounds)

    def submit(self, params: TrainParams, idempotency_key: str = "") -> JobRecord:
        """Validate and queue a job; returns at once. With an idempotency key a retry (here or
        on another replica) returns the job the first call created. The gate policy is resolved
        here, once, and stored with the job: its trainer gates with that one."""
        policy = self.validate(params)
        if not isinstance(idempotency_key, str) or len(idempotency_key) > MAX_IDEMPOTENCY_KEY:
            raise InvalidInput(f"idempotency_key must be a string of at most "
                               f"{MAX_IDEMPOTENCY_KEY} characters")
        if not idempotency_key.isprintable():  # NUL and the like: no job store keeps them alike
            raise InvalidInput(f"idempotency_key {idempotency_key!r} holds control characters; "
                               "use printable text")
        if idempotency_key and self.jobs.keyed_ids:
            digest = hashlib.sha256(idempotency_key.encode("utf-8", "surrogatepass"))
            job_id = "k" + digest.hexdigest()[:20]
        else:
            job_id = uuid.uuid4().hex[:20]
        now = timestamp()
        record = JobRecord(id=job_id, state=JobState.QUEUED, params=params, created_at=now,
                           replica=self.config.replica_id, idempotency_key=idempotency_key,
                           queued_at=now, gate_policy=policy.to_dict())
        event = {"kind": "state", "state": JobState.QUEUED.value,
                 "replica": self.config.replica_id, "gate_policy": policy.to_dict()}
        holder, created = self.jobs.create(record, event=event, max_queued=self.config.max_queue)
        if created:
            self.trainer.wake()
            return record
        if not idempotency_key:
            raise Unavailable(f"job id {job_id} collided; retry")
        existing = self._existing(holder)
        if existing.params != params:
            changed = sorted(k for k, v in params.to_dict().items()
                             if existing.params.to_dict().get(k) != v)
            raise AlreadyExists(
                f"idempotency key {idempotency_key!r} already names job {job_id}, created with "
                f"other parameters ({', '.join(changed)} differ); resend the same parameters to "
                "get that job, or use a new key for a new job")
        return existing

    def _existing(self, job_id: str) -> JobRecord:
        # The files store's winner of a racing submit may not have written its record yet.
        for _ in range(100):
            try:
                return self.get(job_id)
            except NotFound:
                time.sleep(0.02)
        raise Unavailable(f"job {job_id} (this idempotency key) is being created by another "
                          "replica, or its creation was interrupted; retry later")

    def resume(self, job_id: str) -> JobRecord:
        """Queue an INTERRUPTED job again; it continues from its checkpoint. Of replicas racing
        to resume the same job exactly one does; the others, and retries, get the job as it
        now is."""
        with self.jobs.locked(job_id) as transaction:
            record = transaction.record
            if record.resumes and record.state in (JobState.QUEUED, JobState.RUNNING):
                return record  # already resumed: a retried or racing request gets the job
            if record.state != JobState.INTERRUPTED:
                raise Conflict(f"job {job_id} is {record.state.value}: only an INTERRUPTED job "
                               "can be resumed")
            now = timestamp()
            record.resumes += 1
            record.state, record.error, record.finished_at, record.pid = (
                JobState.QUEUED, "", "", None)
            record.replica, record.queued_at = self.config.replica_id, now
            transaction.event("state", state=JobState.QUEUED.value,
                              replica=self.config.replica_id, resumed=record.resumes)
            transaction.save(max_queued=self.config.max_queue)
        self.trainer.wake()
        return record

    def cancel(self, job_id: str) -> JobRecord:
        """Cancel a queued or running job, from any replica. A queued job is CANCELLED at once;
        a running one's trainer stops its child (SIGTERM, then SIGKILL after `cancel_grace_s`)
        at its next heartbeat, at once when it runs here, and this waits for that."""
        record = self.get(job_id)
        if record.state.final:
            raise Conflict(f"job {job_id} already finished: {record.state.value}")
        # The request first: a trainer claiming the job this instant sees it and cancels it.
        self.jobs.request_cancel(job_id)
        with self.jobs.locked(job_id) as transaction:
            if transaction.record.state == JobState.QUEUED:
                return finish(transaction, JobState.CANCELLED, error="cancelled while queued")
        if self.trainer.runs(job_id):
            self.trainer.wake()
        if not self.trainer.in_worker_loop():  # never block the worker's own loop
            deadline = (time.monotonic() + self.config.cancel_grace_s
                        + self.config.heartbeat_s + 5.0)
            while not record.state.final and time.monotonic() < deadline:
                time.sleep(0.05)
                record = self.get(job_id)
        return self.get(job_id)

    async def watch(self, job_id: str, after_sequence: int = 0
                    ) -> AsyncIterator[tuple[int, dict[str, Any]]]:
        """(sequence, event) for each of the job's events after `after_sequence`, following
        them as they come (the job store says when: LISTEN/NOTIFY on PostgreSQL, a short poll
        of the file otherwise), until the record is final and every event has been read.
        NotFound before the first yield."""
        await asyncio.to_thread(self.get, job_id)
        cursor = self.jobs.follow(job_id)
        with self.jobs.waiter(job_id) as waiter:  # listening before the first read
            while True:
                # The record first: a final state's event is written before the record turns
                # final.
                final = (await asyncio.to_thread(self.get, job_id)).state.final
                for sequence, event in await asyncio.to_thread(cursor.read):
                    if sequence > after_sequence and event is not None:
                        yield sequence, event
                if final:
                    return
                await waiter.wait(WATCH_WAIT_S)

    # ------------------------------------------------------------------- what a trainer does

    def claim_next(self) -> JobRecord | None:
        return self.trainer.claim_next()

    async def run(self, stop: asyncio.Event) -> None:
        await self.trainer.run(stop)

    def recover(self) -> builtins.list[str]:
        return self.recovery.recover()

    def command(self, record: JobRecord) -> builtins.list[str]:
        return self.child.command(record)

    def close(self) -> None:
        self.jobs.close()
