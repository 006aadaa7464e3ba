"""The files job store (the default): jobs in the model store's directory, one machine or a shared
volume whose flock works across hosts.

    jobs/<id>/job.json, events.jsonl, cancel.requested, claim, .lock   (convserve.contracts.job_dir)
    queue/<queued-at>.<id>                                              (convserve.jobs.queue)

Every read-modify-write of job.json runs under the job's flock; job.json is replaced atomically
and events are appended with one write each. The lease is the record's `heartbeat_at`: older than
`lease_s`, the trainer is presumed dead. The claim file names the attempt that holds the job, for
the training process's fence.
"""

from __future__ import annotations

import asyncio
import builtins
import contextlib
import json
import logging
import os
from collections.abc import Iterator
from datetime import UTC, datetime
from typing import Any

from convserve.contracts.errors import IntegrityError, InvalidInput, InvalidJobId, NotFound, Unavailable
from convserve.contracts.job_state import JobState
from convserve.jobs.queue import JobQueue
from convserve.jobs.records import JobRecord, age_s
from convserve.store.base import ModelStore
from convserve.store.durable_files import locked, replace_file, touch
from convserve.store.job_dir import (
    CANCEL_MARKER,
    EVENTS_FILE,
    LOCK_FILE,
    RECORD_FILE,
    EventTail,
    append_event,
    check_claim,
    last_state,
    write_claim,
)

log = logging.getLogger("convserve.jobs")
WATCH_POLL_S = 0.2  # a watcher of the files store looks at the events file this often


class FileTransaction:
    def __init__(self, jobs: FileJobStore, record: JobRecord) -> None:
        self._jobs = jobs
        self.record = record
        self._attempt_at_lock = record.attempt
        path = jobs.models.work.job_dir(record.id)
        self.cancel_requested = (path / CANCEL_MARKER).exists()
        self.lease_expired = (record.state == JobState.RUNNING and age_s(
            record.heartbeat_at or record.created_at, datetime.now(UTC)) > jobs.lease_s)

    def event(self, kind: str, **fields: Any) -> None:
        append_event(self._jobs.models.work.job_dir(self.record.id) / EVENTS_FILE, kind, **fields)

    def save(self, *, max_queued: int | None = None) -> None:
        jobs, record = self._jobs, self.record
        job_dir = jobs.models.work.job_dir(record.id)
        if record.state == JobState.RUNNING and record.attempt != self._attempt_at_lock:
            write_claim(job_dir, record.attempt, record.trainer)  # a new claim: its fence
            self._attempt_at_lock = record.attempt
        if record.state != JobState.QUEUED:
            jobs.write(record)
            jobs.queue.remove(record.id)
            return
        # The record before its queue file: a trainer never finds a file without one (a crash in
        # between is repaired by `repair`).
        with jobs.queue.bounded(max_queued) if max_queued is not None else contextlib.nullcontext():
            jobs.write(record)
            if record.id not in jobs.queue.job_ids():
                jobs.queue.add(record.id, record.queued_at or record.created_at)


class PollingWaiter:
    """The files store cannot notify: a watcher looks again every WATCH_POLL_S."""

    async def wait(self, timeout_s: float) -> None:
        await asyncio.sleep(min(timeout_s, WATCH_POLL_S))


