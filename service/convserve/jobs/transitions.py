"""The changes of a job's state that several parts of the runner make, each inside a locked
transaction of the job store (convserve.jobs.backend): finishing a job, putting it back in the
queue, and adopting what its training process finished by itself."""

from __future__ import annotations

import json
from typing import Any

from convserve.contracts.job_state import JobState
from convserve.contracts.model_card import ModelCard
from convserve.jobs.backend import JobStore, JobTransaction
from convserve.jobs.records import JobRecord
from convserve.store.base import ModelStore
from convserve.store.job_dir import CARD_FILE, timestamp


def finish(transaction: JobTransaction, state: JobState, *, error: str = "",
           event: bool = True) -> JobRecord:
    """Make the job final: the state event first, then the record. A running attempt ends with
    the job's state."""
    record = transaction.record
    if event:
        transaction.event("state", state=state.value, **({"error": error} if error else {}))
    now = timestamp()
    record.end_attempt(state.value, now)
    record.state, record.finished_at, record.error = state, now, error
    transaction.save()
    return record


def requeue(transaction: JobTransaction, outcome: str, **why: Any) -> None:
    """Put a claimed job back in the queue, at its old place (it was first in line once); its
    attempt ended `outcome` ("released" or "lost")."""
    record = transaction.record
    now = timestamp()
    record.end_attempt(outcome, now)
    record.state, record.pid, record.heartbeat_at = JobState.QUEUED, None, now
    record.queued_at = record.queued_at or record.created_at
    transaction.event("state", state=JobState.QUEUED.value, **why)
    transaction.save()


def adopt_publication(transaction: JobTransaction, jobs: JobStore, models: ModelStore) -> bool:
    """If the model store holds a version this job published, record the job PROMOTED with it,
    whatever its events say (a stop can land between the publish and the child's last event):
    the model store is the truth. True when it did."""
    record = transaction.record
    for version in reversed(models.versions()):
        try:
            card = models.model_card(version)
        except Exception:  # an unreadable card is the store's problem, not this job's
            continue
        if card.job_id == record.id:
            record.model_version, record.gate = version, card.gate
            if jobs.last_state(record.id) != JobState.PROMOTED:
                transaction.event("state", state=JobState.PROMOTED.value, version=version,
                                  reconciled=True)
            finish(transaction, JobState.PROMOTED, event=False)
            return True
    return False


def adopt_outcome(transaction: JobTransaction, models: ModelStore, state: JobState) -> None:
    """A final PROMOTED/REJECTED the child wrote itself: take its gate decision and version from
    the card it wrote in the job's directory (its final state event is in the stream already)."""
    record = transaction.record
    card = job_card(models, record.id)
    record.gate, record.model_version = card.gate, card.version
    finish(transaction, state, event=False)


def job_card(models: ModelStore, job_id: str) -> ModelCard:
    """The card the job's run wrote (empty when it wrote none, or an unreadable one)."""
    try:
        card = json.loads((models.work.job_dir(job_id) / CARD_FILE).read_text("utf-8"))
    except (OSError, ValueError):
        card = {}
    return ModelCard.from_dict(card if isinstance(card, dict) else {})
