"""Training jobs: records in the store, a per-replica FIFO queue, and a child process per job.

A job is a directory `jobs/<id>/` of the shared store:
    job.json          the record (state, parameters, owner replica, pid, heartbeat); replaced
                      atomically (write a temp file, fsync, os.replace)
    events.jsonl      what happened, one JSON object per line: the runner's state changes and the
                      training process's own events (progress, epochs, gate); every writer appends
                      one whole line with one write(2) in O_APPEND mode
    cancel.requested  marker: some replica was asked to cancel the job; its owner acts on it
    stdout.log, stderr.log, card.json, model.onnx, tensorboard/, checkpoints/   from the child
Any replica sharing the store can answer GetJob/WatchJob/ListJobs for any job by reading these
files. A final state is appended to events.jsonl *before* the record turns final, so a watcher
that sees a final record and then reads the file to its end has seen every event.

Each replica runs one job at a time (`python -m convserve.training`, in its own process group so a cancel
ends everything it started), FIFO over the jobs it accepted; the queue itself lives in memory and
the owner heartbeats its queued and running records. A job whose replica died is noticed by its
stale heartbeat (or, on the same host, by the replica's pid being gone) and marked FAILED by
`recover` at start-up.

torch-free: the serving process imports this; only the child imports torch.
"""

from __future__ import annotations

import asyncio
import builtins  # JobRunner.list shadows the builtin inside the class
import contextlib
import dataclasses
import hashlib
import json
import logging
import math
import os
import re
import signal
import socket
import sys
import threading
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from convserve.contracts.gate_policy import GateBounds, GateConfigError, GatePolicy
from convserve.contracts.job_dir import (
    CANCEL_MARKER,
    CARD_FILE,
    EVENTS_FILE,
    RECORD_FILE,
    STDERR_FILE,
    STDOUT_FILE,
    EventTail,
    JobState,
    append_event,
    checkpoint_path,
    last_state,
    timestamp,
)
from convserve.contracts.spec import AUGMENT_MODES, SCHEDULES, TrainConfig  # dataclasses only: no torch
from convserve.errors import AlreadyExists, Conflict, InvalidInput, LimitExceeded, NotFound, Unavailable
from convserve.lifecycle import PARENT_PID_ENV
from convserve.store import IntegrityError, InvalidJobId, ModelStore

log = logging.getLogger("convserve.jobs")

ERROR_TAIL_LINES = 15
ERROR_MAX_CHARS = 4000
MAX_IDEMPOTENCY_KEY = 256
MAX_BATCH_SIZE = 4096
MAX_SEED = 2**32 - 1  # the child derives per-epoch seeds as seed * 1_000_003 + epoch (< 2**64)
DATASET_RE = re.compile(r"digits|cifar10|synthetic(:[0-9]{1,9})?|folder:[A-Za-z0-9._/-]{1,200}")
DATASET_FORMS = "digits, cifar10, synthetic, synthetic:<n>, folder:<relative path>"
_GATE_NUMBERS = ("min_accuracy", "min_improvement", "max_class_recall_drop")


