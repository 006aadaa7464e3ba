"""The job store on PostgreSQL (`convserve serve --jobs-url postgresql://…`): real replicas in child
processes, the jobs in a real PostgreSQL server (tests/postgres.py), the models and the jobs'
artifacts in one shared store directory. Serving and training replicas scaled apart, a trainer
killed mid-job, a trainer's machine hung past its lease; the database stopped under the replicas,
and killed while jobs are submitted. The job's row (`record`) and its event rows are read straight
from the database."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import grpc
import psycopg
import pytest

from convserve.client import Client, ClientError
from convserve.store.directory import DirectoryStore
from tests.conftest import SMALL_SYNTHETIC
from tests.postgres import PostgresServer
from tests.servers import ServerProcess, images, publish, running_server
from tests.waits import process_alive, wait_until

pytestmark = pytest.mark.slow
TRAINING_S = 300  # a bound for 2 shared cores, never a measurement
# The operator's gate: any candidate passes (the gate itself is test_gate.py's). The policy is
# resolved by the replica that accepts the Train, and stored with the job.
ACCEPT_ANY = ("--min-improvement", "-1")



def _record(url: str, job_id: str) -> dict[str, Any]:
    with psycopg.connect(url) as connection:
        row = connection.execute("SELECT record FROM convserve_jobs WHERE id = %s",
                                 (job_id,)).fetchone()
    assert row is not None, f"job {job_id} has no row"
    return row[0]


def _events(url: str, job_id: str) -> list[dict[str, Any]]:
    """The job's event rows, in sequence order, each with its `seq`."""
    with psycopg.connect(url) as connection:
        rows = connection.execute("SELECT seq, event FROM convserve_job_events WHERE job_id = %s "
                                  "ORDER BY seq", (job_id,)).fetchall()
    return [{**event, "seq": seq} for seq, event in rows]


def _file_events(store: Path, job_id: str) -> list[dict[str, Any]]:
    """What the job's training processes wrote themselves (every attempt's, appended), as far
    as written: none before the first, and not a line still being written."""
    try:
        text = (DirectoryStore(store).work.job_dir(job_id) / "events.jsonl").read_text()
    except FileNotFoundError:
        return []
    return [json.loads(line) for line in text.split("\n")[:-1]]


def _attempts(url: str, job_id: str) -> list[tuple[str, str]]:
    return [(a["trainer"], a["outcome"]) for a in _record(url, job_id)["attempts"]]


def _versions_of(store: Path, job_id: str) -> list[int]:
    models = DirectoryStore(store)
    return [v for v in models.versions() if models.card(v).get("job_id") == job_id]


def _failure(call: Callable[[], Any]) -> ClientError:
    try:
        call()
    except ClientError as error:
        return error
    raise AssertionError("the call succeeded")


def _stopped(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[-1].split()[0] in "Tt"
    except OSError:
        return False


def _in_a_transaction(url: str, pid: int) -> bool:
    """Whether process `pid` has a connection to `url`'s database inside a transaction (holding
    its row locks): its sockets' local ports, matched against pg_stat_activity's client_port."""
    inodes = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            target = os.readlink(fd)
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[len("socket:["):-1])
    ports = [int(fields[1].rsplit(":", 1)[1], 16)
             for table in ("/proc/net/tcp", "/proc/net/tcp6")
             for fields in (line.split() for line in Path(table).read_text().splitlines()[1:])
             if fields[9] in inodes]
    with psycopg.connect(url) as connection:
        row = connection.execute("SELECT count(*) FROM pg_stat_activity WHERE client_port = "
                                 "ANY(%s) AND xact_start IS NOT NULL", (ports,)).fetchone()
    return bool(row and row[0])


def _freeze(server: ServerProcess, url: str) -> None:
    """SIGSTOP a replica between two of its transactions (frozen inside one, it would hold the
    job's row lock until PostgreSQL's idle-in-transaction timeout)."""
    for _ in range(50):
        server.process.send_signal(signal.SIGSTOP)
        wait_until(lambda: _stopped(server.process.pid), "the replica to stop")
        if not _in_a_transaction(url, server.process.pid):
            return
        server.process.send_signal(signal.SIGCONT)
        wait_until(lambda: not _stopped(server.process.pid), "the replica to go on")
    raise AssertionError("the replica was inside a transaction every time")


