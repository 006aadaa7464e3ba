"""Recovery of jobs whose trainer died (convserve.jobs.recovery): each way `_reconcile` decides
a job's fate, against both job stores. A trainer is "dead" here the way recovery sees it on one
host: its replica id names this host and a pid that no longer exists, so no lease has to lapse.
(A lapsed lease and the bound on attempts through it: tests/jobs/test_job_store.py.)"""

from __future__ import annotations

import functools
import json
import os
import signal
import socket
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from convserve.contracts.job_state import JobState
from convserve.contracts.model_card import GateDecision
from convserve.jobs import JobRecord, JobRunner, TrainParams
from tests.waits import started


@pytest.fixture
def replicas(replica_factory: Callable[..., JobRunner], jobs_url: str) -> Callable[..., JobRunner]:
    return functools.partial(replica_factory, jobs_url=jobs_url, cancel_grace_s=10.0)


def _dead_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def _dead_trainer() -> str:
    return f"{socket.gethostname()}:{_dead_pid()}"


def _claimed_by_a_dead_trainer(replicas: Callable[..., JobRunner], **config: Any
                               ) -> tuple[JobRunner, JobRecord]:
    """A job claimed by a trainer on this host whose process is gone; and a live replica."""
    survivor = replicas("survivor", **config)
    job = survivor.submit(TrainParams.of())
    dead = replicas(_dead_trainer())
    record = dead.claim_next()
    assert record is not None and record.id == job.id
    return survivor, record


def _states(runner: JobRunner, job_id: str) -> list[str]:
    return [e["state"] for _, e in runner.jobs.follow(job_id).read()
            if e is not None and e.get("type") == "state"]


def test_a_live_trainer_on_this_host_keeps_its_job(replicas) -> None:
    survivor = replicas("survivor")
    job = survivor.submit(TrainParams.of())
    alive = replicas(f"{socket.gethostname()}:{os.getpid()}")  # this process: alive
    assert alive.claim_next() is not None
    elsewhere = replicas("survivor-2")
    assert elsewhere.recover() == []
    assert elsewhere.get(job.id).state == JobState.RUNNING


def test_another_hosts_trainer_with_a_live_lease_keeps_its_job(replicas) -> None:
    survivor = replicas("survivor")
    job = survivor.submit(TrainParams.of())
    assert replicas("otherhost.invalid:1").claim_next() is not None  # no pid to look at
    assert survivor.recover() == []
    assert survivor.get(job.id).state == JobState.RUNNING


def test_a_dead_trainers_job_goes_back_to_the_queue_at_once(replicas) -> None:
    survivor, record = _claimed_by_a_dead_trainer(replicas)
    assert survivor.recover() == [record.id]
    requeued = survivor.get(record.id)
    assert requeued.state == JobState.QUEUED and requeued.pid is None
    assert [(a.trainer, a.outcome) for a in requeued.attempts] == [(record.trainer, "lost")]
    assert survivor.queue_positions() == {record.id: 1}
    assert _states(survivor, record.id) == ["QUEUED", "RUNNING", "QUEUED"]
    assert survivor.recover() == []  # done once


def test_a_job_whose_model_was_published_is_promoted_with_that_version(
        replicas, tmp_path: Path) -> None:
    survivor, record = _claimed_by_a_dead_trainer(replicas)
    model = tmp_path / "model.onnx"
    model.write_bytes(b"the child's model")  # the store copies bytes; it does not load them
    decision = GateDecision(True, ("first model",), candidate_accuracy=0.8, parity_passed=True)
    published = survivor.models.publish(model, {"classes": ["a", "b"]}, lambda _: decision,
                                        actor="child", job_id=record.id)
    assert survivor.recover() == [record.id]
    done = survivor.get(record.id)
    assert (done.state, done.model_version) == (JobState.PROMOTED, published.version)
    assert done.gate is not None and done.gate.promoted and done.gate.reasons == ("first model",)
    assert done.attempts[-1].outcome == "PROMOTED" and done.error == ""
    events = [e for _, e in survivor.jobs.follow(record.id).read() if e is not None]
    assert (events[-1]["state"], events[-1]["version"], events[-1]["reconciled"]) == (
        "PROMOTED", published.version, True)