# --- records ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TrainParams:
    """A Train request's parameters (the servicer maps the proto's zeros to defaults)."""

    dataset: str = "digits"
    epochs: int = 10
    batch_size: int = 64
    lr: float = 1e-3
    seed: int = 0
    val_fraction: float = 0.2
    gate: dict[str, Any] = field(default_factory=dict)  # overrides of the server's gate defaults
    augment: str = TrainConfig.augment
    schedule: str = TrainConfig.schedule
    label_smoothing: float = TrainConfig.label_smoothing
    weight_decay: float = TrainConfig.weight_decay

    def validate(self, max_epochs: int = 200, gate_defaults: GatePolicy | None = None,
                 gate_bounds: GateBounds | None = None) -> GatePolicy:
        """Refuse what the child would refuse (or should never see); returns the gate policy."""
        if (not isinstance(self.dataset, str) or not DATASET_RE.fullmatch(self.dataset)
                or ".." in self.dataset.split("/") or self.dataset.startswith("folder:/")):
            raise InvalidInput(f"unknown dataset {self.dataset!r}: expected one of {DATASET_FORMS}")
        _check_int("epochs", self.epochs, 1, max_epochs)
        _check_int("batch_size", self.batch_size, 1, MAX_BATCH_SIZE)
        _check_int("seed", self.seed, 0, MAX_SEED)
        _check_number("lr", self.lr, 0 < _num(self.lr) <= 1, "a number in (0, 1]")
        _check_number("val_fraction", self.val_fraction, 0 < _num(self.val_fraction) < 1,
                      "a number in (0, 1)")
        if self.augment not in AUGMENT_MODES:
            raise InvalidInput(f"augment={self.augment!r}: expected one of {list(AUGMENT_MODES)}")
        if self.schedule not in SCHEDULES:
            raise InvalidInput(f"schedule={self.schedule!r}: expected one of {list(SCHEDULES)}")
        _check_number("label_smoothing", self.label_smoothing,
                      0 <= _num(self.label_smoothing) < 1, "a number in [0, 1)")
        _check_number("weight_decay", self.weight_decay, 0 <= _num(self.weight_decay) <= 1,
                      "a number in [0, 1]")
        if not isinstance(self.gate, dict):
            raise InvalidInput(f"gate overrides must be a mapping, got {type(self.gate).__name__}")
        for name in _GATE_NUMBERS:
            value = self.gate.get(name)
            optional = name == "max_class_recall_drop" and value is None  # None: not checked
            if name in self.gate and not optional and not _is_number(value):
                raise InvalidInput(f"gate override {name}={value!r}: expected a number")
        if not isinstance(self.gate.get("allow_class_change", False), bool):
            raise InvalidInput(f"gate override allow_class_change="
                               f"{self.gate['allow_class_change']!r}: expected true or false")
        try:
            return (gate_bounds or GateBounds()).apply(gate_defaults or GatePolicy(), self.gate)
        except GateConfigError as error:
            raise InvalidInput(f"gate overrides: {error}") from None

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> TrainParams:
        return cls(**_known(cls, values))


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
    resumes: int = 0                    # times it was continued after an interruption

    def to_dict(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "state": self.state.value,
                "params": self.params.to_dict()}

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> JobRecord:
        """Unknown keys are ignored, so a replica can read records a newer one wrote."""
        return cls(**{**_known(cls, values), "state": JobState(values["state"]),
                      "params": TrainParams.from_dict(values["params"])})


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
    compile: str = "auto"                     # the child's --compile
    progress_interval_s: float = 1.0          # the child's --progress-interval-s
    processes: int = 1                        # > 1: data-parallel under torchrun (one per GPU)


# --- the runner -----------------------------------------------------------------------------------


