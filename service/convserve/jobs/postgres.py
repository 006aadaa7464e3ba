"""The PostgreSQL job store (`--jobs-url postgresql://…`): jobs for replicas on many machines.

- A job is one row of `convserve_jobs`: its record as JSON (convserve.jobs.records, the one
  owner of that format) beside the columns the queries need (state, queued_at, lease_until,
  idempotency_key, cancel_requested, event_seq).
- Claims: `SELECT … WHERE state = 'QUEUED' ORDER BY queued_at FOR UPDATE SKIP LOCKED LIMIT 1`:
  FIFO, and trainers racing skip each other's row instead of waiting on it.
- Leases: saving a RUNNING record sets `lease_until = now() + lease_s` (the database's clock,
  one for every replica); recovery takes rows whose lease lapsed.
- Fencing: every write of a job runs in a transaction that holds its row lock and checks the
  writer's attempt (`JobRecord.held_by`) first; a training process checks its attempt right
  before it publishes (`fence`).
- The queue's bound is counted under a transaction-level advisory lock; the idempotency key is a
  unique constraint.
- Events are rows numbered per job (`event_seq`, under the row lock, so numbers follow commit
  order with no gaps); a transaction that adds one sends NOTIFY, delivered at commit, and
  watchers wait on one LISTEN connection per process instead of polling.
- The schema is created and migrated by whichever replica gets there first, under an advisory
  lock (convserve.jobs.schema); `convserve db upgrade` runs the same by hand.

psycopg 3 with psycopg_pool (docs/design.md says why not a queue library). Every database
error that means "cannot reach it now" is Unavailable, naming the store, so callers get
UNAVAILABLE and trainers back off.
"""

from __future__ import annotations

import asyncio
import builtins
import contextlib
import logging
import threading
from collections.abc import Iterator
from typing import Any

import psycopg
from psycopg.types.json import Jsonb
from psycopg_pool import ConnectionPool, PoolTimeout

from convserve.contracts.errors import (
    ClaimLost,
    IntegrityError,
    InvalidInput,
    InvalidJobId,
    LimitExceeded,
    NotFound,
    Unavailable,
)
from convserve.contracts.job_state import JobState
from convserve.jobs.backend import redact
from convserve.jobs.records import JobRecord
from convserve.jobs.schema import NOTIFY_CHANNEL, QUEUE_LOCK, upgrade
from convserve.store.job_dir import event_line
from convserve.store.work_dir import check_job_id

log = logging.getLogger("convserve.jobs")
POOL_MAX = 10
POOL_TIMEOUT_S = 3.0   # a call waits this long for a connection, then answers UNAVAILABLE
CONNECT_TIMEOUT_S = 3
# Server-side limits, so a stuck replica never holds a job's row lock for long.
SESSION_OPTIONS = "-c lock_timeout=10s -c idle_in_transaction_session_timeout=60s"
_UNREACHABLE = (psycopg.OperationalError, psycopg.InterfaceError, PoolTimeout)
_COLUMNS = "record, cancel_requested, coalesce(lease_until < now(), false)"


class PostgresTransaction:
    def __init__(self, jobs: PostgresJobStore, cursor: psycopg.Cursor[Any],
                 row: tuple[Any, ...]) -> None:
        self._jobs, self._cursor = jobs, cursor
        self.record = jobs.decode(row[0])
        self.cancel_requested: bool = row[1]
        self.lease_expired: bool = row[2]
        self._notified = False

    def event(self, kind: str, **fields: Any) -> None:
        self._cursor.execute(
            "WITH s AS (UPDATE convserve_jobs SET event_seq = event_seq + 1 WHERE id = %s "
            "RETURNING id, event_seq) "
            "INSERT INTO convserve_job_events (job_id, seq, event) SELECT id, event_seq, %s::jsonb "
            "FROM s", (self.record.id, event_line(kind, **fields).decode()))
        if not self._notified:  # delivered at commit, once per transaction
            self._cursor.execute("SELECT pg_notify(%s, %s)", (NOTIFY_CHANNEL, self.record.id))
            self._notified = True

    def save(self, *, max_queued: int | None = None) -> None:
        record = self.record
        if max_queued is not None and record.state == JobState.QUEUED:
            self._jobs.check_bound(self._cursor, max_queued, record.id)
        self._cursor.execute(
            "UPDATE convserve_jobs SET state = %s, queued_at = %s, record = %s, "
            "lease_until = CASE WHEN %s THEN now() + make_interval(secs => %s) END "
            "WHERE id = %s",
            (record.state.value, record.queued_at or record.created_at, Jsonb(record.to_dict()),
             record.state == JobState.RUNNING, self._jobs.lease_s, record.id))