def test_two_serving_and_two_training_replicas_on_one_postgresql(store_dir, datasets,
                                                                 postgres_url) -> None:
    jobs = ("--jobs-url", postgres_url)
    # Lease of 3 s, looked at every 1.5 s. On one host the other trainer sees at once that the
    # dead one's process is gone, without waiting for its lease (the hung-machine test below
    # waits for the lease). No champion: the first model needs only min_accuracy 0.
    training = ("--role", "train", *jobs, "--stale-job-after-s", "3")
    with running_server(store_dir, datasets, "--role", "serve", *jobs) as serve_a, \
            running_server(store_dir, datasets, "--role", "serve", *jobs) as serve_b, \
            Client(serve_a.address) as a, Client(serve_b.address) as b:
        trainers = [ServerProcess(store_dir, datasets, *training) for _ in range(2)]
        try:
            job = a.train(SMALL_SYNTHETIC, epochs=4, min_accuracy=0.0)
            watched: list[Any] = []
            killed: ServerProcess | None = None
            child = 0
            for event in b.watch(job.id, timeout=TRAINING_S):  # accepted by A, watched on B
                watched.append(event)
                if killed is None and event.type == "epoch":  # its checkpoint is on disk
                    record = _record(postgres_url, job.id)
                    killed = next(t for t in trainers if t.replica_id == record["trainer"])
                    child = record["pid"]
                    killed.process.send_signal(signal.SIGKILL)
                    killed.process.wait(timeout=30)
            assert killed is not None, "no epoch event came"
            other = next(t for t in trainers if t is not killed)
            final = b.job(job.id)
            assert final.state == "PROMOTED", final.error
            assert _record(postgres_url, job.id)["replica"] == serve_a.replica_id
            assert not process_alive(child)  # the killed trainer's child stopped too
            killed_id, other_id = killed.replica_id, other.replica_id
            assert _attempts(postgres_url, job.id) == [(killed_id, "lost"), (other_id, "PROMOTED")]
            assert [(t.trainer, t.outcome) for t in final.message.attempts] == [
                (killed_id, "lost"), (other_id, "PROMOTED")]
            assert _record(postgres_url, job.id)["state"] == "PROMOTED"

            events = _events(postgres_url, job.id)
            # The stream through B was every row, in order, with no gap.
            assert [e.sequence for e in watched] == [e["seq"] for e in events] == list(
                range(1, len(events) + 1))
            states = [e for e in events if e["type"] == "state"]
            assert [e["trainer"] for e in states if e["state"] == "RUNNING"] == [killed_id,
                                                                                  other_id]
            assert [e["reclaimed_from"] for e in states if e.get("reclaimed_from")] == [killed_id]
            assert [e["state"] for e in states].count("PROMOTED") == 1
            assert states[-1]["state"] == "PROMOTED"
            resumed_from = [e["epoch"] for e in events if e["type"] == "resumed"]
            assert len(resumed_from) == 1 and resumed_from[0] >= 1
            # No finished epoch trained twice: the second attempt went on from the checkpoint.
            for epochs in ([e["epoch"] for e in events if e["type"] == "epoch"],
                           [e["epoch"] for e in _file_events(store_dir, job.id)
                            if e["type"] == "epoch"]):
                assert epochs == sorted(set(epochs)) and epochs[-1] == 4, epochs
                assert [e for e in epochs if e > resumed_from[0]] == list(
                    range(resumed_from[0] + 1, 5)), epochs
            # The orphaned child's own STOPPED (in its file; its trainer was dead to copy it).
            assert [e["state"] for e in _file_events(store_dir, job.id)
                    if e["type"] == "state"].count("STOPPED") == 1

            # Promoted exactly once, and both serving replicas serve it.
            assert _versions_of(store_dir, job.id) == [final.model_version]
            assert DirectoryStore(store_dir).promoted_version() == final.model_version
            for client in (a, b):
                wait_until(lambda c=client: c.predict(images(2)).version == final.model_version,
                           f"version {final.model_version} served")
                assert client.model().version == final.model_version
            codes = {"serve A": serve_a.stop(), "serve B": serve_b.stop(),
                     "the other trainer": other.stop()}
            assert codes == {"serve A": 0, "serve B": 0, "the other trainer": 0}, (
                codes, serve_a.stderr_lines[-20:], serve_b.stderr_lines[-20:],
                other.stderr_lines[-20:])
        finally:
            for trainer in trainers:
                trainer.stop()


