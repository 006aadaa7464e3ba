"""The test suite's real PostgreSQL server (tests/postgres.py): a database per test on the shared
server, crash recovery across kill() and restart() on the same URL, and connections dropped in the
middle of a transaction."""

from __future__ import annotations

import psycopg
import pytest

from tests.postgres import PostgresServer
from tests.waits import process_alive


def _dbname(url: str) -> str:
    return str(psycopg.conninfo.conninfo_to_dict(url)["dbname"])


def test_a_table_created_through_the_url_holds_a_row(postgres_url: str,
                                                      postgres_server: PostgresServer) -> None:
    assert postgres_url.startswith(f"postgresql://postgres@127.0.0.1:{postgres_server.port}/t_")
    with psycopg.connect(postgres_url) as connection:
        tables = connection.execute("SELECT count(*) FROM pg_tables WHERE schemaname = 'public'")
        assert tables.fetchone() == (0,)  # fresh and empty
        connection.execute("CREATE TABLE jobs (id integer PRIMARY KEY, state text NOT NULL)")
        connection.execute("INSERT INTO jobs VALUES (1, 'QUEUED')")
    with psycopg.connect(postgres_url) as connection:  # the first one committed on leaving
        assert connection.execute("SELECT id, state FROM jobs").fetchall() == [(1, "QUEUED")]


def test_each_test_gets_its_own_database(postgres_url: str, postgres_server: PostgresServer) -> None:
    with postgres_server.connect() as connection:
        names = [row[0] for row in connection.execute("SELECT datname FROM pg_database")]
    assert _dbname(postgres_url) in names
    assert [name for name in names if name.startswith("t_")] == [_dbname(postgres_url)]  # others dropped


def test_committed_rows_survive_a_killed_server_and_clients_reconnect(own_postgres: PostgresServer) -> None:
    url = own_postgres.create_database("crash")
    with psycopg.connect(url) as connection:
        connection.execute("CREATE TABLE ledger (entry text)")
        connection.execute("INSERT INTO ledger VALUES ('committed')")
    open_transaction = psycopg.connect(url)
    open_transaction.execute("INSERT INTO ledger VALUES ('never committed')")
    assert own_postgres.process is not None
    postmaster = own_postgres.process.pid

    own_postgres.kill()
    assert not process_alive(postmaster) and not own_postgres.running
    with pytest.raises(psycopg.OperationalError):
        open_transaction.execute("SELECT 1")
    open_transaction.close()
    with pytest.raises(psycopg.OperationalError):
        psycopg.connect(url, connect_timeout=2)

    own_postgres.restart()  # crash recovery, on the same port and data directory
    assert "database system was interrupted" in own_postgres.log_tail(20000)
    with psycopg.connect(url) as connection:
        assert connection.execute("SELECT entry FROM ledger").fetchall() == [("committed",)]


def test_a_stopped_server_restarts_on_the_same_url(own_postgres: PostgresServer) -> None:
    url = own_postgres.create_database("kept")
    with psycopg.connect(url) as connection:
        connection.execute("CREATE TABLE kept AS SELECT 42 AS answer")
    own_postgres.stop()
    assert not own_postgres.running
    own_postgres.restart()
    with psycopg.connect(url) as connection:
        assert connection.execute("SELECT answer FROM kept").fetchone() == (42,)


def test_terminated_connections_lose_their_open_transaction(postgres_url: str,
                                                            postgres_server: PostgresServer) -> None:
    with psycopg.connect(postgres_url) as connection:
        connection.execute("CREATE TABLE claims (job integer)")
    claimant = psycopg.connect(postgres_url)  # not autocommit: the INSERT opens a transaction
    claimant.execute("INSERT INTO claims VALUES (7)")
    bystander = postgres_server.connect()  # another database's connection stays

    assert postgres_server.terminate_connections(_dbname(postgres_url)) == 1
    with pytest.raises(psycopg.OperationalError):
        claimant.execute("SELECT 1")
    assert claimant.closed
    assert bystander.execute("SELECT 1").fetchone() == (1,)
    bystander.close()
    with psycopg.connect(postgres_url) as connection:
        assert connection.execute("SELECT count(*) FROM claims").fetchone() == (0,)