class JobRunner:
    """Submit/get/list/cancel/watch from any thread or coroutine; `run` is the worker.

    `submit` and `cancel` may block briefly (file I/O; `cancel` of a running job waits for the
    child to end): call them from a worker thread in async code, as the servicers do.
    """

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

    # --- requests ---------------------------------------------------------------------------

    def validate(self, params: TrainParams) -> GatePolicy:
        c = self._config
        policy = params.validate(c.max_epochs, c.gate_defaults, c.gate_bounds)
        if isinstance(params.batch_size, int) and params.batch_size % c.processes:
            raise InvalidInput(f"batch_size={params.batch_size}: this server trains with "
                               f"{c.processes} processes, so the (global) batch size must be a "
                               f"multiple of {c.processes}")
        return policy

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
        _touch(self._store.job_dir(job_id) / CANCEL_MARKER)
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

    # --- the worker -------------------------------------------------------------------------

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
                await _first_of(self._config.heartbeat_s, stop.wait(), self._wake.wait())
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

    async def _run_job(self, job_id: str, stop: asyncio.Event) -> None:
        record = self.get(job_id)
        job_dir = self._store.job_dir(job_id)
        if record.state.final:
            return
        if (job_dir / CANCEL_MARKER).exists():
            self._finish(record, JobState.CANCELLED, error="cancelled while queued")
            return
        command = self.command(record)
        self._append_event(job_id, "state", state=JobState.RUNNING.value,
                           replica=self._config.replica_id)
        with (job_dir / STDOUT_FILE).open("ab") as out, (job_dir / STDERR_FILE).open("ab") as err:
            process = await asyncio.create_subprocess_exec(
                *command, stdin=asyncio.subprocess.DEVNULL, stdout=out, stderr=err,
                start_new_session=True, env=self._child_env())
        record.state, record.pid = JobState.RUNNING, process.pid
        record.started_at = record.heartbeat_at = timestamp()
        with self._lock:
            self._write(record)
        log.info("job %s: started pid %d", job_id, process.pid)
        tail = EventTail(job_dir / EVENTS_FILE)
        try:
            outcome = await self._supervise(process, record, stop, tail)
        except asyncio.CancelledError:  # the server cancelled the worker task: leave no orphan
            _signal_group(process.pid, signal.SIGKILL)
            self._finish(record, JobState.INTERRUPTED, error=_stopped_message(record))
            raise
        finally:
            self.training_images_per_s = 0.0
        self._conclude(record, process.returncode, outcome, tail)

    async def _supervise(self, process: asyncio.subprocess.Process, record: JobRecord,
                         stop: asyncio.Event, tail: EventTail) -> str:
        """Heartbeat while the child runs. Returns "exited", "cancelled" or "stopped"."""
        assert self._wake is not None
        marker = self._store.job_dir(record.id) / CANCEL_MARKER
        exited = asyncio.ensure_future(process.wait())
        try:
            while True:
                for reason, asked in (("cancelled", marker.exists()), ("stopped", stop.is_set())):
                    if asked:
                        await self._terminate(process.pid, exited)
                        return reason
                self._wake.clear()
                await _first_of(self._config.heartbeat_s, asyncio.shield(exited), stop.wait(),
                                self._wake.wait())
                if exited.done():
                    _signal_group(process.pid, signal.SIGKILL)  # stragglers of its group only
                    return "exited"
                self._beat(record, tail)
                self._heartbeat_queued()
        finally:
            if not exited.done():
                exited.cancel()

    async def _terminate(self, pid: int, exited: asyncio.Future[int]) -> None:
        _signal_group(pid, signal.SIGTERM)
        try:
            await asyncio.wait_for(asyncio.shield(exited), timeout=self._config.cancel_grace_s)
        except TimeoutError:
            log.warning("training process %d ignored SIGTERM for %.1f s: SIGKILL", pid,
                        self._config.cancel_grace_s)
        # The leader is reaped (or about to be): a pid is never reused while it names a live
        # process group, so this reaches only what the child left behind.
        _signal_group(pid, signal.SIGKILL)
        await exited

    def _child_env(self) -> dict[str, str]:
        env = {**os.environ, **(self._config.child_env or {})}
        if self._config.processes == 1:  # under torchrun the ranks' parent is torchrun
            env[PARENT_PID_ENV] = str(os.getpid())  # the child dies with this replica
        return env

    def _beat(self, record: JobRecord, tail: EventTail) -> None:
        record.heartbeat_at = timestamp()
        self._absorb(record, tail)
        with self._lock:
            self._write(record)

    def _absorb(self, record: JobRecord, tail: EventTail) -> None:
        """Take epoch and val_accuracy from the "epoch" events written since the last call, and
        the training rate from the latest "progress" event."""
        for _, event in tail.read():
            if event is None:
                continue
            with contextlib.suppress(KeyError, TypeError, ValueError):
                if event.get("type") == "epoch":
                    record.epoch = int(event["epoch"])
                    record.val_accuracy = float(event["val_accuracy"])
                elif event.get("type") == "progress":
                    self.training_images_per_s = float(event["images_per_s"])

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

    def _conclude(self, record: JobRecord, code: int | None, outcome: str,
                  tail: EventTail) -> None:
        record.heartbeat_at = timestamp()
        self._absorb(record, tail)  # the last epoch's numbers
        final_event = last_state(self._store.job_dir(record.id) / EVENTS_FILE)
        if (outcome != "exited" or code != 0) and self._adopt_publication(record):
            log.warning("job %s: stopped after its model was published: PROMOTED", record.id)
        elif outcome == "cancelled":
            self._finish(record, JobState.CANCELLED, error="cancelled")
        elif outcome == "stopped":
            # The child (SIGTERM: KeyboardInterrupt) wrote INTERRUPTED itself when it could.
            self._finish(record, JobState.INTERRUPTED, error=_stopped_message(record),
                         event=final_event != JobState.INTERRUPTED)
        elif code == 0 and final_event in (JobState.PROMOTED, JobState.REJECTED):
            self._adopt_outcome(record, JobState(final_event))
        elif code == 0:
            self._finish(record, JobState.FAILED, error="training process exited with code 0 "
                         f"but its last state was {final_event!r}, not PROMOTED or REJECTED")
        else:
            # The child writes a FAILED state itself when it fails cleanly (exit 1 or 2); a
            # signal (crash, OOM kill) leaves that to us.
            self._finish(record, JobState.FAILED, error=self._failure(record.id, code),
                         event=final_event != JobState.FAILED)
        log.info("job %s: %s", record.id, record.state.value)

    def _failure(self, job_id: str, code: int | None) -> str:
        """The child's last error lines, plus what killed it when a signal did."""
        try:
            stderr = (self._store.job_dir(job_id) / STDERR_FILE).read_text(errors="replace")
        except FileNotFoundError:
            stderr = ""
        lines = [line.rstrip() for line in stderr.splitlines() if line.strip()]
        lines = lines[-ERROR_TAIL_LINES:]
        if code is not None and code < 0:
            try:
                name = signal.Signals(-code).name
            except ValueError:
                name = f"signal {-code}"
            lines.append(f"training process exited with code {code} (killed by {name})")
        elif not lines:
            lines.append(f"training process exited with code {code}")
        return "\n".join(lines)[-ERROR_MAX_CHARS:]

    def command(self, record: JobRecord) -> builtins.list[str]:
        """The child's command line for this job."""
        p, c = record.params, self._config
        policy = c.gate_bounds.apply(c.gate_defaults, p.gate)
        launcher = [c.python, "-m", "convserve.training"]
        if c.processes > 1:
            # torchrun in the child's process group: a cancel's killpg reaches every rank.
            launcher = [c.python, "-m", "torch.distributed.run", "--standalone",
                        "--nproc-per-node", str(c.processes), "-m", "convserve.training"]
        args = [*launcher, "--dataset", p.dataset,
                "--datasets-root", str(c.datasets_root), "--epochs", str(p.epochs),
                "--batch-size", str(p.batch_size), "--lr", repr(float(p.lr)),
                "--seed", str(p.seed), "--val-fraction", repr(float(p.val_fraction)),
                "--out", str(self._store.job_dir(record.id)), "--store", str(self._store.root),
                "--job-id", record.id, "--compile", c.compile,
                "--progress-interval-s", repr(float(c.progress_interval_s)),
                "--augment", p.augment, "--schedule", p.schedule,
                "--label-smoothing", repr(float(p.label_smoothing)),
                "--weight-decay", repr(float(p.weight_decay)),
                "--min-accuracy", repr(float(policy.min_accuracy)),
                "--min-improvement", repr(float(policy.min_improvement))]
        if policy.max_class_recall_drop is not None:
            args += ["--max-class-recall-drop", repr(float(policy.max_class_recall_drop))]
        if policy.allow_class_change:
            args.append("--allow-class-change")
        if record.resumes and checkpoint_path(self._store.job_dir(record.id)).exists():
            args.append("--resume")  # no checkpoint yet (stopped in epoch 1): start over
        return args

    # --- recovery -----------------------------------------------------------------------------

    def recover(self) -> builtins.list[str]:
        """At start-up: mark FAILED every unfinished job whose replica is gone; returns the ids.

        Gone means: its heartbeat (or, never heartbeaten, its creation) is older than
        `stale_after_s`, or its replica ran on this host and that process no longer exists (or
        carried this replica's own id, as a restarted container with the same hostname and pid
        does). We mark such jobs FAILED rather than resume them: resuming needs the checkpoint, a
        lease that no other replica also resumes it, and the caller's consent to a run that
        mixes two processes; a new Train (jobs/<id>/checkpoints kept for a deliberate retry) is
        simpler and honest. A training process the dead replica left running on this host is
        killed, so it cannot publish a model after its job was declared FAILED.
        """
        recovered = []
        now = datetime.now(UTC)
        for job_id in self._store.job_ids():
            with self._lock:
                if job_id in self._queue or job_id == self._current:
                    continue
            try:
                record = self.get(job_id)
            except (NotFound, IntegrityError):
                continue
            if record.state.final:
                continue
            last = record.heartbeat_at or record.created_at
            age = _age_s(last, now)
            gone = self._replica_gone(record)
            if not gone and age <= self._config.stale_after_s:
                continue
            if gone:
                self._stop_orphan(record)
            self._reconcile(record, last)
            recovered.append(job_id)
        return recovered

    def _reconcile(self, record: JobRecord, last_heartbeat: str) -> None:
        """Record what really happened to a job whose replica died, from its events: its child
        may have finished on its own (published: PROMOTED with its version, or REJECTED), or
        stopped cleanly when the replica died (INTERRUPTED: resumable), or nothing says."""
        job_dir = self._store.job_dir(record.id)
        final_event = last_state(job_dir / EVENTS_FILE)
        if self._adopt_publication(record):
            log.warning("job %s: its replica died, but its model was published as version %s",
                        record.id, record.model_version)
        elif final_event in (JobState.PROMOTED, JobState.REJECTED):
            self._adopt_outcome(record, JobState(final_event))
            log.warning("job %s: its replica died, but its child finished: %s", record.id,
                        final_event)
        elif final_event == JobState.INTERRUPTED:
            self._finish(record, JobState.INTERRUPTED, event=False, error=(
                f"interrupted: its replica ({record.replica}) stopped; resume it with "
                f"`convserve resume {record.id}` (Train with resume_job)"))
        else:
            who = "running" if record.state == JobState.RUNNING else "queuing"
            self._finish(record, JobState.FAILED, error=(
                f"interrupted: the replica {who} it ({record.replica}) stopped (last heartbeat "
                f"{last_heartbeat}); start a new Train to retry — checkpoints in "
                f"jobs/{record.id}/checkpoints"))

    def _adopt_publication(self, record: JobRecord) -> bool:
        """If the store holds a version this job published, record the job PROMOTED with it,
        whatever its events say (a stop can land between the publish and the child's last
        event): the store is the truth. True when it did."""
        for version in reversed(self._store.versions()):
            try:
                card = self._store.card(version)
            except Exception:  # an unreadable card is the store's problem, not this job's
                continue
            if card.get("job_id") == record.id:
                record.model_version, record.gate = version, _gate_of(card)
                if last_state(self._store.job_dir(record.id) / EVENTS_FILE) != JobState.PROMOTED:
                    self._append_event(record.id, "state", state=JobState.PROMOTED.value,
                                       version=version, reconciled=True)
                self._finish(record, JobState.PROMOTED, event=False)
                return True
        return False

    def _adopt_outcome(self, record: JobRecord, state: JobState) -> None:
        """A final PROMOTED/REJECTED the child wrote itself: take its gate decision and version
        from the job's card (the child wrote its final state event too)."""
        card = self._card(record.id)
        record.gate = _gate_of(card)
        version = card.get("version")
        record.model_version = version if isinstance(version, int) else None
        self._finish(record, state, event=False)

    def _replica_gone(self, record: JobRecord) -> bool:
        host, _, pid = record.replica.rpartition(":")
        if host != socket.gethostname():
            return False  # another host: only its heartbeat can tell
        if record.replica == self._config.replica_id:
            return True  # our id, yet not a job we hold: an earlier process with the same id
        try:
            os.kill(int(pid), 0)
        except (ProcessLookupError, ValueError):
            return True
        except PermissionError:
            return False
        return False

    def _stop_orphan(self, record: JobRecord) -> None:
        """Stop the job's training process group if it still runs on this host (checked by its
        command line, so a reused pid is left alone): SIGTERM, so it records INTERRUPTED and
        keeps its checkpoint, then SIGKILL after `cancel_grace_s`. (A child started by a
        replica gets SIGTERM by itself when that replica dies: see convserve.lifecycle.)"""
        if not record.pid or not _is_training_process(record.pid, record.id):
            return
        log.warning("job %s: stopping its orphaned training process %d", record.id, record.pid)
        _signal_group(record.pid, signal.SIGTERM)
        deadline = time.monotonic() + self._config.cancel_grace_s
        while time.monotonic() < deadline and _is_training_process(record.pid, record.id):
            time.sleep(0.05)
        _signal_group(record.pid, signal.SIGKILL)

    # --- files ------------------------------------------------------------------------------

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

    def _card(self, job_id: str) -> dict[str, Any]:
        try:
            card = json.loads((self._store.job_dir(job_id) / CARD_FILE).read_text("utf-8"))
        except (OSError, ValueError):
            return {}
        return card if isinstance(card, dict) else {}

    def _wake_worker(self) -> None:
        loop, wake = self._loop, self._wake
        if loop is not None and wake is not None and not loop.is_closed():
            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(wake.set)