def test_a_hung_machine_loses_its_job_when_the_lease_lapses(store_dir, datasets,
                                                            postgres_url) -> None:
    """A trainer's machine hangs (SIGSTOP to the trainer and its training process: both still
    exist, so only the lease can tell): once the lease lapses the other trainer takes the job
    over and resumes it from its checkpoint; the hung trainer, going on, finds its claim gone,
    stops its training process and records nothing (fencing by attempt number)."""
    jobs = ("--jobs-url", postgres_url)
    training = ("--role", "train", *jobs, "--stale-job-after-s", "3")
    with running_server(store_dir, datasets, "--role", "serve", *jobs) as serving, \
            Client(serving.address) as client:
        trainers = [ServerProcess(store_dir, datasets, *training) for _ in range(2)]
        child = 0
        try:
            job = client.train(SMALL_SYNTHETIC, epochs=4, min_accuracy=0.0)
            wait_until(lambda: client.job(job.id).epoch >= 1, "one epoch", timeout=TRAINING_S)
            record = _record(postgres_url, job.id)
            hung = next(t for t in trainers if t.replica_id == record["trainer"])
            other = next(t for t in trainers if t is not hung)
            hung_id, other_id, child = hung.replica_id, other.replica_id, record["pid"]
            os.killpg(child, signal.SIGSTOP)
            wait_until(lambda: _stopped(child), "the training process to stop")
            _freeze(hung, postgres_url)
            try:
                wait_until(lambda: len(_record(postgres_url, job.id)["attempts"]) == 2,
                           "the takeover", timeout=TRAINING_S)
                assert _attempts(postgres_url, job.id)[0] == (hung_id, "lost")
            finally:
                hung.process.send_signal(signal.SIGCONT)  # its training process stays frozen
            wait_until(lambda: any("lost its claim" in line for line in hung.stderr_lines),
                       "the hung trainer to find its claim gone")
            wait_until(lambda: not process_alive(child), "it to stop its training process",
                       timeout=30)  # SIGTERM, and SIGKILL after the grace: it is frozen
            final = client.wait(job.id, timeout=TRAINING_S)
            assert final.state == "PROMOTED", final.error
            assert _attempts(postgres_url, job.id) == [(hung_id, "lost"), (other_id, "PROMOTED")]
            events = _events(postgres_url, job.id)
            assert [e["reclaimed_from"] for e in events if e.get("reclaimed_from")] == [hung_id]
            resumed_from = [e["epoch"] for e in events if e["type"] == "resumed"]
            assert len(resumed_from) == 1 and resumed_from[0] >= 1
            epochs = [e["epoch"] for e in _file_events(store_dir, job.id) if e["type"] == "epoch"]
            assert epochs == sorted(set(epochs)) and epochs[-1] == 4, epochs  # none twice
            assert _versions_of(store_dir, job.id) == [final.model_version]
            assert [hung.stop(), other.stop()] == [0, 0]
        finally:
            for process in [t.process.pid for t in trainers] + ([child] if child else []):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(process, signal.SIGCONT)
            for trainer in trainers:
                trainer.stop()


def test_the_trainer_taking_over_stops_the_hung_trainers_training_process(
        store_dir, datasets, postgres_url) -> None:
    jobs = ("--jobs-url", postgres_url)
    training = ("--role", "train", *jobs, "--stale-job-after-s", "3")
    with running_server(store_dir, datasets, "--role", "serve", *jobs) as serving, \
            Client(serving.address) as client:
        trainers = [ServerProcess(store_dir, datasets, *training) for _ in range(2)]
        try:
            # Many epochs: the hung trainer's child is not frozen and trains on, and with only a
            # few left it could finish and publish before the lease lapses (recovery then adopts
            # that version, rightly, and no takeover comes). The test ends at the takeover.
            job = client.train(SMALL_SYNTHETIC, epochs=40, min_accuracy=0.0)
            wait_until(lambda: client.job(job.id).epoch >= 1, "one epoch", timeout=TRAINING_S)
            record = _record(postgres_url, job.id)
            hung = next(t for t in trainers if t.replica_id == record["trainer"])
            _freeze(hung, postgres_url)  # its training process runs on, on this host
            wait_until(lambda: len(_record(postgres_url, job.id)["attempts"]) == 2,
                       "the takeover", timeout=TRAINING_S)
            # Stopped before the job went back to the queue (Recovery._stop_orphan).
            assert not process_alive(record["pid"])
        finally:
            for trainer in trainers:
                trainer.process.send_signal(signal.SIGCONT)
                trainer.stop()


