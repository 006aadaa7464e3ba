"""Job records in the shared store: reading and atomically replacing job.json, appending events,
finishing a job, and heartbeating this replica's queued jobs."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import math
import os
import time
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from convserve.contracts.job_dir import (
    CANCEL_MARKER,
    CARD_FILE,
    EVENTS_FILE,
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
    replica: str = ""
    pid: int | None = None
    heartbeat_at: str = ""
    idempotency_key: str = ""
    resumes: int = 0                    # times it was continued after an interruption

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
                      "params": TrainParams.from_dict(values["params"])})



class RecordKeeping(RunnerState):
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
        """Make `record` final: the state event first, then the record (see the module doc)."""
        with self._lock:
            if event:
                self._append_event(record.id, "state", state=state.value,
                                   **({"error": error} if error else {}))
            record.state, record.finished_at, record.error = state, timestamp(), error
            self._write(record)
        return record

    def _write(self, record: JobRecord) -> None:
        path = self._store.job_dir(record.id) / RECORD_FILE
        partial = path.with_name(f".{RECORD_FILE}.{uuid.uuid4().hex}.tmp")
        try:
            with partial.open("w", encoding="utf-8") as handle:
                handle.write(json.dumps(record.to_dict(), indent=2) + "\n")
                handle.flush()
                os.fsync(handle.fileno())
            os.replace(partial, path)
        finally:
            with contextlib.suppress(FileNotFoundError):
                partial.unlink()

    def _append_event(self, job_id: str, kind: str, **fields: Any) -> None:
        append_event(self._store.job_dir(job_id) / EVENTS_FILE, kind, **fields)

    def _card(self, job_id: str) -> ModelCard:
        """The card the job's run wrote (empty when it wrote none, or an unreadable one)."""
        try:
            card = json.loads((self._store.job_dir(job_id) / CARD_FILE).read_text("utf-8"))
        except (OSError, ValueError):
            card = {}
        return ModelCard.from_dict(card if isinstance(card, dict) else {})

    def _heartbeat_queued(self) -> None:
        """Keep this replica's queued records fresh (so no other replica's `recover` takes them
        for orphans) and act on cancel markers other replicas left on them."""
        now = time.monotonic()
        if now - self._last_queued_beat < self._config.heartbeat_s:
            return
        self._last_queued_beat = now
        with self._lock:
            for job_id in list(self._queue):
                try:
                    record = self.get(job_id)
                    if (self._store.job_dir(job_id) / CANCEL_MARKER).exists():
                        self._queue.remove(job_id)
                        self._finish(record, JobState.CANCELLED, error="cancelled while queued")
                    else:
                        record.heartbeat_at = timestamp()
                        self._write(record)
                except Exception:
                    log.exception("job %s: queued heartbeat failed", job_id)

    def _wake_worker(self) -> None:
        loop, wake = self._loop, self._wake
        if loop is not None and wake is not None and not loop.is_closed():
            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(wake.set)


def touch(path: Path) -> None:
    os.close(os.open(path, os.O_WRONLY | os.O_CREAT, 0o644))


def age_s(iso_time: str, now: datetime) -> float:
    try:
        then = datetime.fromisoformat(iso_time)
    except (TypeError, ValueError):
        return math.inf  # unreadable: as good as no heartbeat at all
    if then.tzinfo is None:
        then = then.replace(tzinfo=UTC)
    return (now - then).total_seconds()

