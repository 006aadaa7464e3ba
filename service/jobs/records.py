"""Job records in the shared store: reading and atomically replacing job.json under the job's
lock, appending events, and finishing a job."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import math
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from convserve.contracts.durable_files import locked, replace_file
from convserve.contracts.job_dir import (
    CARD_FILE,
    EVENTS_FILE,
    LOCK_FILE,
    RECORD_FILE,
    JobState,
    append_event,
    timestamp,
)
from convserve.contracts.model_card import GateDecision, ModelCard
from convserve.contracts.store import IntegrityError, InvalidJobId
from convserve.errors import InvalidInput, NotFound, Unavailable
from convserve.jobs.params import TrainParams
from convserve.jobs.state import RunnerState

log = logging.getLogger("convserve.jobs")


@dataclass
class Attempt:
    """One run of a job by one trainer, from its claim to its end."""

    number: int                         # 1, 2, ...: also the claim's fencing token
    trainer: str                        # the trainer's replica id (host:pid)
    claimed_at: str
    ended_at: str = ""
    # "" while it runs; then a final JobState name, "released" (its trainer stopped and put the
    # job back in the queue) or "lost" (its trainer died: no heartbeat, or its process is gone)
    outcome: str = ""

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> Attempt:
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in values.items() if k in names})


@dataclass
class JobRecord:
    id: str
    state: JobState
    params: TrainParams
    created_at: str
    started_at: str = ""
    finished_at: str = ""
    error: str = ""
    model_version: int | None = None
    gate: GateDecision | None = None
    epoch: int = 0
    val_accuracy: float | None = None
    replica: str = ""                   # the replica that accepted the Train
    pid: int | None = None              # the running attempt's training process
    heartbeat_at: str = ""              # the running attempt's trainer, every heartbeat_s
    idempotency_key: str = ""
    resumes: int = 0                    # times it was continued after an interruption
    queued_at: str = ""                 # its place in the queue (kept when it goes back)
    trainer: str = ""                   # the trainer of the latest attempt
    attempts: list[Attempt] = field(default_factory=list)

    @property
    def lost_attempts(self) -> int:
        return sum(a.outcome == "lost" for a in self.attempts)

    def held_by(self, trainer: str, number: int) -> bool:
        """Attempt `number` of `trainer` is the one running the job now (its lease)."""
        return (self.state == JobState.RUNNING and bool(self.attempts)
                and self.attempts[-1].number == number and self.attempts[-1].trainer == trainer
                and not self.attempts[-1].outcome)

    def to_dict(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "state": self.state.value,
                "params": self.params.to_dict(), "gate": self.gate.to_dict() if self.gate else None}

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> JobRecord:
        """Unknown keys are ignored, so a replica can read records a newer one wrote."""
        names = {f.name for f in dataclasses.fields(cls)}
        known = {k: v for k, v in values.items() if k in names}
        return cls(**{**known, "state": JobState(values["state"]),
                      "gate": GateDecision.from_dict(values.get("gate")),
                      "params": TrainParams.from_dict(values["params"]),
                      "attempts": [Attempt.from_dict(a) for a in values.get("attempts") or ()]})


class RecordKeeping(RunnerState):
    @contextlib.contextmanager
    def _job_locked(self, job_id: str) -> Iterator[None]:
        """Every read-modify-write of a job.json runs under this: the submitting replica, the
        trainers claiming and heartbeating, cancels and recovery, on any host of the store."""
        with locked(self._store.job_dir(job_id) / LOCK_FILE):
            yield

    def get(self, job_id: str) -> JobRecord:
        """Any replica's job, read from the store."""
        try:
            path = self._store.job_dir(job_id) / RECORD_FILE
        except InvalidJobId as error:
            raise InvalidInput(str(error)) from None
        try:
            text = path.read_text(encoding="utf-8")
        except FileNotFoundError:
            raise NotFound(f"job {job_id!r} not found") from None
        try:
            return JobRecord.from_dict(json.loads(text))
        except (ValueError, KeyError, TypeError, AttributeError) as error:
            raise IntegrityError(f"job {job_id}: unreadable record {path}: {error}") from None

    def list(self) -> list[JobRecord]:
        """Every job in the store, newest first (unreadable records are logged and skipped)."""
        records = []
        for job_id in self._store.job_ids():
            try:
                records.append(self.get(job_id))
            except NotFound:
                continue  # a directory whose record is still being written
            except IntegrityError as error:
                log.warning("%s", error)
        return sorted(records, key=lambda r: (r.created_at, r.id), reverse=True)

    def _existing(self, job_id: str) -> JobRecord:
        # The winner of a racing submit may not have written its record yet: wait briefly.
        for _ in range(100):
            with contextlib.suppress(NotFound):
                return self.get(job_id)
            time.sleep(0.02)
        raise Unavailable(f"job {job_id} (this idempotency key) is being created by another "
                          "replica, or its creation was interrupted; retry later")

    def _finish(self, record: JobRecord, state: JobState, *, error: str = "",
                event: bool = True) -> JobRecord:
        """Make `record` final: the state event first, then the record (see the module doc).
        The caller holds the job's lock. A running attempt ends with the job's state."""
        if event:
            self._append_event(record.id, "state", state=state.value,
                               **({"error": error} if error else {}))
        now = timestamp()
        if record.attempts and not record.attempts[-1].outcome:
            record.attempts[-1].outcome, record.attempts[-1].ended_at = state.value, now
        record.state, record.finished_at, record.error = state, now, error
        self._write(record)
        return record

    def _requeue(self, record: JobRecord, outcome: str, **why: Any) -> None:
        """Put a claimed job back in the queue, at its old place (it was first in line once);
        its attempt ended `outcome` ("released" or "lost"). The caller holds the job's lock."""
        now = timestamp()
        if record.attempts and not record.attempts[-1].outcome:
            record.attempts[-1].outcome, record.attempts[-1].ended_at = outcome, now
        record.state, record.pid, record.heartbeat_at = JobState.QUEUED, None, now
        record.queued_at = record.queued_at or record.created_at
        self._append_event(record.id, "state", state=JobState.QUEUED.value, **why)
        self._write(record)
        self._queue.add(record.id, record.queued_at)
        self._wake_worker()

    def _write(self, record: JobRecord) -> None:
        replace_file(self._store.job_dir(record.id) / RECORD_FILE,
                     json.dumps(record.to_dict(), indent=2) + "\n")

    def _append_event(self, job_id: str, kind: str, **fields: Any) -> None:
        append_event(self._store.job_dir(job_id) / EVENTS_FILE, kind, **fields)

    def _card(self, job_id: str) -> ModelCard:
        """The card the job's run wrote (empty when it wrote none, or an unreadable one)."""
        try:
            card = json.loads((self._store.job_dir(job_id) / CARD_FILE).read_text("utf-8"))
        except (OSError, ValueError):
            card = {}
        return ModelCard.from_dict(card if isinstance(card, dict) else {})

    def _wake_worker(self) -> None:
        loop, wake = self._loop, self._wake
        if loop is not None and wake is not None and not loop.is_closed():
            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(wake.set)


def age_s(iso_time: str, now: datetime) -> float:
    try:
        then = datetime.fromisoformat(iso_time)
    except (TypeError, ValueError):
        return math.inf  # unreadable: as good as no heartbeat at all
    if then.tzinfo is None:
        then = then.replace(tzinfo=UTC)
    return (now - then).total_seconds()

