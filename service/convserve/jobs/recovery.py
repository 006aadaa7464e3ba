"""What a trainer does about jobs whose trainer died: put them back in the queue (up to
`max_attempts` lost runs), or record their real outcome; stop any training process of theirs
still running on this host; and have the job store repair what a crash left half-written."""

from __future__ import annotations

import logging
import os
import signal
import socket
import time
from collections.abc import Callable

from convserve.contracts.errors import IntegrityError, NotFound
from convserve.contracts.job_state import JobState
from convserve.jobs.backend import JobStore, JobTransaction
from convserve.jobs.config import RunnerConfig
from convserve.jobs.process_group import is_training_process, signal_group
from convserve.jobs.records import JobRecord
from convserve.jobs.transitions import adopt_outcome, adopt_publication, finish, requeue
from convserve.store.base import ModelStore

log = logging.getLogger("convserve.jobs")


class Recovery:
    def __init__(self, jobs: JobStore, models: ModelStore, config: RunnerConfig,
                 running_here: Callable[[str], bool], wake: Callable[[], None]) -> None:
        self._jobs, self._models, self._config = jobs, models, config
        self._running_here = running_here   # job ids this trainer runs itself are not orphans
        self._wake = wake

    def recover(self) -> list[str]:
        """Reclaim every RUNNING job whose trainer is gone; returns the ids it acted on.

        Gone means: its lease lapsed (no heartbeat for `stale_after_s`), or its trainer ran on
        this host and that process no longer exists (or carried this replica's own id, as a
        restarted container with the same hostname and pid does). A training process the dead
        trainer left running on this host is stopped first (its checkpoint stays). The job then
        goes back to the queue and resumes from its checkpoint on whichever trainer claims it,
        unless it had already finished (its model published, or the child's own final event),
        was cancelled, or has lost `max_attempts` runs this way: then FAILED. A trainer that
        only hung and comes back finds its claim gone (convserve.jobs.child: it stops its
        child, whose fence keeps it from publishing).
        """
        self._jobs.repair()
        candidates = set(self._jobs.expired())
        candidates |= {r.id for r in self._jobs.running() if self._process_gone(r)}
        recovered = []
        for job_id in sorted(candidates):
            if self._running_here(job_id):
                continue
            try:
                with self._jobs.locked(job_id) as transaction:
                    record = transaction.record  # as it is now, under the lock
                    if record.state != JobState.RUNNING or not (
                            transaction.lease_expired or self._process_gone(record)):
                        continue
                    self._stop_orphan(record)
                    self._reconcile(transaction)
            except (NotFound, IntegrityError):
                continue
            recovered.append(job_id)
        return recovered

    def _reconcile(self, transaction: JobTransaction) -> None:
        """Decide what happens to a job whose trainer died: its child may have finished on its
        own (published: PROMOTED with its version, or REJECTED), it may have been cancelled
        meanwhile, or it goes back to the queue."""
        record = transaction.record
        final_event = self._jobs.last_state(record.id)
        trainer = record.trainer or record.replica
        if adopt_publication(transaction, self._jobs, self._models):
            log.warning("job %s: its trainer died, but its model was published as version %s",
                        record.id, record.model_version)
        elif final_event in (JobState.PROMOTED, JobState.REJECTED):
            adopt_outcome(transaction, self._models, JobState(final_event))
            log.warning("job %s: its trainer died, but its child finished: %s", record.id,
                        final_event)
        elif transaction.cancel_requested:
            finish(transaction, JobState.CANCELLED,
                   error=f"cancelled (its trainer {trainer} stopped)")
        elif record.lost_attempts + 1 >= self._config.max_attempts:
            record.end_attempt("lost", record.heartbeat_at)
            trainers = ", ".join(a.trainer for a in record.attempts if a.outcome == "lost")
            finish(transaction, JobState.FAILED, error=(
                f"its trainer died {record.lost_attempts} times ({trainers}); not retried again "
                f"(--max-job-attempts {self._config.max_attempts}); start a new Train to retry — "
                f"checkpoints in jobs/{record.id}/checkpoints"))
        else:
            log.warning("job %s: its trainer %s is gone (last heartbeat %s): back in the queue",
                        record.id, trainer, record.heartbeat_at)
            requeue(transaction, "lost", reclaimed_from=trainer)
            self._wake()

    def _process_gone(self, record: JobRecord) -> bool:
        trainer = record.trainer or record.replica  # a record an older version wrote
        host, _, pid = trainer.rpartition(":")
        if host != socket.gethostname():
            return False  # another host: only its lease can tell
        if trainer == self._config.replica_id:
            return not self._running_here(record.id)  # our id: an earlier process's job
        try:
            os.kill(int(pid), 0)
        except (ProcessLookupError, ValueError):
            return True
        except PermissionError:
            return False
        return False

    def _stop_orphan(self, record: JobRecord) -> None:
        """Stop the job's training process group if it still runs on this host (checked by its
        command line, so a reused pid is left alone): SIGTERM, so it records STOPPED and
        keeps its checkpoint, then SIGKILL after `cancel_grace_s`. (A child started by a
        replica gets SIGTERM by itself when that replica dies: see convserve.lifecycle.)"""
        if not record.pid or not is_training_process(record.pid, record.id):
            return
        log.warning("job %s: stopping its orphaned training process %d", record.id, record.pid)
        signal_group(record.pid, signal.SIGTERM)
        deadline = time.monotonic() + self._config.cancel_grace_s
        while time.monotonic() < deadline and is_training_process(record.pid, record.id):
            time.sleep(0.05)
        signal_group(record.pid, signal.SIGKILL)
