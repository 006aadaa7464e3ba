"""One job's training process: its command line and environment, starting it, heartbeating (the
lease) while it runs, copying its events into a job store that does not read its file, stopping
it (SIGTERM, then SIGKILL after the grace), and recording how it ended."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import os
import signal
from typing import Any

from convserve.contracts.errors import Unavailable
from convserve.contracts.gate_policy import GatePolicy
from convserve.contracts.job_state import JobState, Phase
from convserve.jobs.backend import FILES, JOBS_URL_ENV, JobStore, JobTransaction
from convserve.jobs.config import RunnerConfig
from convserve.jobs.process_group import signal_group
from convserve.jobs.records import JobRecord
from convserve.jobs.transitions import adopt_outcome, adopt_publication, finish, requeue
from convserve.lifecycle import PARENT_PID_ENV
from convserve.store.base import ModelStore
from convserve.store.job_dir import (
    EVENTS_FILE,
    STDERR_FILE,
    STDOUT_FILE,
    EventTail,
    checkpoint_path,
    timestamp,
)
from convserve.store.job_spec import JobSpec

log = logging.getLogger("convserve.jobs")
ERROR_TAIL_LINES = 15
ERROR_MAX_CHARS = 4000


class ChildEvents:
    """What a trainer reads of its child's events.jsonl: the latest epoch, rate and state, and
    (for a job store that does not read the file) the events not yet copied into it."""

    def __init__(self, tail: EventTail | None, *, forward: bool) -> None:
        self._tail, self._forward = tail, forward
        self.pending: list[dict[str, Any]] = []
        self.last_state: str | None = None
        self.epoch: int | None = None
        self.val_accuracy: float | None = None
        self.images_per_s = 0.0

    def copy_into(self, transaction: JobTransaction) -> None:
        """The events not yet in the job store, with the child's own times (the transaction's
        commit is what makes them copied: the caller clears `pending` after it)."""
        for event in self.pending:
            fields = {k: v for k, v in event.items() if k != "type"}
            transaction.event(str(event.get("type", "")), **fields)

    def read(self) -> None:
        for _, event in self._tail.read() if self._tail is not None else ():
            if event is None:
                continue
            if self._forward:
                self.pending.append(event)
            with contextlib.suppress(KeyError, TypeError, ValueError):
                kind = event.get("type")
                if kind == "epoch":
                    self.epoch = int(event["epoch"])
                    self.val_accuracy = float(event["val_accuracy"])
                elif kind == "progress":
                    self.images_per_s = float(event["images_per_s"])
                elif kind == "state":
                    self.last_state = str(event["state"])


class ChildSupervisor:
    def __init__(self, jobs: JobStore, models: ModelStore, config: RunnerConfig) -> None:
        self._jobs, self._models, self._config = jobs, models, config
        self.training_images_per_s = 0.0  # the running job's latest rate (0 when none runs)

    async def run(self, record: JobRecord, stop: asyncio.Event, wake: asyncio.Event) -> None:
        """Run a job this trainer claimed (attempt `record.attempt`) to its end."""
        if stop.is_set():  # stopping as it was claimed: straight back to the queue
            await self._retrying(self._release, record, stop)
            return
        # In a thread, with backoff: an object store brings back the last checkpoint first.
        command = await self._retrying(self.command, record, stop)
        if command is False:  # stopping while the model store is unreachable
            await self._retrying(self._release, record, stop)
            return
        job_dir = self._models.work.job_dir(record.id)
        # A store that copies the events reads only this attempt's; the files store's watcher
        # reads the whole file, and so does this trainer (the last epoch of earlier attempts).
        forward = self._jobs.forwards_child_events
        events = ChildEvents(EventTail(job_dir / EVENTS_FILE, from_end=forward), forward=forward)
        with (job_dir / STDOUT_FILE).open("ab") as out, (job_dir / STDERR_FILE).open("ab") as err:
            process = await asyncio.create_subprocess_exec(
                *command, stdin=asyncio.subprocess.DEVNULL, stdout=out, stderr=err,
                start_new_session=True, env=self._child_env())
        record.pid, record.heartbeat_at = process.pid, timestamp()
        log.info("job %s: started pid %d", record.id, process.pid)
        try:
            saved = await self._retrying(self.heartbeat, record, events, stop)
            outcome = (await self._supervise(process, record, stop, wake, events) if saved
                       else await self._lost(process, record))
        except asyncio.CancelledError:  # the server cancelled the worker task: leave no orphan
            signal_group(process.pid, signal.SIGKILL)
            with contextlib.suppress(Exception):
                self._release(record)
            raise
        finally:
            self.training_images_per_s = 0.0
        await self._retrying(self._conclude, record, process.returncode, outcome, events, stop)

    async def _retrying(self, write: Any, *args: Any) -> Any:
        """Run a job-store (or model-store) call in a thread, again with backoff while the store
        is unreachable, until it succeeds or the trainer stops (the last argument: its event).
        A job left behind that way is reclaimed once its lease lapses."""
        stop: asyncio.Event = args[-1]
        delay, failing = self._config.poll_s, False
        while True:
            try:
                result = await asyncio.to_thread(write, *args[:-1])
            except Unavailable as error:
                if stop.is_set():
                    log.warning("stopping with the job store unreachable: %s", error)
                    return False
                if not failing:  # once per outage, not once per try
                    log.warning("%s; retrying with backoff (up to %.0f s)", error,
                                self._config.max_backoff_s)
                    failing = True
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), delay)
                delay = min(delay * 2, self._config.max_backoff_s)
                continue
            if failing:
                log.info("the job store is reachable again")
            return result

    async def _supervise(self, process: asyncio.subprocess.Process, record: JobRecord,
                         stop: asyncio.Event, wake: asyncio.Event, events: ChildEvents) -> str:
        """Heartbeat while the child runs. Returns "exited", "cancelled", "stopped" or "lost"
        (another attempt took the job over: this trainer was declared dead)."""
        exited = asyncio.ensure_future(process.wait())
        tick = (self._config.forward_s if self._jobs.forwards_child_events
                else self._config.heartbeat_s)
        loop = asyncio.get_running_loop()
        next_beat = loop.time() + self._config.heartbeat_s
        unreachable = False
        try:
            while True:
                if stop.is_set():
                    await self._terminate(process.pid, exited)
                    return "stopped"
                wake.clear()
                await first_of(tick, asyncio.shield(exited), stop.wait(), wake.wait())
                if exited.done():
                    signal_group(process.pid, signal.SIGKILL)  # stragglers of its group only
                    return "exited"
                events.read()
                if not events.pending and loop.time() < next_beat and not wake.is_set():
                    continue
                try:
                    held, cancelled = await asyncio.to_thread(self._beat_and_check, record, events)
                except Unavailable as error:  # the lease runs on; another trainer may take it
                    if not unreachable:
                        log.warning("job %s: heartbeat failed: %s", record.id, error)
                    unreachable = True
                    continue
                if unreachable:
                    log.info("job %s: the job store is reachable again", record.id)
                    unreachable = False
                next_beat = loop.time() + self._config.heartbeat_s
                if not held:
                    return await self._lost(process, record, exited)
                if cancelled:
                    await self._terminate(process.pid, exited)
                    return "cancelled"
        finally:
            if not exited.done():
                exited.cancel()

    async def _lost(self, process: asyncio.subprocess.Process, record: JobRecord,
                    exited: asyncio.Future[int] | None = None) -> str:
        log.warning("job %s: attempt %d lost its claim (this trainer missed its heartbeats and "
                    "the job went back to the queue): stopping its training process", record.id,
                    record.attempt)
        await self._terminate(process.pid, exited or asyncio.ensure_future(process.wait()))
        return "lost"

    async def _terminate(self, pid: int, exited: asyncio.Future[int]) -> None:
        signal_group(pid, signal.SIGTERM)
        try:
            await asyncio.wait_for(asyncio.shield(exited), timeout=self._config.cancel_grace_s)
        except TimeoutError:
            log.warning("training process %d ignored SIGTERM for %.1f s: SIGKILL", pid,
                        self._config.cancel_grace_s)
        # The leader is reaped (or about to be): a pid is never reused while it names a live
        # process group, so this reaches only what the child left behind.
        signal_group(pid, signal.SIGKILL)
        await exited

    def _child_env(self) -> dict[str, str]:
        env = {**os.environ, **(self._config.child_env or {})}
        # The child's fence asks this job store (never in spec.json: it may hold a password),
        # whatever this replica's own environment said (its flag wins there too).
        env[JOBS_URL_ENV] = self._config.jobs_url or FILES
        if self._config.processes == 1:  # under torchrun the ranks' parent is torchrun
            env[PARENT_PID_ENV] = str(os.getpid())  # the child dies with this replica
        return env

    def heartbeat(self, record: JobRecord, events: ChildEvents | None = None) -> bool:
        """Renew the lease of this trainer's attempt; False: another attempt holds the job."""
        return self._beat_and_check(record, events or ChildEvents(None, forward=False))[0]

    def _beat_and_check(self, record: JobRecord, events: ChildEvents) -> tuple[bool, bool]:
        """Renew the lease, record the latest epoch and copy the child's new events, if this
        attempt still holds the job (in one transaction of the job store). Returns (held,
        cancel requested)."""
        events.read()
        self.training_images_per_s = events.images_per_s
        with self._jobs.locked(record.id) as transaction:
            current = transaction.record
            if not current.held_by(self._config.replica_id, record.attempt):
                return False, False
            events.copy_into(transaction)
            current.pid, current.heartbeat_at = record.pid, timestamp()
            if events.epoch is not None:
                current.epoch, current.val_accuracy = events.epoch, events.val_accuracy
            transaction.save()
            cancelled = transaction.cancel_requested
        events.pending.clear()  # committed
        record.heartbeat_at, record.epoch, record.val_accuracy = (
            current.heartbeat_at, current.epoch, current.val_accuracy)
        return True, cancelled

    def end_attempt(self, record: JobRecord, state: JobState, *, error: str = "") -> None:
        with self._jobs.locked(record.id) as transaction:
            if transaction.record.held_by(self._config.replica_id, record.attempt):
                finish(transaction, state, error=error)

    def _release(self, record: JobRecord) -> bool:
        """This trainer stops: the job goes back to the front of the queue, for any trainer to
        continue from its checkpoint (not counted as a lost attempt)."""
        with self._jobs.locked(record.id) as transaction:
            if transaction.record.held_by(self._config.replica_id, record.attempt):
                requeue(transaction, "released", released_by=self._config.replica_id)
        return True

    def _conclude(self, record: JobRecord, code: int | None, outcome: str,
                  events: ChildEvents) -> bool:
        if outcome == "lost":
            return True  # the job is another attempt's now: this one records nothing
        events.read()  # the last epoch's numbers and the child's final state
        with self._jobs.locked(record.id) as transaction:
            current = transaction.record
            if not current.held_by(self._config.replica_id, record.attempt):
                log.warning("job %s: attempt %d lost its claim as it ended: not recorded",
                            record.id, record.attempt)
                return True
            events.copy_into(transaction)
            current.heartbeat_at = timestamp()
            if events.epoch is not None:
                current.epoch, current.val_accuracy = events.epoch, events.val_accuracy
            final_event = events.last_state
            if (outcome != "exited" or code != 0) and adopt_publication(
                    transaction, self._jobs, self._models):
                log.warning("job %s: stopped after its model was published: PROMOTED", record.id)
            elif outcome == "cancelled":
                finish(transaction, JobState.CANCELLED, error="cancelled")
            elif outcome == "stopped":
                # The child (SIGTERM: KeyboardInterrupt) kept its last epoch's checkpoint.
                requeue(transaction, "released", released_by=self._config.replica_id)
            elif final_event == Phase.STOPPED:
                # The child stopped itself, its checkpoint kept (its job store was unreachable
                # when it came to publish, or someone sent it SIGTERM): resume it later.
                requeue(transaction, "released", released_by=self._config.replica_id,
                        reason="its training process stopped before it could publish")
            elif code == 0 and final_event in (JobState.PROMOTED, JobState.REJECTED):
                adopt_outcome(transaction, self._models, JobState(final_event))
            elif code == 0:
                finish(transaction, JobState.FAILED, error="training process exited with code "
                       f"0 but its last state was {final_event!r}, not PROMOTED or REJECTED")
            else:
                # The child writes a FAILED state itself when it fails cleanly (exit 1 or 2); a
                # signal (crash, OOM kill) leaves that to us.
                finish(transaction, JobState.FAILED, error=self._failure(record.id, code),
                       event=final_event != JobState.FAILED)
            state = current.state
        events.pending.clear()
        log.info("job %s: %s", record.id, state.value)
        return True

    def _failure(self, job_id: str, code: int | None) -> str:
        """The child's last error lines, plus what killed it when a signal did."""
        try:
            stderr = (self._models.work.job_dir(job_id) / STDERR_FILE).read_text(errors="replace")
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

    def command(self, record: JobRecord) -> list[str]:
        """Write the job's spec.json (its settings, with this server's own) and return the child's
        command line, which names only the job directory."""
        # The job's run directory is in this replica's work directory (the PostgreSQL job store
        # made no folder); what an earlier attempt saved elsewhere comes back first.
        c, job_dir = self._config, self._models.work.job_dir(record.id, create=True)
        self._models.restore_job_files(record.id, job_dir)
        config = dataclasses.replace(record.params.config, datasets_root=str(c.datasets_root),
                                     compile=c.compile)
        JobSpec(job_id=record.id, config=config, gate=gate_policy_of(record, c),
                store=self._models.location, progress_interval_s=c.progress_interval_s,
                attempt=record.attempt).write(job_dir)
        args = [c.python, "-m", "convserve.training", "--job", str(job_dir)]
        if c.processes > 1:
            # torchrun in the child's process group: a cancel's killpg reaches every rank.
            args[1:3] = ["-m", "torch.distributed.run", "--standalone", "--nproc-per-node",
                         str(c.processes), "-m", "convserve.training"]
        if checkpoint_path(job_dir).exists():
            # An earlier attempt's last finished epoch (none yet: it stopped in epoch 1).
            args.append("--resume")
        return args


def gate_policy_of(record: JobRecord, config: RunnerConfig) -> GatePolicy:
    """The policy resolved when the job was submitted (stored with it); a record from before
    that was stored is resolved against this server's settings."""
    if record.gate_policy is not None:
        return GatePolicy(**record.gate_policy)
    return config.gate_bounds.apply(config.gate_defaults, record.params.gate)


async def first_of(timeout: float, *awaitables: Any) -> None:
    """Wait until one of `awaitables` finishes or `timeout` passes; cancel the rest."""
    tasks = [asyncio.ensure_future(a) for a in awaitables]
    try:
        await asyncio.wait(tasks, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for task in tasks:
            task.cancel()
