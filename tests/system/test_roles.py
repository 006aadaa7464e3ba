"""Serving and training scaled apart (`convserve serve --role serve|train`): real replicas in
child processes on one shared store directory, as separate Deployments on one RWX volume are."""

from __future__ import annotations

import json
import signal
from pathlib import Path
from typing import Any

import grpc
import pytest

from convserve.client import Client, ClientError
from convserve.store.directory import DirectoryStore
from tests.servers import ServerProcess, images, publish, running_server
from tests.waits import process_alive, wait_until

pytestmark = pytest.mark.slow
TRAINING_S = 300  # a bound for 2 shared cores, never a measurement
# The operator's gate, on the replicas that accept the Trains (a job's gate policy is resolved
# there, once, and stored with it): any candidate passes (1-epoch models and the untrained
# champion all score near chance; the gate itself is tests/training/test_gate.py's).
ACCEPT_ANY = ("--min-improvement", "-1")



def _record(store: Path, job_id: str) -> dict[str, Any]:
    return json.loads((DirectoryStore(store).work.job_dir(job_id) / "job.json").read_text())


def _events(store: Path, job_id: str) -> list[dict[str, Any]]:
    path = DirectoryStore(store).work.job_dir(job_id) / "events.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()]


def _runs(store: Path, job_id: str) -> list[str]:
    """The trainer of each RUNNING state event: one per claim."""
    return [e["trainer"] for e in _events(store, job_id)
            if e["type"] == "state" and e["state"] == "RUNNING"]


def _attempts(store: Path, job_id: str) -> list[tuple[str, str]]:
    return [(a["trainer"], a["outcome"]) for a in _record(store, job_id)["attempts"]]


def test_two_serving_replicas_queue_and_one_trainer_runs(store_dir, datasets, onnx_models
                                                          ) -> None:
    publish(DirectoryStore(store_dir), onnx_models["bad"], accuracy=0.1)
    with running_server(store_dir, datasets, "--role", "serve", *ACCEPT_ANY) as first, \
            running_server(store_dir, datasets, "--role", "serve", *ACCEPT_ANY) as second, \
            Client(first.address) as a, Client(second.address) as b:
        job_a = a.train("synthetic:200", epochs=1, min_accuracy=0.0)
        job_b = b.train("synthetic:200", epochs=1, min_accuracy=0.0)
        # No trainer yet: both wait in the one queue, and either replica says so.
        assert [b.job(job_a.id).state, a.job(job_b.id).state] == ["QUEUED", "QUEUED"]
        assert (a.job(job_b.id).message.queue_position, b.job(job_a.id).message.queue_position
                ) == (2, 1)
        assert first.metric("convserve_jobs_queued") == 2
        assert first.metric("convserve_jobs_running") == 0
        with running_server(store_dir, datasets, "--role", "train") as trainer, \
                Client(trainer.address) as t:
            assert t.health() == "SERVING"  # a trainer is ready without a model
            with pytest.raises(ClientError) as no_inference:
                t.predict(images(1))
            assert no_inference.value.code == grpc.StatusCode.UNIMPLEMENTED
            for client, job in ((b, job_a), (a, job_b)):  # watched on the other replica
                final = client.wait(job.id, timeout=TRAINING_S)
                assert final.state == "PROMOTED", final.error
            me = trainer.replica_id
        for job, accepted_by in ((job_a, first), (job_b, second)):
            assert _record(store_dir, job.id)["replica"] == accepted_by.replica_id
            assert _runs(store_dir, job.id) == [me]  # once, on the trainer
            assert _attempts(store_dir, job.id) == [(me, "PROMOTED")]
        assert DirectoryStore(store_dir).promoted_version() == 3  # the untrained 1, then 2 and 3
        for client in (a, b):
            wait_until(lambda c=client: c.predict(images(1)).version == 3, "version 3 served")
        assert [j.id for j in a.jobs()] == [j.id for j in b.jobs()]


def test_two_racing_trainers_run_each_job_exactly_once(store_dir, datasets, onnx_models
                                                        ) -> None:
    publish(DirectoryStore(store_dir), onnx_models["bad"], accuracy=0.1)
    with running_server(store_dir, datasets, "--role", "serve", *ACCEPT_ANY) as serving, \
            Client(serving.address) as client:
        jobs = [client.train("synthetic:64", epochs=1, seed=seed, min_accuracy=0.0).id
                for seed in range(4)]
        with running_server(store_dir, datasets, "--role", "train") as one, \
                running_server(store_dir, datasets, "--role", "train") as two:
            finals = [client.wait(job_id, timeout=TRAINING_S) for job_id in jobs]
            trainers = {one.replica_id, two.replica_id}
    assert [f.state for f in finals] == ["PROMOTED"] * 4, [f.error for f in finals]
    for job_id in jobs:
        runs = _runs(store_dir, job_id)
        assert len(runs) == 1 and runs[0] in trainers, runs
        assert len(_attempts(store_dir, job_id)) == 1
    # Four promotions, one version each: no job published twice.
    cards = [DirectoryStore(store_dir).card(v) for v in DirectoryStore(store_dir).versions()]
    assert sorted(c.get("job_id") or "" for c in cards) == sorted(["", *jobs])


