"""Training jobs: records in the store, a per-replica FIFO queue, and a child process per job.

A job is a directory `jobs/<id>/` of the shared store:
    job.json       the record (state, parameters, owner replica, pid, heartbeat); replaced atomically
    events.jsonl   what happened, one JSON object per line: the runner's state changes and the
                   training process's own events (progress, epochs, gate)
    stdout.log, stderr.log, card.json, model.onnx, tensorboard/, checkpoints/   from the child
Any replica sharing the store can answer GetJob/WatchJob for any job by reading these files.

Each replica runs one job at a time (`python -m training`, in its own process group so a cancel
ends everything it started), FIFO over the jobs it accepted. A job whose replica died is noticed
by its stale heartbeat and marked FAILED (not resumed: its checkpoints stay in the job directory,
and a new Train starts cleanly; resuming across replicas would need a lease protocol).

torch-free: the serving process imports this; only the child imports torch.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import enum
import hashlib
import json
import logging
import os
import re
import signal
import socket
import sys
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from service.errors import Conflict, InvalidInput, LimitExceeded, NotFound
from service.store import InvalidJobId, ModelStore
from training.gate import GateBounds, GateConfigError, GatePolicy

log = logging.getLogger("convserve.jobs")

RECORD_FILE = "job.json"
EVENTS_FILE = "events.jsonl"
CANCEL_MARKER = "cancel.requested"
ERROR_TAIL_LINES = 15
QUEUE_POLL_S = 0.1
DATASET_RE = re.compile(r"digits|cifar10|synthetic(:[0-9]{1,9})?|folder:[A-Za-z0-9._/-]{1,200}")


class JobState(enum.StrEnum):
    QUEUED = "QUEUED"
    RUNNING = "RUNNING"
    PROMOTED = "PROMOTED"
    REJECTED = "REJECTED"
    FAILED = "FAILED"
    CANCELLED = "CANCELLED"

    @property
    def final(self) -> bool:
        return self in FINAL_STATES


FINAL_STATES = frozenset({JobState.PROMOTED, JobState.REJECTED, JobState.FAILED,
                          JobState.CANCELLED})


@dataclass(frozen=True)
class TrainParams:
    dataset: str = "digits"
    epochs: int = 10
    batch_size: int = 64
    lr: float = 1e-3
    seed: int = 0
    val_fraction: float = 0.2
    gate: dict[str, Any] = field(default_factory=dict)  # overrides of the server's gate defaults

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


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
    gate: dict[str, Any] | None = None
    epoch: int = 0
    val_accuracy: float | None = None
    replica: str = ""
    pid: int | None = None
    heartbeat_at: str = ""
    idempotency_key: str = ""

    def to_dict(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "state": self.state.value,
                "params": self.params.to_dict()}

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> JobRecord:
        return cls(**{**values, "state": JobState(values["state"]),
                      "params": TrainParams(**values["params"])})


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
    child_env: dict[str, str] | None = None
    cancel_grace_s: float = 5.0


class JobRunner:
    def __init__(self, store: ModelStore, config: RunnerConfig) -> None:
        self._store = store
        self._config = config
        # This replica's QUEUED jobs, FIFO. Touched from the loop and from RPC worker threads:
        # only single list operations, which the GIL keeps whole.
        self._queue: list[str] = []
        self._running: asyncio.subprocess.Process | None = None
        self._running_id: str | None = None

    # --- requests ------------------------------------------------------------------------------

    def submit(self, params: TrainParams, idempotency_key: str = "") -> JobRecord:
        policy = self.validate(params)
        job_id = ("k" + hashlib.sha256(idempotency_key.encode()).hexdigest()[:20]
                  if idempotency_key else uuid.uuid4().hex[:20])
        if idempotency_key and self._store.job_dir(job_id).exists():
            return self._existing(job_id)
        if len(self._queue) >= self._config.max_queue:
            raise LimitExceeded(f"training queue is full ({len(self._queue)} jobs waiting on this "
                                "replica); retry later")
        try:
            self._store.jobs_dir.mkdir(parents=True, exist_ok=True)
            # mkdir is atomic across replicas sharing the store: one of two racing retries wins.
            os.mkdir(self._store.job_dir(job_id))
        except FileExistsError:
            return self._existing(job_id)
        record = JobRecord(id=job_id, state=JobState.QUEUED, params=params, created_at=_now(),
                           replica=self._config.replica_id, idempotency_key=idempotency_key)
        self._write(record)
        self._event(job_id, "state", state="QUEUED", gate_policy=policy.to_dict())
        self._queue.append(job_id)
        return record

    def validate(self, params: TrainParams) -> GatePolicy:
        """Refuse a bad request before anything is written; returns the job's gate policy."""
        if not DATASET_RE.fullmatch(params.dataset) or ".." in params.dataset.split("/"):
            raise InvalidInput(f"unknown dataset {params.dataset!r}; expected one of: digits, "
                               "cifar10, folder:<name>, synthetic[:<n>]")
        _check(1 <= params.epochs <= self._config.max_epochs, "epochs", params.epochs,
               f"1..{self._config.max_epochs}")
        _check(1 <= params.batch_size <= 4096, "batch_size", params.batch_size, "1..4096")
        _check(0 < params.lr <= 1, "lr", params.lr, "(0, 1]")
        _check(0 < params.val_fraction < 1, "val_fraction", params.val_fraction, "(0, 1)")
        _check(params.seed >= 0, "seed", params.seed, ">= 0")
        try:
            return self._config.gate_bounds.apply(self._config.gate_defaults, params.gate)
        except (GateConfigError, TypeError) as error:
            raise InvalidInput(f"gate overrides: {error}") from None

    def get(self, job_id: str) -> JobRecord:
        try:
            path = self._store.job_dir(job_id) / RECORD_FILE
        except InvalidJobId as error:
            raise InvalidInput(str(error)) from None
        try:
            return JobRecord.from_dict(json.loads(path.read_text(encoding="utf-8")))
        except FileNotFoundError:
            raise NotFound(f"job {job_id!r} not found") from None

    def list(self) -> list[JobRecord]:
        records = []
        for job_id in self._store.job_ids():
            with contextlib.suppress(NotFound, ValueError, KeyError, TypeError):
                records.append(self.get(job_id))
        return sorted(records, key=lambda r: r.created_at, reverse=True)

    def queue_position(self, job_id: str) -> int:
        return self._queue.index(job_id) + 1 if job_id in self._queue else 0

    def cancel(self, job_id: str) -> JobRecord:
        record = self.get(job_id)
        if record.state.final:
            raise Conflict(f"job {job_id} already finished: {record.state.value}")
        (self._store.job_dir(job_id) / CANCEL_MARKER).touch()
        if job_id in self._queue:
            self._queue.remove(job_id)
            return self._finish(record, JobState.CANCELLED, error="cancelled while queued")
        if job_id == self._running_id and self._running is not None:
            _signal_group(self._running.pid, signal.SIGTERM)
        return self.get(job_id)  # the owner (this replica or another) records CANCELLED

    async def watch(self, job_id: str, after_sequence: int = 0,
                    poll_s: float = 0.2) -> AsyncIterator[tuple[int, dict[str, Any]]]:
        """Each complete line of the job's events, then the ones still to come, until the job
        is final and every line has been read."""
        self.get(job_id)  # NotFound before the first yield
        path = self._store.job_dir(job_id) / EVENTS_FILE
        sequence, offset, partial = 0, 0, b""
        while True:
            final = self.get(job_id).state.final  # read before the file: no event is missed
            with contextlib.suppress(FileNotFoundError), path.open("rb") as handle:
                handle.seek(offset)
                chunk = handle.read()
                offset += len(chunk)
                lines = (partial + chunk).split(b"\n")
                partial = lines.pop()  # an unfinished line waits for its newline
                for line in lines:
                    sequence += 1
                    if sequence > after_sequence and line.strip():
                        yield sequence, json.loads(line)
            if final:
                return
            await asyncio.sleep(poll_s)

    # --- the worker ----------------------------------------------------------------------------

    async def run(self, stop: asyncio.Event) -> None:
        """Run this replica's queued jobs one at a time until `stop` is set."""
        while not stop.is_set():
            if not self._queue:
                await asyncio.sleep(QUEUE_POLL_S)
                continue
            job_id = self._queue.pop(0)
            try:
                await self._run_job(job_id, stop)
            except Exception as error:  # one bad job must not stop the runner
                log.exception("job %s failed in the runner", job_id)
                with contextlib.suppress(Exception):
                    self._finish(self.get(job_id), JobState.FAILED,
                                 error=f"runner error: {type(error).__name__}: {error}")

    async def _run_job(self, job_id: str, stop: asyncio.Event) -> None:
        record = self.get(job_id)
        job_dir = self._store.job_dir(job_id)
        if record.state.final or (job_dir / CANCEL_MARKER).exists():
            if not record.state.final:
                self._finish(record, JobState.CANCELLED, error="cancelled while queued")
            return
        with (job_dir / "stdout.log").open("wb") as out, (job_dir / "stderr.log").open("wb") as err:
            process = await asyncio.create_subprocess_exec(
                *self.command(record), stdin=asyncio.subprocess.DEVNULL, stdout=out, stderr=err,
                start_new_session=True, env={**os.environ, **(self._config.child_env or {})})
        self._running, self._running_id = process, job_id
        record.state, record.started_at, record.pid = JobState.RUNNING, _now(), process.pid
        record.heartbeat_at = record.started_at
        self._write(record)
        self._event(job_id, "state", state="RUNNING", pid=process.pid,
                    replica=self._config.replica_id)
        try:
            cancelled = await self._supervise(process, record, stop)
        finally:
            self._running, self._running_id = None, None
        self._conclude(self.get(job_id), process.returncode, cancelled, stop.is_set())

    async def _supervise(self, process: asyncio.subprocess.Process, record: JobRecord,
                         stop: asyncio.Event) -> bool:
        """Heartbeat while the child runs; end it on cancel or server stop. True if cancelled."""
        marker = self._store.job_dir(record.id) / CANCEL_MARKER
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(process.wait(), timeout=self._config.heartbeat_s)
                return marker.exists()
            if marker.exists() or stop.is_set():
                await self._terminate(process)
                return marker.exists()
            self._heartbeat(record)

    async def _terminate(self, process: asyncio.subprocess.Process) -> None:
        _signal_group(process.pid, signal.SIGTERM)
        try:
            await asyncio.wait_for(process.wait(), timeout=self._config.cancel_grace_s)
        except TimeoutError:
            _signal_group(process.pid, signal.SIGKILL)
            await process.wait()

    def _heartbeat(self, record: JobRecord) -> None:
        record.heartbeat_at = _now()
        epochs = [e for e in self._events(record.id) if e.get("type") == "epoch"]
        if epochs:
            record.epoch = int(epochs[-1]["epoch"])
            record.val_accuracy = float(epochs[-1]["val_accuracy"])
        self._write(record)

    def _conclude(self, record: JobRecord, code: int | None, cancelled: bool,
                  stopping: bool) -> None:
        self._heartbeat(record)
        if cancelled:
            self._finish(record, JobState.CANCELLED, error="cancelled")
            return
        if stopping and code != 0:
            self._finish(record, JobState.FAILED, error="interrupted: the server stopped; "
                         f"checkpoints are in jobs/{record.id}/checkpoints")
            return
        if code == 0:
            states = [e.get("state") for e in self._events(record.id) if e.get("type") == "state"]
            card = self._card(record.id)
            record.gate, record.model_version = card.get("gate"), card.get("version")
            final = JobState.PROMOTED if states and states[-1] == "PROMOTED" else JobState.REJECTED
            self._finish(record, final, event=False)  # the child wrote its final state event
            return
        self._finish(record, JobState.FAILED, error=self._failure(record.id, code))

    def _failure(self, job_id: str, code: int | None) -> str:
        """The child's last error lines, or what killed it when it printed nothing."""
        stderr = (self._store.job_dir(job_id) / "stderr.log").read_text(errors="replace")
        lines = [line for line in stderr.splitlines() if line.strip()][-ERROR_TAIL_LINES:]
        if code is not None and code < 0:
            name = signal.Signals(-code).name
            lines.append(f"training process exited with code {code} (killed by {name})")
        elif not lines:
            lines.append(f"training process exited with code {code}")
        return "\n".join(lines)

    def recover(self) -> list[str]:
        """Mark jobs whose replica is gone FAILED (start-up, and safe to call any time)."""
        recovered = []
        now = datetime.now(UTC)
        for record in self.list():
            if record.state.final or record.id in self._queue or record.id == self._running_id:
                continue
            last = record.heartbeat_at or record.created_at
            stale = (now - datetime.fromisoformat(last)).total_seconds() > self._config.stale_after_s
            if stale or self._dead_here(record):
                self._finish(record, JobState.FAILED, error=(
                    f"interrupted: the replica running it stopped (last heartbeat {last}); start "
                    f"a new Train to retry (checkpoints in jobs/{record.id}/checkpoints)"))
                recovered.append(record.id)
        return recovered

    def _dead_here(self, record: JobRecord) -> bool:
        """A job of this host whose owner process is gone (a restart on the same host)."""
        host, _, pid = record.replica.rpartition(":")
        if host != socket.gethostname() or record.replica == self._config.replica_id:
            return False
        try:
            os.kill(int(pid), 0)
        except (ProcessLookupError, ValueError):
            return True
        except PermissionError:
            return False
        return False

    def command(self, record: JobRecord) -> list[str]:
        p = record.params
        policy = self._config.gate_bounds.apply(self._config.gate_defaults, p.gate)
        args = [self._config.python, "-m", "training", "--dataset", p.dataset,
                "--datasets-root", str(self._config.datasets_root), "--epochs", str(p.epochs),
                "--batch-size", str(p.batch_size), "--lr", repr(p.lr), "--seed", str(p.seed),
                "--val-fraction", repr(p.val_fraction),
                "--out", str(self._store.job_dir(record.id)), "--store", str(self._store.root),
                "--job-id", record.id, "--min-accuracy", repr(policy.min_accuracy),
                "--min-improvement", repr(policy.min_improvement)]
        if policy.max_class_recall_drop is not None:
            args += ["--max-class-recall-drop", repr(policy.max_class_recall_drop)]
        if policy.allow_class_change:
            args.append("--allow-class-change")
        return args

    # --- files ---------------------------------------------------------------------------------

    def _existing(self, job_id: str) -> JobRecord:
        # The winner of a racing submit may not have written its record yet: wait briefly.
        for _ in range(50):
            with contextlib.suppress(NotFound, ValueError):
                return self.get(job_id)
            time.sleep(0.02)
        return self.get(job_id)

    def _finish(self, record: JobRecord, state: JobState, *, error: str = "",
                event: bool = True) -> JobRecord:
        record.state, record.finished_at = state, _now()
        record.error = error if state in (JobState.FAILED, JobState.CANCELLED) else ""
        self._write(record)
        if event:
            self._event(record.id, "state", state=state.value, **({"error": error} if error else {}))
        return record

    def _write(self, record: JobRecord) -> None:
        path = self._store.job_dir(record.id) / RECORD_FILE
        partial = path.with_name(f".{RECORD_FILE}.{os.getpid()}.tmp")
        partial.write_text(json.dumps(record.to_dict(), indent=2) + "\n", encoding="utf-8")
        os.replace(partial, path)

    def _event(self, job_id: str, kind: str, **fields: Any) -> None:
        line = json.dumps({"time": _now(), "type": kind, **fields}) + "\n"
        # One write of one whole line in append mode: readers never see half of it.
        with (self._store.job_dir(job_id) / EVENTS_FILE).open("a", encoding="utf-8") as handle:
            handle.write(line)

    def _events(self, job_id: str) -> list[dict[str, Any]]:
        path = self._store.job_dir(job_id) / EVENTS_FILE
        try:
            lines = path.read_text(encoding="utf-8").splitlines(keepends=True)
        except FileNotFoundError:
            return []
        return [json.loads(line) for line in lines if line.endswith("\n") and line.strip()]

    def _card(self, job_id: str) -> dict[str, Any]:
        try:
            return json.loads((self._store.job_dir(job_id) / "card.json").read_text())
        except (FileNotFoundError, json.JSONDecodeError):
            return {}


def _signal_group(pid: int, sig: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, sig)


def _check(ok: bool, name: str, value: object, expected: str) -> None:
    if not ok:
        raise InvalidInput(f"{name}={value!r} is out of range: expected {expected}")


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds")
