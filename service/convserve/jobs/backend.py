"""The job store: what the job runner needs of wherever jobs live, as one interface with two
backends, chosen by `--jobs-url`:

- files (default; `convserve.jobs.files`): job.json, events.jsonl and a queue folder in the
  model store's directory, under flock. One machine, or a shared volume whose locks work.
- postgresql (`postgresql://…`; `convserve.jobs.postgres`): rows, claims by
  `FOR UPDATE SKIP LOCKED`, leases by `lease_until`, events as rows followed with LISTEN/NOTIFY.

Both keep the same rules, which the runner relies on and tests/jobs/test_job_store.py checks
against both:
- A job is in the queue exactly while its record is QUEUED; the queue is FIFO by `queued_at`.
- Every read-modify-write of a job runs in `locked(job_id)` (or `next_queued()`): of writers
  racing for one job, one at a time; what the block wrote is kept whole or, on an error, not at
  all (PostgreSQL) / up to the last whole write (files).
- Events written in a transaction come before the record it saves: a watcher that reads a final
  record and then every event has seen the final state's event.
- The fencing token of a claim is its attempt number (`JobRecord.attempt`); a writer holding an
  older attempt sees `held_by` fail under the lock and writes nothing, and `fence` refuses to let
  a training process of that attempt publish.
"""

from __future__ import annotations

import builtins
import contextlib
from collections.abc import Iterator
from typing import Any, Protocol

from convserve.contracts.errors import InvalidInput
from convserve.jobs.records import JobRecord
from convserve.store.base import ModelStore

FILES = "files"
POSTGRESQL_SCHEMES = ("postgresql://", "postgres://")
JOBS_URL_ENV = "CONVSERVE_JOBS_URL"  # also how a job's training process finds its job store


class JobTransaction(Protocol):
    """One job, locked: read `record`, change it, `event(...)` and `save()`."""

    record: JobRecord
    cancel_requested: bool   # some replica asked to cancel the job
    lease_expired: bool      # RUNNING, and its trainer has not renewed the lease in time

    def event(self, kind: str, **fields: Any) -> None:
        """Append an event to the job's stream (before the record this transaction saves)."""

    def save(self, *, max_queued: int | None = None) -> None:
        """Write `record`. A RUNNING record renews its lease; a QUEUED one is in the queue.
        `max_queued`: LimitExceeded if the record joins a queue that already holds that many."""


class EventCursor(Protocol):
    def read(self) -> list[tuple[int, dict[str, Any] | None]]:
        """(sequence, event) for every event after the last one read; sequences start at 1
        (None: an event that cannot be read, such as a line torn by a crash)."""


class EventWaiter(Protocol):
    async def wait(self, timeout_s: float) -> None:
        """Return when the job may have new events since the last call (at once if some came
        meanwhile), or after `timeout_s`."""


class JobStore(Protocol):
    name: str                    # names the store in messages and logs (never a password)
    forwards_child_events: bool  # True: the trainer copies its child's events.jsonl into it
    # True: a job with an idempotency key gets the id the key hashes to, which makes it unique
    # (the files store). False: ids are random and the key is a unique column of its own.
    keyed_ids: bool

    def ensure_ready(self) -> None:
        """Create or migrate what the store needs; Unavailable while it cannot be reached."""

    def get(self, job_id: str) -> JobRecord:
        """NotFound, InvalidInput (a malformed id) or IntegrityError (unreadable)."""

    def list(self) -> builtins.list[JobRecord]:
        """Every job, newest first."""

    def queued(self) -> builtins.list[str]:
        """Queued job ids, next first."""

    def create(self, record: JobRecord, *, event: dict[str, Any], max_queued: int
               ) -> tuple[str, bool]:
        """Insert a new QUEUED job and its first event: (its id, True); or (the id of the job
        that already has its idempotency key, False) for a retry. LimitExceeded when
        `max_queued` jobs wait."""

    def locked(self, job_id: str) -> contextlib.AbstractContextManager[JobTransaction]:
        """The job, locked for a read-modify-write (NotFound when it does not exist)."""

    def next_queued(self) -> contextlib.AbstractContextManager[JobTransaction | None]:
        """The oldest queued job that no other trainer is claiming right now, locked; None when
        none waits. Leave it QUEUED and the next call moves on only if it was saved otherwise."""

    def expired(self) -> builtins.list[str]:
        """RUNNING jobs whose lease lapsed (candidates for recovery; check again under lock)."""

    def running(self) -> builtins.list[JobRecord]:
        """Every RUNNING job (recovery looks for trainers of this host that died)."""

    def repair(self) -> None:
        """Fix what a crash between two non-atomic writes can leave (nothing on PostgreSQL)."""

    def request_cancel(self, job_id: str) -> None:
        """Mark the job: its trainer stops it at the next heartbeat."""

    def follow(self, job_id: str) -> EventCursor:
        """A cursor over the job's events, from the first."""

    def last_state(self, job_id: str) -> str | None:
        """The `state` of the job's last "state" event (a JobState or Phase name)."""

    def waiter(self, job_id: str) -> contextlib.AbstractContextManager[EventWaiter]:
        """Listen for the job's new events while the block runs: a watcher reads, then waits,
        and an event that came in between still wakes it."""

    def fence(self, job_id: str, attempt: int) -> None:
        """ClaimLost unless attempt `attempt` still holds the job (checked right before a
        training process publishes)."""

    def close(self) -> None: ...


def open_job_store(url: str, models: ModelStore, *, lease_s: float = 20.0) -> JobStore:
    """The job store `url` names: "" or "files" for the model store's directory, or a
    PostgreSQL URL. `lease_s`: how long a claim lasts without a heartbeat."""
    if url in ("", FILES):
        from convserve.jobs.files import FileJobStore

        return FileJobStore(models, lease_s=lease_s)
    if url.startswith(POSTGRESQL_SCHEMES):
        from convserve.jobs.postgres import PostgresJobStore

        return PostgresJobStore(url, lease_s=lease_s)
    raise InvalidInput(f"--jobs-url {redact(url)!r}: expected 'files' or a URL starting with "
                       f"{' or '.join(POSTGRESQL_SCHEMES)}")


def redact(url: str) -> str:
    """A URL without its password, for messages and logs."""
    scheme, sep, rest = url.partition("://")
    if not sep or "@" not in rest:
        return url
    credentials, _, host = rest.rpartition("@")
    user = credentials.split(":", 1)[0]
    return f"{scheme}://{user}@{host}" if user else f"{scheme}://{host}"


@contextlib.contextmanager
def opened(url: str, models: ModelStore, *, lease_s: float = 20.0) -> Iterator[JobStore]:
    jobs = open_job_store(url, models, lease_s=lease_s)
    try:
        yield jobs
    finally:
        jobs.close()
