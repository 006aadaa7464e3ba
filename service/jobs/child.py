"""One job's training process: its command line and environment, starting it, heartbeating while
it runs, stopping it (SIGTERM, then SIGKILL after the grace), and recording how it ended."""

from __future__ import annotations

import asyncio
import builtins
import contextlib
import dataclasses
import logging
import os
import signal
from typing import Any

from convserve.contracts.job_dir import (
    CANCEL_MARKER,
    EVENTS_FILE,
    STDERR_FILE,
    STDOUT_FILE,
    EventTail,
    JobState,
    checkpoint_path,
    last_state,
    timestamp,
)
from convserve.contracts.job_spec import JobSpec
from convserve.jobs.process_group import signal_group
from convserve.jobs.records import JobRecord
from convserve.jobs.recovery import Recovery
from convserve.lifecycle import PARENT_PID_ENV

log = logging.getLogger("convserve.jobs")
ERROR_TAIL_LINES = 15
ERROR_MAX_CHARS = 4000


class ChildSupervision(Recovery):
    async def _run_job(self, record: JobRecord, stop: asyncio.Event) -> None:
        """Run a job this trainer claimed (attempt `record.attempts[-1]`) to its end."""
        job_id, job_dir = record.id, self._store.job_dir(record.id)
        if stop.is_set():  # stopping as it was claimed: straight back to the queue
            self._release(record)
            return
        command = self.command(record)
        with (job_dir / STDOUT_FILE).open("ab") as out, (job_dir / STDERR_FILE).open("ab") as err:
            process = await asyncio.create_subprocess_exec(
                *command, stdin=asyncio.subprocess.DEVNULL, stdout=out, stderr=err,
                start_new_session=True, env=self._child_env())
        record.pid, record.heartbeat_at = process.pid, timestamp()
        log.info("job %s: started pid %d", job_id, process.pid)
        tail = EventTail(job_dir / EVENTS_FILE)
        try:
            saved = await asyncio.to_thread(self._save, record)
            outcome = (await self._supervise(process, record, stop, tail) if saved
                       else await self._lost(process, record))
        except asyncio.CancelledError:  # the server cancelled the worker task: leave no orphan
            signal_group(process.pid, signal.SIGKILL)
            self._release(record)
            raise
        finally:
            self.training_images_per_s = 0.0
        await asyncio.to_thread(self._conclude, record, process.returncode, outcome, tail)

    async def _supervise(self, process: asyncio.subprocess.Process, record: JobRecord,
                         stop: asyncio.Event, tail: EventTail) -> str:
        """Heartbeat while the child runs. Returns "exited", "cancelled", "stopped" or "lost"
        (another attempt took the job over: this trainer was declared dead)."""
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
                await first_of(self._config.heartbeat_s, asyncio.shield(exited), stop.wait(),
                                self._wake.wait())
                if exited.done():
                    signal_group(process.pid, signal.SIGKILL)  # stragglers of its group only
                    return "exited"
                if not await asyncio.to_thread(self._beat, record, tail):
                    return await self._lost(process, record, exited)
        finally:
            if not exited.done():
                exited.cancel()

    async def _lost(self, process: asyncio.subprocess.Process, record: JobRecord,
                    exited: asyncio.Future[int] | None = None) -> str:
        log.warning("job %s: attempt %d lost its claim (this trainer missed its heartbeats and "
                    "the job went back to the queue): stopping its training process", record.id,
                    record.attempts[-1].number)
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
        if self._config.processes == 1:  # under torchrun the ranks' parent is torchrun
            env[PARENT_PID_ENV] = str(os.getpid())  # the child dies with this replica
        return env

    def _beat(self, record: JobRecord, tail: EventTail) -> bool:
        """Record the heartbeat and the latest epoch; False: the claim is lost."""
        record.heartbeat_at = timestamp()
        self._absorb(record, tail)
        return self._save(record)

    def _save(self, record: JobRecord) -> bool:
        """Write this trainer's record of its running attempt, if the attempt still holds the
        job (under the job's lock); False when it does not."""
        with self._job_locked(record.id):
            if not self._holds(record):
                return False
            self._write(record)
            return True

    def _holds(self, record: JobRecord) -> bool:
        """Under the job's lock: is this trainer's attempt still the job's running one?"""
        return self.get(record.id).held_by(self._config.replica_id, record.attempts[-1].number)

    def _end_attempt(self, record: JobRecord, state: JobState, *, error: str = "") -> None:
        with self._job_locked(record.id):
            if self._holds(record):
                self._finish(record, state, error=error)

    def _release(self, record: JobRecord) -> None:
        """This trainer stops: the job goes back to the front of the queue, for any trainer to
        continue from its checkpoint (not counted as a lost attempt)."""
        with self._job_locked(record.id):
            if self._holds(record):
                self._requeue(record, "released", released_by=self._config.replica_id)

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

    def _conclude(self, record: JobRecord, code: int | None, outcome: str,
                  tail: EventTail) -> None:
        if outcome == "lost":
            return  # the job is another attempt's now: this one records nothing
        record.heartbeat_at = timestamp()
        self._absorb(record, tail)  # the last epoch's numbers
        with self._job_locked(record.id):
            if not self._holds(record):
                log.warning("job %s: attempt %d lost its claim as it ended: not recorded",
                            record.id, record.attempts[-1].number)
                return
            final_event = last_state(self._store.job_dir(record.id) / EVENTS_FILE)
            if (outcome != "exited" or code != 0) and self._adopt_publication(record):
                log.warning("job %s: stopped after its model was published: PROMOTED", record.id)
            elif outcome == "cancelled":
                self._finish(record, JobState.CANCELLED, error="cancelled")
            elif outcome == "stopped":
                # The child (SIGTERM: KeyboardInterrupt) kept its last epoch's checkpoint.
                self._requeue(record, "released", released_by=self._config.replica_id)
            elif code == 0 and final_event in (JobState.PROMOTED, JobState.REJECTED):
                self._adopt_outcome(record, JobState(final_event))
            elif code == 0:
                self._finish(record, JobState.FAILED, error="training process exited with code "
                             f"0 but its last state was {final_event!r}, not PROMOTED or "
                             "REJECTED")
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
        """Write the job's spec.json (its settings, with this server's own) and return the child's
        command line, which names only the job directory."""
        c, job_dir = self._config, self._store.job_dir(record.id)
        config = dataclasses.replace(record.params.config, datasets_root=str(c.datasets_root),
                                     compile=c.compile)
        JobSpec(job_id=record.id, config=config,
                gate=c.gate_bounds.apply(c.gate_defaults, record.params.gate),
                store=str(self._store.root), progress_interval_s=c.progress_interval_s,
                attempt=record.attempts[-1].number if record.attempts else 0).write(job_dir)
        args = [c.python, "-m", "convserve.training", "--job", str(job_dir)]
        if c.processes > 1:
            # torchrun in the child's process group: a cancel's killpg reaches every rank.
            args[1:3] = ["-m", "torch.distributed.run", "--standalone", "--nproc-per-node",
                         str(c.processes), "-m", "convserve.training"]
        if checkpoint_path(job_dir).exists():
            # An earlier attempt's last finished epoch (none yet: it stopped in epoch 1).
            args.append("--resume")
        return args


async def first_of(timeout: float, *awaitables: Any) -> None:
    """Wait until one of `awaitables` finishes or `timeout` passes; cancel the rest."""
    tasks = [asyncio.ensure_future(a) for a in awaitables]
    try:
        await asyncio.wait(tasks, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for task in tasks:
            task.cancel()