class _Cursor:
    """Follows one job's event rows from the last sequence read."""

    def __init__(self, jobs: PostgresJobStore, job_id: str) -> None:
        self._jobs, self._job_id, self._last = jobs, job_id, 0

    def read(self) -> list[tuple[int, dict[str, Any] | None]]:
        with self._jobs.transaction() as cursor:
            rows = cursor.execute(
                "SELECT seq, event FROM convserve_job_events WHERE job_id = %s AND seq > %s "
                "ORDER BY seq", (self._job_id, self._last)).fetchall()
        if rows:
            self._last = rows[-1][0]
        return [(seq, event if isinstance(event, dict) else None) for seq, event in rows]


class PostgresJobStore:
    forwards_child_events = True
    # Random ids: a key used against an earlier files store must not find that store's
    # jobs/<id>/ folder (and its checkpoints) under the same hashed id.
    keyed_ids = False

    def __init__(self, url: str, *, lease_s: float = 20.0) -> None:
        self.url, self.lease_s = url, lease_s
        self.name = f"job store {redact(url)}"
        self._ready = False
        self._ready_lock = threading.Lock()
        self._pool: ConnectionPool[psycopg.Connection[Any]] = ConnectionPool(
            url, min_size=1, max_size=POOL_MAX, open=False, timeout=POOL_TIMEOUT_S,
            check=ConnectionPool.check_connection,  # a restarted server's dead connections
            kwargs={"connect_timeout": CONNECT_TIMEOUT_S, "options": SESSION_OPTIONS}, name="convserve-jobs")
        self._pool.open(wait=False)  # a replica starts (and serves) while the database is down
        self._listener = _Listener(url, self.name)

    # ------------------------------------------------------------------- the connection

    @contextlib.contextmanager
    def transaction(self) -> Iterator[psycopg.Cursor[Any]]:
        """One transaction: committed when the block ends, rolled back on any error (a dropped
        connection included: nothing of it is kept)."""
        try:
            self.ensure_ready()
            with self._pool.connection() as connection, connection.cursor() as cursor:
                yield cursor
        except _UNREACHABLE as error:
            raise Unavailable(f"{self.name} is unavailable: {_first_line(error)}") from None

    def ensure_ready(self) -> None:
        if self._ready:
            return
        with self._ready_lock:
            if self._ready:
                return
            try:  # its own connection: a refused one fails at once, not after the pool's wait
                with psycopg.connect(self.url, connect_timeout=CONNECT_TIMEOUT_S,
                                     options=SESSION_OPTIONS) as connection:
                    applied = upgrade(connection)
            except _UNREACHABLE as error:
                raise Unavailable(f"{self.name} is unavailable: {_first_line(error)}") from None
            if applied:
                log.info("%s: schema migrated to version %d", self.name, applied[-1])
            self._ready = True

    def decode(self, value: Any) -> JobRecord:
        try:
            return JobRecord.from_dict(value)
        except (ValueError, KeyError, TypeError, AttributeError) as error:
            raise IntegrityError(f"{self.name}: unreadable job record: {error}") from None

    # ------------------------------------------------------------------- reads

    def get(self, job_id: str) -> JobRecord:
        _check(job_id)
        with self.transaction() as cursor:
            row = cursor.execute("SELECT record FROM convserve_jobs WHERE id = %s",
                                 (job_id,)).fetchone()
        if row is None:
            raise NotFound(f"job {job_id!r} not found")
        return self.decode(row[0])

    def list(self) -> builtins.list[JobRecord]:
        with self.transaction() as cursor:
            rows = cursor.execute("SELECT record FROM convserve_jobs "
                                  "ORDER BY created_at DESC, id DESC").fetchall()
        records = []
        for (value,) in rows:
            try:
                records.append(self.decode(value))
            except IntegrityError as error:
                log.warning("%s", error)
        return records

    def queued(self) -> builtins.list[str]:
        with self.transaction() as cursor:
            rows = cursor.execute("SELECT id FROM convserve_jobs WHERE state = 'QUEUED' "
                                  "ORDER BY queued_at, id").fetchall()
        return [job_id for (job_id,) in rows]

    def expired(self) -> builtins.list[str]:
        with self.transaction() as cursor:
            rows = cursor.execute("SELECT id FROM convserve_jobs WHERE state = 'RUNNING' "
                                  "AND lease_until < now() ORDER BY id").fetchall()
        return [job_id for (job_id,) in rows]

    def running(self) -> builtins.list[JobRecord]:
        with self.transaction() as cursor:
            rows = cursor.execute("SELECT record FROM convserve_jobs WHERE state = 'RUNNING'"
                                  ).fetchall()
        return [self.decode(value) for (value,) in rows]

    def follow(self, job_id: str) -> _Cursor:
        return _Cursor(self, job_id)

    def last_state(self, job_id: str) -> str | None:
        with self.transaction() as cursor:
            row = cursor.execute(
                "SELECT event->>'state' FROM convserve_job_events WHERE job_id = %s "
                "AND event->>'type' = 'state' ORDER BY seq DESC LIMIT 1", (job_id,)).fetchone()
        return row[0] if row else None

    # ------------------------------------------------------------------- writes

    def check_bound(self, cursor: psycopg.Cursor[Any], max_queued: int, job_id: str) -> None:
        """Under the queue's advisory lock (held to the end of the transaction), so replicas
        racing to queue never overfill it."""
        cursor.execute("SELECT pg_advisory_xact_lock(%s)", (QUEUE_LOCK,))
        row = cursor.execute("SELECT count(*) FROM convserve_jobs WHERE state = 'QUEUED' "
                             "AND id <> %s", (job_id,)).fetchone()
        waiting = row[0] if row else 0
        if waiting >= max_queued:
            raise LimitExceeded(f"training queue is full ({waiting} jobs waiting); retry later")

    def create(self, record: JobRecord, *, event: dict[str, Any], max_queued: int
               ) -> tuple[str, bool]:
        _check(record.id)
        key = record.idempotency_key or None
        with self.transaction() as cursor:
            if key is not None:
                found = cursor.execute("SELECT id FROM convserve_jobs WHERE idempotency_key = %s",
                                       (key,)).fetchone()
                if found:
                    return str(found[0]), False
            self.check_bound(cursor, max_queued, record.id)
            inserted = cursor.execute(
                "INSERT INTO convserve_jobs (id, state, queued_at, created_at, "
                "idempotency_key, record) VALUES (%s, %s, %s, %s, %s, %s) "
                "ON CONFLICT DO NOTHING RETURNING id",
                (record.id, record.state.value, record.queued_at, record.created_at,
                 key, Jsonb(record.to_dict()))).fetchone()
            if inserted is None:
                # A racing retry with the same key committed first (the unique constraint);
                # once it has, the key's row is visible to this statement's snapshot.
                found = cursor.execute("SELECT id FROM convserve_jobs WHERE idempotency_key = %s",
                                       (key,)).fetchone()
                if found:
                    return str(found[0]), False
                raise Unavailable(f"job id {record.id} collided; retry")
            row = cursor.execute(f"SELECT {_COLUMNS} FROM convserve_jobs WHERE id = %s",
                                 (record.id,)).fetchone()
            assert row is not None
            PostgresTransaction(self, cursor, row).event(**event)
        return record.id, True

    @contextlib.contextmanager
    def locked(self, job_id: str) -> Iterator[PostgresTransaction]:
        _check(job_id)
        with self.transaction() as cursor:
            row = cursor.execute(f"SELECT {_COLUMNS} FROM convserve_jobs WHERE id = %s "
                                 "FOR UPDATE", (job_id,)).fetchone()
            if row is None:
                raise NotFound(f"job {job_id!r} not found")
            yield PostgresTransaction(self, cursor, row)

    @contextlib.contextmanager
    def next_queued(self) -> Iterator[PostgresTransaction | None]:
        with self.transaction() as cursor:
            row = cursor.execute(f"SELECT {_COLUMNS} FROM convserve_jobs WHERE state = 'QUEUED' "
                                 "ORDER BY queued_at, id LIMIT 1 FOR UPDATE SKIP LOCKED"
                                 ).fetchone()
            yield PostgresTransaction(self, cursor, row) if row else None

    def repair(self) -> None:
        pass  # every change is one transaction: nothing is ever half-written

    def request_cancel(self, job_id: str) -> None:
        _check(job_id)
        with self.transaction() as cursor:
            if not cursor.execute("UPDATE convserve_jobs SET cancel_requested = true "
                                  "WHERE id = %s RETURNING id", (job_id,)).fetchone():
                raise NotFound(f"job {job_id!r} not found")

    def fence(self, job_id: str, attempt: int) -> None:
        record = self.get(job_id)
        if not (record.state == JobState.RUNNING and record.attempt == attempt
                and not record.attempts[-1].outcome):
            raise ClaimLost(f"attempt {attempt} of job {job_id} no longer holds it (now: "
                            f"{record.state.value}, attempt {record.attempt}): its trainer was "
                            "declared dead and the job went back to the queue; this attempt "
                            "does not publish")

    def waiter(self, job_id: str) -> contextlib.AbstractContextManager[_Waiter]:
        return self._listener.waiter(job_id)

    def close(self) -> None:
        self._listener.close()
        self._pool.close()