class FileJobStore:
    forwards_child_events = False  # the child appends to the same events.jsonl
    keyed_ids = True

    def __init__(self, models: ModelStore, *, lease_s: float = 20.0) -> None:
        self.models = models
        self.lease_s = lease_s
        self.queue = JobQueue(models.work.queue_dir)
        self.name = f"files:{models.work.root}"

    def ensure_ready(self) -> None:
        pass  # the model store made its folders

    def get(self, job_id: str) -> JobRecord:
        try:
            path = self.models.work.job_dir(job_id) / RECORD_FILE
        except InvalidJobId as error:
            raise InvalidInput(str(error)) from None
        try:
            text = path.read_text(encoding="utf-8")
        except FileNotFoundError:
            raise NotFound(f"job {job_id!r} not found") from None
        except OSError as error:
            raise Unavailable(f"job store {self.name}: cannot read {path}: {error}") from None
        try:
            return JobRecord.from_dict(json.loads(text))
        except (ValueError, KeyError, TypeError, AttributeError) as error:
            raise IntegrityError(f"job {job_id}: unreadable record {path}: {error}") from None

    def list(self) -> builtins.list[JobRecord]:
        records = []
        for job_id in self.models.work.job_ids():
            try:
                records.append(self.get(job_id))
            except NotFound:
                continue  # a directory whose record is still being written
            except IntegrityError as error:
                log.warning("%s", error)
        return sorted(records, key=lambda r: (r.created_at, r.id), reverse=True)

    def queued(self) -> builtins.list[str]:
        return self.queue.job_ids()

    def create(self, record: JobRecord, *, event: dict[str, Any], max_queued: int
               ) -> tuple[str, bool]:
        job_dir = self.models.work.job_dir(record.id)
        if job_dir.exists():
            return record.id, False  # the id is the key's: the job that has it
        with self.queue.bounded(max_queued):
            try:
                # mkdir is atomic across replicas sharing the store: of two racing retries with
                # the same key exactly one creates the job.
                os.mkdir(job_dir)
            except FileExistsError:
                return record.id, False
            transaction = FileTransaction(self, record)
            transaction.event(**event)
            self.write(record)
            self.queue.add(record.id, record.queued_at)
        return record.id, True

    @contextlib.contextmanager
    def locked(self, job_id: str) -> Iterator[FileTransaction]:
        self.get(job_id)  # NotFound before a lock file is made for a job that does not exist
        with locked(self.models.work.job_dir(job_id) / LOCK_FILE):
            yield FileTransaction(self, self.get(job_id))

    @contextlib.contextmanager
    def next_queued(self) -> Iterator[FileTransaction | None]:
        for job_id in self.queue.job_ids():
            with locked(self.models.work.job_dir(job_id) / LOCK_FILE):
                try:
                    record = self.get(job_id)
                except (NotFound, IntegrityError) as error:
                    log.warning("queue: dropping job %s: %s", job_id, error)
                    self.queue.remove(job_id)
                    continue
                if record.state != JobState.QUEUED:
                    self.queue.remove(job_id)  # claimed or cancelled: a stale queue file
                    continue
                yield FileTransaction(self, record)
                return
        yield None

    def expired(self) -> builtins.list[str]:
        now = datetime.now(UTC)
        return [r.id for r in self.running()
                if age_s(r.heartbeat_at or r.created_at, now) > self.lease_s]

    def running(self) -> builtins.list[JobRecord]:
        return [r for r in self.list() if r.state == JobState.RUNNING]

    def repair(self) -> None:
        """A QUEUED record without its queue file, older than a submit takes: its replica died
        between the two writes. Queue it (under the lock, if it is still QUEUED)."""
        queued, now = set(self.queue.job_ids()), datetime.now(UTC)
        for record in self.list():
            if (record.state != JobState.QUEUED or record.id in queued
                    or age_s(record.queued_at or record.created_at, now) <= self.lease_s):
                continue
            with self.locked(record.id) as transaction:
                if transaction.record.state == JobState.QUEUED:
                    log.warning("job %s: QUEUED but not in the queue: queued again", record.id)
                    transaction.save()

    def request_cancel(self, job_id: str) -> None:
        self.get(job_id)
        touch(self.models.work.job_dir(job_id) / CANCEL_MARKER)

    def follow(self, job_id: str) -> EventTail:
        return EventTail(self.models.work.job_dir(job_id) / EVENTS_FILE)

    def last_state(self, job_id: str) -> str | None:
        return last_state(self.models.work.job_dir(job_id) / EVENTS_FILE)

    @contextlib.contextmanager
    def waiter(self, job_id: str) -> Iterator[PollingWaiter]:
        yield PollingWaiter()

    def fence(self, job_id: str, attempt: int) -> None:
        check_claim(self.models.work.job_dir(job_id), attempt)

    def write(self, record: JobRecord) -> None:
        replace_file(self.models.work.job_dir(record.id) / RECORD_FILE,
                     json.dumps(record.to_dict(), indent=2) + "\n")

    def close(self) -> None:
        pass
