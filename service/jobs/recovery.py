"""What a replica does about jobs whose replica died: record their real outcome from their files,
and stop any training process of theirs still running on this host."""

from __future__ import annotations

import builtins
import logging
import os
import signal
import socket
import time
from datetime import UTC, datetime

from convserve.contracts.job_dir import EVENTS_FILE, JobState, last_state
from convserve.contracts.store import IntegrityError
from convserve.errors import NotFound
from convserve.jobs.process_group import is_training_process, signal_group
from convserve.jobs.records import JobRecord, RecordKeeping, age_s

log = logging.getLogger("convserve.jobs")


class Recovery(RecordKeeping):
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
            age = age_s(last, now)
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
        if not record.pid or not is_training_process(record.pid, record.id):
            return
        log.warning("job %s: stopping its orphaned training process %d", record.id, record.pid)
        signal_group(record.pid, signal.SIGTERM)
        deadline = time.monotonic() + self._config.cancel_grace_s
        while time.monotonic() < deadline and is_training_process(record.pid, record.id):
            time.sleep(0.05)
        signal_group(record.pid, signal.SIGKILL)