class _Waiter:
    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop, self.event = loop, asyncio.Event()

    async def wait(self, timeout_s: float) -> None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.event.wait(), timeout_s)
        self.event.clear()  # before the caller reads: what comes after sets it again


class _Listener:
    """One LISTEN connection per process, in a thread; wakes the coroutines waiting on a job.
    After a reconnect it wakes every waiter, which re-reads from its last sequence: a
    notification lost while the connection was down costs nothing."""

    def __init__(self, url: str, name: str) -> None:
        self._url, self._name = url, name
        self._lock = threading.Lock()
        self._waiters: dict[str, set[tuple[asyncio.AbstractEventLoop, asyncio.Event]]] = {}
        self._thread: threading.Thread | None = None
        self._closed = threading.Event()

    @contextlib.contextmanager
    def waiter(self, job_id: str) -> Iterator[_Waiter]:
        """Registered for the whole watch, so a notification between a read and the next wait
        is kept (the event stays set) rather than lost."""
        waiter = _Waiter(asyncio.get_running_loop())
        entry = (waiter.loop, waiter.event)
        with self._lock:
            if self._thread is None and not self._closed.is_set():
                self._thread = threading.Thread(target=self._listen, name="jobs-listen",
                                                daemon=True)
                self._thread.start()
            self._waiters.setdefault(job_id, set()).add(entry)
        try:
            yield waiter
        finally:
            with self._lock:
                waiting = self._waiters.get(job_id, set())
                waiting.discard(entry)
                if not waiting:
                    self._waiters.pop(job_id, None)

    def _listen(self) -> None:
        delay, reported = 0.5, False
        while not self._closed.is_set():
            try:
                with psycopg.connect(self._url, autocommit=True,
                                     connect_timeout=CONNECT_TIMEOUT_S) as connection:
                    connection.execute(f"LISTEN {NOTIFY_CHANNEL}")
                    if reported:
                        log.info("%s: listening for job events again", self._name)
                    delay, reported = 0.5, False
                    self._wake(None)
                    while not self._closed.is_set():
                        for notification in connection.notifies(timeout=1.0):
                            self._wake(notification.payload)
            except psycopg.Error as error:
                if not reported:
                    log.warning("%s: lost the job-event listener (%s); watchers poll every few "
                                "seconds until it is back", self._name, _first_line(error))
                    reported = True
                self._wake(None)
                self._closed.wait(delay)
                delay = min(delay * 2, 10.0)

    def _wake(self, job_id: str | None) -> None:
        with self._lock:
            entries = [e for waiting in self._waiters.values() for e in waiting] \
                if job_id is None else list(self._waiters.get(job_id, ()))
        for loop, event in entries:
            with contextlib.suppress(RuntimeError):  # its loop closed meanwhile
                loop.call_soon_threadsafe(event.set)

    def close(self) -> None:
        self._closed.set()
        if self._thread is not None:
            self._thread.join(timeout=5)


def _check(job_id: str) -> None:
    try:
        check_job_id(job_id)
    except InvalidJobId as error:
        raise InvalidInput(str(error)) from None


def _first_line(error: BaseException) -> str:
    return (str(error).strip().splitlines() or [type(error).__name__])[0]