def test_a_trainer_killed_mid_job_is_resumed_from_its_checkpoint_by_another(
        store_dir, datasets) -> None:
    fast_reclaim = ("--stale-job-after-s", "5")
    with running_server(store_dir, datasets, "--role", "serve", *ACCEPT_ANY) as serving, \
            Client(serving.address) as client:
        job = client.train("digits", epochs=3, min_accuracy=0.0)
        one = ServerProcess(store_dir, datasets, "--role", "train", *fast_reclaim)
        try:
            wait_until(lambda: _runs(store_dir, job.id), "the first trainer's claim")
            # A second trainer, idle meanwhile: its periodic recovery notices the first one's
            # death (its process is gone from this host; on another host, its heartbeat stops).
            with running_server(store_dir, datasets, "--role", "train", *fast_reclaim) as two:
                wait_until(lambda: client.job(job.id).epoch >= 1, "one epoch",
                           timeout=TRAINING_S, interval=0.2)
                child = _record(store_dir, job.id)["pid"]
                one.process.send_signal(signal.SIGKILL)
                one.process.wait(timeout=30)
                # Its training process dies with it (SIGTERM from the kernel: it keeps its
                # checkpoint), and the job goes on on the second trainer.
                wait_until(lambda: not process_alive(child), "the orphaned child to stop")
                final = client.wait(job.id, timeout=TRAINING_S)
                assert final.state == "PROMOTED", final.error
                killed, other = one.replica_id, two.replica_id
        finally:
            one.stop()
    assert _attempts(store_dir, job.id) == [(killed, "lost"), (other, "PROMOTED")]
    assert final.message.attempts[0].outcome == "lost"  # GetJob says so too
    events = _events(store_dir, job.id)
    reclaimed = [e for e in events if e["type"] == "state" and e.get("reclaimed_from")]
    assert [e["reclaimed_from"] for e in reclaimed] == [killed]
    states = [e["state"] for e in events if e["type"] == "state"]
    # The orphaned child's own STOPPED, never a final state before the job's end.
    assert states.count("STOPPED") == 1 and "INTERRUPTED" not in states
    resumed_from = [e["epoch"] for e in events if e["type"] == "resumed"]
    assert len(resumed_from) == 1 and resumed_from[0] >= 1
    epochs = [e["epoch"] for e in events if e["type"] == "epoch"]
    # No finished epoch trained twice: the second attempt started after the checkpoint's.
    assert epochs == sorted(set(epochs)) and epochs[-1] == 3
    assert [e for e in epochs if e > resumed_from[0]] == list(range(resumed_from[0] + 1, 4))
    assert [c.get("job_id") for c in map(DirectoryStore(store_dir).card,
                                         DirectoryStore(store_dir).versions())].count(job.id) == 1


def test_a_serving_replica_cancels_a_queued_job_and_a_claimed_one(store_dir, datasets,
                                                                  onnx_models) -> None:
    publish(DirectoryStore(store_dir), onnx_models["bad"], accuracy=0.1)
    with running_server(store_dir, datasets, "--role", "serve", *ACCEPT_ANY) as serving, \
            running_server(store_dir, datasets, "--role", "train") as trainer, \
            Client(serving.address) as client:
        long_job = client.train("synthetic:5000", epochs=50)
        wait_until(lambda: _record(store_dir, long_job.id)["pid"], "the long job to start",
                   timeout=TRAINING_S)
        child = _record(store_dir, long_job.id)["pid"]
        queued = client.train("digits", epochs=1)  # behind it: the trainer runs one at a time
        assert client.job(queued.id).state == "QUEUED"
        assert client.cancel(queued.id).state == "CANCELLED"
        cancelled = client.cancel(long_job.id)  # returns once the trainer has stopped it
        assert cancelled.state == "CANCELLED"
        assert not process_alive(child)
        with pytest.raises(ClientError) as finished:
            client.cancel(long_job.id)
        assert finished.value.code == grpc.StatusCode.FAILED_PRECONDITION
        me = trainer.replica_id
    assert _attempts(store_dir, long_job.id) == [(me, "CANCELLED")]
    assert _attempts(store_dir, queued.id) == []  # never claimed
    assert [e["state"] for e in _events(store_dir, queued.id) if e["type"] == "state"] == [
        "QUEUED", "CANCELLED"]
    assert DirectoryStore(store_dir).versions() == [1]