def test_postgresql_down_jobs_unavailable_predict_unaffected(store_dir, datasets, onnx_models,
                                                             own_postgres: PostgresServer) -> None:
    url = own_postgres.create_database("jobs")
    publish(DirectoryStore(store_dir), onnx_models["bad"], accuracy=0.1)
    # The simple path: the lease (60 s) outlasts the outage (a few seconds: the calls below
    # each wait for the pool's connection timeout), so nobody takes the job over (with one
    # trainer nobody could anyway: a trainer never reclaims the job it runs itself).
    jobs = ("--jobs-url", url, "--stale-job-after-s", "60", *ACCEPT_ANY)
    predicted, failures = [0], []
    done = threading.Event()

    def predict_throughout(address: str) -> None:
        with Client(address, retries=0) as client:
            while not done.is_set():
                try:
                    client.predict(images(1))
                    predicted[0] += 1
                except Exception as error:  # each one is reported at the end
                    failures.append(repr(error))
                done.wait(0.02)  # steady traffic that leaves the 2 cores to the training

    with running_server(store_dir, datasets, "--role", "serve", *jobs) as serving, \
            running_server(store_dir, datasets, "--role", "train", *jobs) as trainer, \
            Client(serving.address) as client, \
            Client(serving.address, retries=0, timeout=30) as bare:
        predictor = threading.Thread(target=predict_throughout, args=(serving.address,),
                                     daemon=True)
        predictor.start()
        try:
            wait_until(lambda: predicted[0] > 0, "a first Predict")
            job = client.train(SMALL_SYNTHETIC, epochs=3, min_accuracy=0.0)
            record = wait_until(lambda: (r := _record(url, job.id))["pid"] and r,
                                "the job's training process", timeout=TRAINING_S)
            child = record["pid"]
            assert record["state"] == "RUNNING"

            own_postgres.stop()
            before = predicted[0]
            calls: dict[str, Callable[[], Any]] = {
                "Train": lambda: bare.train("synthetic:200", epochs=1,
                                            idempotency_key="during-the-outage"),
                "GetJob": lambda: bare.job(job.id),
                "ListJobs": bare.jobs,
                "WatchJob": lambda: list(bare.watch(job.id)),
                "CancelJob": lambda: bare.cancel(job.id),
            }
            with ThreadPoolExecutor(len(calls)) as pool:
                errors = dict(zip(calls, pool.map(_failure, calls.values()), strict=True))
            store_name = f"job store {own_postgres.url('jobs')} is unavailable"
            for name, error in errors.items():
                assert error.code == grpc.StatusCode.UNAVAILABLE, (name, error)
                assert store_name in error.details, (name, error.details)
            assert bare.health() == "SERVING"
            with Client(trainer.address, retries=0) as trainer_client:
                assert trainer_client.health() == "SERVING"
            assert bare.predict(images(3)).version == 1
            wait_until(lambda: predicted[0] > before + 5, "Predicts during the outage")
            assert process_alive(child)  # its trainer keeps it training meanwhile
            assert not own_postgres.running

            own_postgres.restart()
            final = client.wait(job.id, timeout=TRAINING_S)
            assert final.state == "PROMOTED", final.error
            # Its trainer carried on: one attempt, the same training process to the end.
            assert _attempts(url, job.id) == [(trainer.replica_id, "PROMOTED")]
            assert _versions_of(store_dir, job.id) == [final.model_version]
            with psycopg.connect(url) as connection:  # the Train of the outage left nothing
                assert connection.execute(
                    "SELECT count(*) FROM convserve_jobs WHERE idempotency_key = %s",
                    ("during-the-outage",)).fetchone() == (0,)

            after = client.train("synthetic:200", epochs=1, min_accuracy=0.0)
            second = client.wait(after.id, timeout=TRAINING_S)
            assert second.state == "PROMOTED", (second.error, second.gate_reason)
            assert _versions_of(store_dir, after.id) == [second.model_version]
            wait_until(lambda: client.predict(images(1)).version == second.model_version,
                       f"version {second.model_version} served")
        finally:
            done.set()
            predictor.join(timeout=30)
    assert predicted[0] > 0 and failures == [], failures[:5]


