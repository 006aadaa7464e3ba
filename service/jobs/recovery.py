"""What a trainer does about jobs whose trainer died: put them back in the queue (up to
`max_attempts` lost runs), or record their real outcome from their files; stop any training
process of theirs still running on this host; and queue again a job whose queue file a crash
lost."""

from __future__ import annotations

import builtins
import logging
import os
import signal
import socket
import time
from datetime import UTC, datetime

from convserve.contracts.job_dir import CANCEL_MARKER, EVENTS_FILE, JobState, last_state
from convserve.contracts.store import IntegrityError
from convserve.errors import NotFound
from convserve.jobs.process_group import is_training_process, signal_group
from convserve.jobs.records import JobRecord, RecordKeeping, age_s

log = logging.getLogger("convserve.jobs")


class Recovery(RecordKeeping):
    def recover(self) -> builtins.list[str]:
        """Reclaim every RUNNING job whose trainer is gone; returns the ids it acted on.

        Gone means: its heartbeat (or, never heartbeaten, its creation) is older than
        `stale_after_s`, or its trainer ran on this host and that process no longer exists (or
        carried this replica's own id, as a restarted container with the same hostname and pid
        does). A training process the dead trainer left running on this host is stopped first
        (its checkpoint stays). The job then goes back to the queue and resumes from its
        checkpoint on whichever trainer claims it, unless it had already finished (its model
        published, or the child's own final event), was cancelled, or has lost `max_attempts`
        runs this way: then FAILED. A trainer that only hung and comes back finds its claim
        gone (convserve.jobs.child: it stops its child, which never publishes either).
        """
        recovered = []
        now = datetime.now(UTC)
        queued = set(self._queue.job_ids())
        for job_id in self._store.job_ids():
            with self._lock:
                if job_id == self._current:
                    continue
            try:
                record = self.get(job_id)
            except (NotFound, IntegrityError):
                continue
            if record.state == JobState.QUEUED and job_id not in queued:
                self._queue_lost_file(record, now)
            if record.state != JobState.RUNNING or not self._trainer_gone(record, now):
                continue
            with self._job_locked(job_id):
                record = self.get(job_id)  # as it is now, under the lock
                if record.state != JobState.RUNNING or not self._trainer_gone(record, now):
                    continue
                self._stop_orphan(record)
                self._reconcile(record)
            recovered.append(job_id)
        return recovered

    def _trainer_gone(self, record: JobRecord, now: datetime) -> bool:
        last = record.heartbeat_at or record.created_at
        return age_s(last, now) > self._config.stale_after_s or self._process_gone(record)

    def _queue_lost_file(self, record: JobRecord, now: datetime) -> None:
        """A QUEUED record without its queue file, older than a submit takes: its replica died
        between the two writes. Queue it (under the lock, if it is still QUEUED)."""
        if age_s(record.queued_at or record.created_at, now) <= self._config.stale_after_s:
            return
        with self._job_locked(record.id):
            record = self.get(record.id)
            if record.state == JobState.QUEUED and record.id not in self._queue.job_ids():
                log.warning("job %s: QUEUED but not in the queue: queued again", record.id)
                self._queue.add(record.id, record.queued_at or record.created_at)

    def _reconcile(self, record: JobRecord) -> None:
        """Decide what happens to a job whose trainer died (the caller holds its lock): its
        child may have finished on its own (published: PROMOTED with its version, or
        REJECTED), it may have been cancelled meanwhile, or it goes back to the queue."""
        job_dir = self._store.job_dir(record.id)
        final_event = last_state(job_dir / EVENTS_FILE)
        trainer = record.trainer or record.replica
        if self._adopt_publication(record):
            log.warning("job %s: its trainer died, but its model was published as version %s",
                        record.id, record.model_version)
        elif final_event in (JobState.PROMOTED, JobState.REJECTED):
            self._adopt_outcome(record, JobState(final_event))
            log.warning("job %s: its trainer died, but its child finished: %s", record.id,
                        final_event)
        elif (job_dir / CANCEL_MARKER).exists():
            self._finish(record, JobState.CANCELLED, error=f"cancelled (its trainer {trainer} "
                         "stopped)")
        elif record.lost_attempts + 1 >= self._config.max_attempts:
            if record.attempts:
                record.attempts[-1].outcome, record.attempts[-1].ended_at = "lost", record.heartbeat_at
            trainers = ", ".join(a.trainer for a in record.attempts if a.outcome == "lost")
            self._finish(record, JobState.FAILED, error=(
                f"its trainer died {record.lost_attempts} times ({trainers}); not retried again "
                f"(--max-job-attempts {self._config.max_attempts}); start a new Train to retry — "
                f"checkpoints in jobs/{record.id}/checkpoints"))
        else:
            log.warning("job %s: its trainer %s is gone (last heartbeat %s): back in the queue",
                        record.id, trainer, record.heartbeat_at)
            self._requeue(record, "lost", reclaimed_from=trainer)

    def _adopt_publication(self, record: JobRecord) -> bool:
        """If the store holds a version this job published, record the job PROMOTED with it,
        whatever its events say (a stop can land between the publish and the child's last
        event): the store is the truth. True when it did."""
        for version in reversed(self._store.versions()):
            try:
                card = self._store.model_card(version)
            except Exception:  # an unreadable card is the store's problem, not this job's
                continue
            if card.job_id == record.id:
                record.model_version, record.gate = version, card.gate
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
        record.gate, record.model_version = card.gate, card.version
        self._finish(record, state, event=False)

    def _process_gone(self, record: JobRecord) -> bool:
        trainer = record.trainer or record.replica  # a record an older version wrote
        host, _, pid = trainer.rpartition(":")
        if host != socket.gethostname():
            return False  # another host: only its heartbeat can tell
        if trainer == self._config.replica_id:
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