async def _first_of(timeout: float, *awaitables: Any) -> None:
    """Wait until one of `awaitables` finishes or `timeout` passes; cancel the rest."""
    tasks = [asyncio.ensure_future(a) for a in awaitables]
    try:
        await asyncio.wait(tasks, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for task in tasks:
            task.cancel()


def _gate_of(card: dict[str, Any]) -> dict[str, Any] | None:
    gate = card.get("gate")
    return gate if isinstance(gate, dict) else None


def _is_training_process(pid: int, job_id: str) -> bool:
    """A live (not zombie) process running this job's training, by its command line."""
    try:
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    zombie = stat.rsplit(")", 1)[-1].split()[:1] == ["Z"]
    return not zombie and b"convserve.training" in argv and job_id.encode() in argv


def _signal_group(pid: int, sig: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, sig)


def _stopped_message(record: JobRecord) -> str:
    return (f"interrupted: the server stopped after epoch {record.epoch}; resume with "
            f"Train(resume_job={record.id!r}) or `convserve resume {record.id}`: it continues "
            "from its last finished epoch")


def _touch(path: Path) -> None:
    os.close(os.open(path, os.O_WRONLY | os.O_CREAT, 0o644))


def _known(cls: type, values: dict[str, Any]) -> dict[str, Any]:
    names = {f.name for f in dataclasses.fields(cls)}
    return {k: v for k, v in values.items() if k in names}


def _is_number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def _num(value: object) -> float:
    return float(value) if _is_number(value) else math.nan  # type: ignore[arg-type]


def _check_int(name: str, value: object, low: int, high: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise InvalidInput(f"{name}={value!r} is out of range: expected an integer in "
                           f"{low}..{high}")


def _check_number(name: str, value: object, ok: bool, expected: str) -> None:
    if not ok:
        raise InvalidInput(f"{name}={value!r} is out of range: expected {expected}")


def _age_s(iso_time: str, now: datetime) -> float:
    try:
        then = datetime.fromisoformat(iso_time)
    except (TypeError, ValueError):
        return math.inf  # unreadable: as good as no heartbeat at all
    if then.tzinfo is None:
        then = then.replace(tzinfo=UTC)
    return (now - then).total_seconds()