def test_a_database_restarted_under_load_loses_no_job_and_runs_none_twice(
        store_dir, datasets, own_postgres: PostgresServer) -> None:
    url = own_postgres.create_database("jobs")
    keys = [f"load-{n}" for n in range(4)]
    accepted: dict[str, str] = {}  # idempotency key -> the job id the service answered

    def submit(client: Client, key: str) -> None:
        deadline = time.monotonic() + 60
        while True:
            try:
                accepted[key] = client.train("synthetic:200", epochs=1, min_accuracy=0.0,
                                             idempotency_key=key).id
                return
            except ClientError as error:  # the database is down: retry with the same key
                if error.code != grpc.StatusCode.UNAVAILABLE or time.monotonic() > deadline:
                    raise
                assert "job store" in error.details, error.details

    # One replica that serves and trains; a lease (30 s) longer than the outage.
    with running_server(store_dir, datasets, "--role", "all", "--jobs-url", url,
                        "--stale-job-after-s", "30", *ACCEPT_ANY) as server, \
            Client(server.address) as client:
        for key in keys[:2]:
            submit(client, key)
        first = accepted[keys[0]]
        wait_until(lambda: _record(url, first)["pid"], "the first job's training process",
                   timeout=TRAINING_S)
        # A crash of the database while a job runs and another waits; the rest are submitted
        # while it is down and recovers (retried until it is back). The restart runs on this
        # thread: a postmaster dies with the thread that started it (tests/postgres.py).
        own_postgres.kill()
        with ThreadPoolExecutor(1) as pool:
            submitted = pool.submit(lambda: [submit(client, key) for key in keys[2:]])
            own_postgres.restart()
            submitted.result(timeout=120)
        assert own_postgres.running
        finals = {key: client.wait(job_id, timeout=TRAINING_S) for key, job_id in accepted.items()}
        assert server.stop() == 0, server.stderr_lines[-30:]

    assert sorted(accepted) == keys
    assert {key: f.state for key, f in finals.items()} == dict.fromkeys(keys, "PROMOTED"), {
        key: f.error for key, f in finals.items()}
    with psycopg.connect(url) as connection:  # every key names one job, and no other job exists
        rows = connection.execute("SELECT idempotency_key, id FROM convserve_jobs").fetchall()
    assert sorted(rows) == sorted(accepted.items())
    for key, job_id in accepted.items():
        attempts = _record(url, job_id)["attempts"]
        outcomes = [a["outcome"] for a in attempts]
        # One attempt ran to the end; one lost before it at most (then resumed, not redone).
        assert outcomes in (["PROMOTED"], ["lost", "PROMOTED"]), (key, attempts)
        epochs = [e["epoch"] for e in _file_events(store_dir, job_id) if e["type"] == "epoch"]
        assert epochs == [1], (key, epochs)  # trained once
        states = [e["state"] for e in _events(url, job_id) if e["type"] == "state"]
        assert states.count("PROMOTED") == 1 and states[-1] == "PROMOTED", (key, states)
        assert _versions_of(store_dir, job_id) == [finals[key].model_version]
    assert len(DirectoryStore(store_dir).versions()) == len(keys)  # one version per promotion


def test_a_job_reaching_its_publication_while_postgresql_is_down_still_promotes_once(
        store_dir, datasets, own_postgres: PostgresServer) -> None:
    url = own_postgres.create_database("jobs")
    with running_server(store_dir, datasets, "--role", "all", "--jobs-url", url,
                        "--stale-job-after-s", "60", *ACCEPT_ANY) as server, \
            Client(server.address) as client:
        job = client.train("synthetic:200", epochs=1, min_accuracy=0.0)
        child = wait_until(lambda: _record(url, job.id)["pid"], "the job's training process",
                           timeout=TRAINING_S)

        def wrote(kind: str, **fields: Any) -> bool:
            return any(e["type"] == kind and all(e.get(k) == v for k, v in fields.items())
                       for e in _file_events(store_dir, job.id))

        # Its last epoch is done: the database goes down before the export, gate and publish.
        wait_until(lambda: wrote("epoch"), "the job's epoch", timeout=TRAINING_S)
        own_postgres.stop()
        wait_until(lambda: wrote("state", state="GATING"), "the gate, with the database down",
                   timeout=TRAINING_S)
        # Down until the training process has ended, or for 5 s if it waits for the database.
        deadline = time.monotonic() + 5
        wait_until(lambda: not process_alive(child) or time.monotonic() > deadline,
                   "the training process to end or wait")
        own_postgres.restart()
        final = client.wait(job.id, timeout=TRAINING_S)
        assert final.state == "PROMOTED", (final.error, server.stderr_lines[-10:])
        assert _versions_of(store_dir, job.id) == [final.model_version]
