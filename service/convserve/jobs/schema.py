"""The PostgreSQL job store's schema: versioned migrations, applied in order, each once.

Applied by the service itself when it first reaches the database, and by `convserve db upgrade`.
Every replica may start at once: the whole upgrade runs in one transaction that first takes a
transaction-level advisory lock, so one replica migrates and the others then find the version
current (DDL is transactional in PostgreSQL: a crash mid-migration leaves the old version). A
database whose version is newer than this code knows is refused rather than guessed at.
"""

from __future__ import annotations

from typing import Any

import psycopg

from convserve.contracts.errors import Unavailable

# Advisory lock keys: any two distinct 64-bit numbers unlikely to collide with an application's.
MIGRATION_LOCK = 0x636F6E7673657276  # "convserv"
QUEUE_LOCK = 0x636F6E7671756575      # "convqueu"
NOTIFY_CHANNEL = "convserve_job_events"

MIGRATIONS: tuple[tuple[int, str], ...] = (
    (1, """
CREATE TABLE convserve_jobs (
    id               text PRIMARY KEY,
    state            text NOT NULL,
    queued_at        timestamptz NOT NULL,     -- FIFO order while QUEUED
    created_at       timestamptz NOT NULL,
    idempotency_key  text UNIQUE,              -- NULL: none; a retry with the key finds the job
    lease_until      timestamptz,              -- RUNNING: its trainer renews it every heartbeat
    cancel_requested boolean NOT NULL DEFAULT false,
    event_seq        bigint NOT NULL DEFAULT 0,  -- the last event's number
    record           jsonb NOT NULL            -- convserve.jobs.records.JobRecord
);
CREATE INDEX convserve_jobs_queue ON convserve_jobs (queued_at, id) WHERE state = 'QUEUED';
CREATE INDEX convserve_jobs_leases ON convserve_jobs (lease_until) WHERE state = 'RUNNING';
CREATE TABLE convserve_job_events (
    job_id text NOT NULL REFERENCES convserve_jobs (id) ON DELETE CASCADE,
    seq    bigint NOT NULL,
    event  jsonb NOT NULL,
    PRIMARY KEY (job_id, seq)
);
"""),
)
LATEST = MIGRATIONS[-1][0]


def upgrade(connection: psycopg.Connection[Any]) -> list[int]:
    """Bring the schema to LATEST; returns the versions applied (none: it was current)."""
    applied = []
    with connection.transaction():
        connection.execute("SELECT pg_advisory_xact_lock(%s)", (MIGRATION_LOCK,))
        connection.execute("CREATE TABLE IF NOT EXISTS convserve_schema (version integer "
                           "PRIMARY KEY, applied_at timestamptz NOT NULL DEFAULT now())")
        row = connection.execute("SELECT coalesce(max(version), 0) FROM convserve_schema"
                                 ).fetchone()
        current = row[0] if row else 0
        if current > LATEST:
            raise Unavailable(f"the job store's schema is version {current}, newer than this "
                              f"convserve knows ({LATEST}): upgrade convserve on this replica")
        for version, statements in MIGRATIONS:
            if version > current:
                # No parameters: several statements in one string are allowed.
                connection.execute(statements)
                connection.execute("INSERT INTO convserve_schema (version) VALUES (%s)",
                                   (version,))
                applied.append(version)
    return applied


def upgrade_at(url: str) -> list[int]:
    """`upgrade` over a connection of its own (`convserve db upgrade`); Unavailable when the
    database cannot be reached."""
    try:
        with psycopg.connect(url, connect_timeout=10) as connection:
            return upgrade(connection)
    except (psycopg.OperationalError, psycopg.InterfaceError) as error:
        from convserve.jobs.backend import redact

        first = (str(error).strip().splitlines() or [type(error).__name__])[0]
        raise Unavailable(f"job store {redact(url)} is unavailable: {first}") from None


def version(connection: psycopg.Connection[Any]) -> int:
    """The schema's version (0: none yet)."""
    with connection.transaction():
        exists = connection.execute("SELECT to_regclass('convserve_schema')").fetchone()
        if not exists or exists[0] is None:
            return 0
        row = connection.execute("SELECT coalesce(max(version), 0) FROM convserve_schema"
                                 ).fetchone()
    return row[0] if row else 0