def test_a_job_whose_child_wrote_rejected_is_rejected_with_its_cards_gate(replicas) -> None:
    survivor, record = _claimed_by_a_dead_trainer(replicas)
    gate = GateDecision(False, ("accuracy 0.1 is below min_accuracy 0.5",),
                        candidate_accuracy=0.1, required_accuracy=0.5)
    job_dir = survivor.models.work.job_dir(record.id, create=True)
    (job_dir / "card.json").write_text(json.dumps({"gate": gate.to_dict()}))
    with survivor.jobs.locked(record.id) as transaction:  # the child's last event
        transaction.event("state", state=JobState.REJECTED.value)
        transaction.save()
    assert survivor.recover() == [record.id]
    done = survivor.get(record.id)
    assert done.state == JobState.REJECTED and done.gate == gate
    assert done.model_version is None and done.attempts[-1].outcome == "REJECTED"
    assert _states(survivor, record.id) == ["QUEUED", "RUNNING", "REJECTED"]  # not repeated
    assert survivor.queue_positions() == {}


def test_a_job_asked_to_cancel_is_cancelled_not_requeued(replicas) -> None:
    survivor, record = _claimed_by_a_dead_trainer(replicas)
    survivor.jobs.request_cancel(record.id)
    assert survivor.recover() == [record.id]
    done = survivor.get(record.id)
    assert done.state == JobState.CANCELLED
    assert done.error == f"cancelled (its trainer {record.trainer} stopped)"
    assert _states(survivor, record.id)[-1] == "CANCELLED" and survivor.queued() == 0


def test_a_job_out_of_attempts_fails_naming_its_trainers(replicas) -> None:
    survivor, record = _claimed_by_a_dead_trainer(replicas, max_attempts=1)
    assert survivor.recover() == [record.id]
    done = survivor.get(record.id)
    assert done.state == JobState.FAILED and done.lost_attempts == 1
    assert done.error.startswith(f"its trainer died 1 times ({record.trainer}); not retried "
                                 "again (--max-job-attempts 1)")
    assert f"checkpoints in jobs/{record.id}/checkpoints" in done.error
    assert survivor.claim_next() is None


def test_a_job_carrying_this_replicas_own_id_is_an_earlier_process_s(replicas) -> None:
    """A restarted container with the same hostname and pid: its own id, but not running here."""
    me = f"{socket.gethostname()}:{os.getpid()}"
    earlier = replicas(me)
    job = earlier.submit(TrainParams.of())
    assert earlier.claim_next() is not None
    restarted = replicas(me)
    assert restarted.recover() == [job.id]
    assert restarted.get(job.id).state == JobState.QUEUED


def test_an_orphaned_training_process_on_this_host_is_stopped_first(
        replicas, tmp_path: Path) -> None:
    survivor, record = _claimed_by_a_dead_trainer(replicas)
    job_dir = survivor.models.work.job_dir(record.id, create=True)
    # What a job's child looks like in /proc: `... convserve.training --job <store>/jobs/<id>`.
    orphan = subprocess.Popen(
        [sys.executable, "-c", "import time; time.sleep(120)", "convserve.training", "--job",
         str(job_dir)],
        start_new_session=True)
    started(orphan.pid)
    try:
        with survivor.jobs.locked(record.id) as transaction:
            transaction.record.pid = orphan.pid
            transaction.save()
        assert survivor.recover() == [record.id]
        assert orphan.wait(30) == -signal.SIGTERM  # SIGTERM first: it may keep its checkpoint
    finally:
        orphan.kill()
        orphan.wait()
    assert survivor.get(record.id).state == JobState.QUEUED
