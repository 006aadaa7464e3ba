"""What only the PostgreSQL job store has: its schema's migrations, an unreachable or restarted
server, and a connection dropped mid-transaction. A real server (tests/postgres.py)."""

from __future__ import annotations

import asyncio
import socket
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import psycopg
import pytest

from convserve.contracts.errors import Unavailable
from convserve.contracts.job_state import JobState
from convserve.jobs import JobRunner, RunnerConfig, TrainParams
from convserve.jobs.postgres import PostgresJobStore
from convserve.jobs.schema import LATEST, upgrade, version
from convserve.store.directory import DirectoryStore


def _runner(store_dir: Path, url: str, replica: str = "replica-a") -> JobRunner:
    return JobRunner(DirectoryStore(store_dir), RunnerConfig(
        datasets_root=store_dir.parent, replica_id=replica, jobs_url=url))


def test_replicas_starting_at_once_migrate_the_schema_once(postgres_url: str) -> None:
    stores = [PostgresJobStore(postgres_url) for _ in range(6)]
    try:
        with ThreadPoolExecutor(6) as pool:
            list(pool.map(lambda s: s.ensure_ready(), stores))
        with psycopg.connect(postgres_url) as connection:
            assert version(connection) == LATEST
            rows = connection.execute("SELECT version FROM convserve_schema").fetchall()
            assert rows == [(LATEST,)]
            assert upgrade(connection) == []  # idempotent: nothing left to apply
    finally:
        for store in stores:
            store.close()


def test_a_newer_schema_is_refused_not_guessed_at(postgres_url: str) -> None:
    with psycopg.connect(postgres_url, autocommit=True) as connection:
        upgrade(connection)
        connection.execute("INSERT INTO convserve_schema (version) VALUES (%s)", (LATEST + 1,))
    store = PostgresJobStore(postgres_url)
    try:
        with pytest.raises(Unavailable, match=f"version {LATEST + 1}, newer than this convserve"):
            store.get("anyjob")
    finally:
        store.close()


def test_an_unreachable_database_is_unavailable_naming_the_store(store_dir: Path) -> None:
    with socket.socket() as probe:  # a port nothing listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    runner = _runner(store_dir, f"postgresql://convserve:secret@127.0.0.1:{port}/jobs")
    try:
        started = time.monotonic()
        for call in (runner.list, lambda: runner.get("somejob"),
                     lambda: runner.submit(TrainParams.of())):
            with pytest.raises(Unavailable) as raised:
                call()
            message = str(raised.value)
            assert f"job store postgresql://convserve@127.0.0.1:{port}/jobs is unavailable" \
                in message and "secret" not in message
        assert time.monotonic() - started < 30  # answered, never hung
        assert runner.queued() != runner.queued()  # the metric: NaN, not an error
    finally:
        runner.close()


def test_a_failed_transaction_leaves_the_job_as_it_was(store_dir: Path, postgres_url: str
                                                       ) -> None:
    """The files store makes each write atomic on its own; here a whole block is."""
    runner = _runner(store_dir, postgres_url)
    try:
        job = runner.submit(TrainParams.of())
        with pytest.raises(RuntimeError, match="midway"), \
                runner.jobs.locked(job.id) as transaction:
            transaction.record.state = JobState.FAILED
            transaction.event("state", state="FAILED")
            transaction.save()
            raise RuntimeError("midway")
        assert runner.get(job.id).state == JobState.QUEUED
        assert [e["state"] for _, e in runner.jobs.follow(job.id).read() if e] == ["QUEUED"]
    finally:
        runner.close()


def test_a_connection_dropped_mid_transaction_leaves_no_half_written_job(
        store_dir: Path, postgres_server, postgres_url: str) -> None:
    runner = _runner(store_dir, postgres_url)
    try:
        job = runner.submit(TrainParams.of())
        database = postgres_url.rsplit("/", 1)[1]
        with pytest.raises(Unavailable), runner.jobs.locked(job.id) as transaction:
            transaction.event("state", state="RUNNING", trainer="doomed")
            transaction.record.state = JobState.RUNNING
            transaction.save()
            assert postgres_server.terminate_connections(database) >= 1  # before the commit
        record = runner.get(job.id)  # the pool replaces the dropped connection
        assert record.state == JobState.QUEUED and record.attempts == []
        events = [e for _, e in runner.jobs.follow(job.id).read()]
        assert [e["state"] for e in events if e] == ["QUEUED"]
    finally:
        runner.close()


def test_a_restarted_database_loses_no_job_and_claims_none_twice(
        store_dir: Path, own_postgres) -> None:
    url = own_postgres.create_database("jobs")
    server, trainer = _runner(store_dir, url, "server"), _runner(store_dir, url, "trainer")
    try:
        before = [server.submit(TrainParams.of()).id for _ in range(5)]
        claimed = [trainer.claim_next().id for _ in range(2)]  # type: ignore[union-attr]
        own_postgres.kill()  # a crash, not a clean stop
        with pytest.raises(Unavailable):
            server.submit(TrainParams.of())
        own_postgres.restart()
        deadline = time.monotonic() + 30
        while True:  # the pool reconnects: the first calls may still fail
            try:
                after = [server.submit(TrainParams.of()).id for _ in range(2)]
                break
            except Unavailable:
                assert time.monotonic() < deadline, "the job store never came back"
                time.sleep(0.2)
        while (record := trainer.claim_next()) is not None:
            claimed.append(record.id)
        assert sorted(claimed) == sorted(before + after)  # every job, each once
        assert all(len(server.get(j).attempts) == 1 for j in claimed)
    finally:
        server.close()
        trainer.close()


def test_an_event_committed_between_a_read_and_the_wait_still_wakes_the_watcher(
        store_dir: Path, postgres_url: str) -> None:
    writer, reader = _runner(store_dir, postgres_url, "a"), _runner(store_dir, postgres_url, "b")
    try:
        job = writer.submit(TrainParams.of())

        async def scenario() -> None:
            with reader.jobs.waiter(job.id) as waiter:
                # Any first wake comes after the listener's LISTEN (a NOTIFY, or the wake-up
                # of every waiter once it has connected): from here on it is listening.
                await asyncio.to_thread(_write_event, writer, job.id)
                await asyncio.wait_for(waiter.wait(30.0), timeout=10.0)
                # A watcher has read; an event commits before it waits again: still woken by
                # that NOTIFY, not by the 30 s fallback.
                await asyncio.to_thread(_write_event, writer, job.id)
                await asyncio.wait_for(waiter.wait(30.0), timeout=10.0)

        asyncio.run(scenario())
    finally:
        writer.close()
        reader.close()


def _write_event(runner: JobRunner, job_id: str) -> None:
    with runner.jobs.locked(job_id) as transaction:
        transaction.event("progress", step=1)
        transaction.save()
