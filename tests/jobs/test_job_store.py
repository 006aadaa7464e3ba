"""The job store's contract (convserve.jobs.backend), one suite against both backends: files in
a model store's directory, and a real PostgreSQL (tests/postgres.py) — never a mock of either.

Replicas are JobRunners in this process, each with its own job store (its own files handles, its
own connection pool), racing from threads: the locks under test are the stores' (flock, row
locks), which exclude threads as they exclude processes. What needs real trainer processes (a
SIGKILLed trainer resumed by another) is tests/system/test_postgres_jobs.py and
tests/system/test_roles.py.
"""

from __future__ import annotations

import asyncio
import functools
import threading
import time
from collections import Counter
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest

from convserve.contracts.errors import (
    AlreadyExists,
    ClaimLost,
    Conflict,
    InvalidInput,
    LimitExceeded,
    NotFound,
)
from convserve.contracts.job_state import JobState
from convserve.jobs import JobRecord, JobRunner, TrainParams
from convserve.jobs.config import GatePolicy
from convserve.store.job_spec import read_job_spec

LEASE_S = 0.5  # short, so a lapsed lease takes a moment; never a measurement


@pytest.fixture
def replicas(replica_factory: Callable[..., JobRunner], jobs_url: str) -> Callable[..., JobRunner]:
    """replicas("trainer-a", max_queue=2, ...) -> a JobRunner on the test's stores."""
    return functools.partial(replica_factory, jobs_url=jobs_url, stale_after_s=LEASE_S)


def _claim(runner: JobRunner) -> JobRecord:
    record = runner.claim_next()
    assert record is not None, "nothing to claim"
    return record


def _lapse(runner: JobRunner, job_id: str) -> None:
    """Wait until the job's lease has lapsed (its trainer stopped renewing it)."""
    deadline = time.monotonic() + 30
    while job_id not in runner.jobs.expired():
        assert time.monotonic() < deadline, "the lease never lapsed"
        time.sleep(0.05)


def _states(runner: JobRunner, job_id: str) -> list[str]:
    return [e["state"] for _, e in runner.jobs.follow(job_id).read()
            if e is not None and e.get("type") == "state"]


def test_submit_get_list_and_the_queue_is_fifo(replicas) -> None:
    a, b = replicas("replica-a"), replicas("replica-b")
    jobs = [a.submit(TrainParams.of(epochs=n)) for n in (1, 2, 3)]
    assert [b.get(j.id).params.config.epochs for j in jobs] == [1, 2, 3]
    assert [r.id for r in b.list()] == [j.id for j in reversed(jobs)]  # newest first
    assert b.queue_positions() == {j.id: n for n, j in enumerate(jobs, 1)}
    assert b.queued() == 3
    assert [_claim(b).id for _ in jobs] == [j.id for j in jobs]
    assert b.claim_next() is None and a.queue_positions() == {}
    with pytest.raises(NotFound, match="nosuchjob"):
        b.get("nosuchjob")


def test_the_gate_policy_is_resolved_at_submit_and_the_trainer_uses_the_stored_one(
        replicas) -> None:
    strict = replicas("server-a", gate_defaults=GatePolicy(min_accuracy=0.7))
    job = strict.submit(TrainParams.of(gate={"min_improvement": 0.01}))
    assert job.gate_policy == GatePolicy(min_accuracy=0.7, min_improvement=0.01).to_dict()
    # A trainer whose own defaults differ runs the job with the policy it was submitted with.
    lenient = replicas("trainer-b", gate_defaults=GatePolicy(min_accuracy=0.1))
    claimed = _claim(lenient)
    lenient.command(claimed)
    spec = read_job_spec(lenient.models.work.job_dir(job.id))
    assert spec.gate == GatePolicy(min_accuracy=0.7, min_improvement=0.01)
    assert spec.attempt == 1


def test_an_idempotency_key_maps_to_one_job_across_replicas(replicas) -> None:
    a, b = replicas("replica-a"), replicas("replica-b")
    first = a.submit(TrainParams.of(epochs=2), idempotency_key="nightly-2026-12-03")
    again = b.submit(TrainParams.of(epochs=2), idempotency_key="nightly-2026-12-03")
    assert again.id == first.id and len(b.list()) == 1
    with pytest.raises(AlreadyExists, match="epochs differ"):
        b.submit(TrainParams.of(epochs=3), idempotency_key="nightly-2026-12-03")
    # Racing retries of one key, from eight threads on two replicas: still one job.
    with ThreadPoolExecutor(8) as pool:
        ids = set(pool.map(lambda n: (a, b)[n % 2].submit(
            TrainParams.of(), idempotency_key="raced").id, range(8)))
    assert len(ids) == 1 and len(a.list()) == 2
    with pytest.raises(InvalidInput, match="control characters"):  # PostgreSQL text holds no NUL
        a.submit(TrainParams.of(), idempotency_key="nightly\x00")


def test_the_queue_bound_holds_under_racing_submits(replicas) -> None:
    runners = [replicas(f"replica-{n}", max_queue=3) for n in range(4)]

    def submit(n: int) -> str:
        try:
            return runners[n % 4].submit(TrainParams.of()).id
        except LimitExceeded as error:
            assert "training queue is full (3 jobs waiting)" in str(error)
            return "refused"

    with ThreadPoolExecutor(8) as pool:
        outcomes = Counter("refused" if r == "refused" else "queued" for r in pool.map(
            submit, range(12)))
    assert outcomes == {"queued": 3, "refused": 9}
    assert runners[0].queued() == 3 and len(runners[0].list()) == 3  # refused: nothing written


def test_trainers_racing_claim_each_job_exactly_once_in_fifo_order(replicas) -> None:
    submitter = replicas("server", max_queue=24)
    submitted = [submitter.submit(TrainParams.of()).id for _ in range(24)]
    trainers = [replicas(f"trainer-{n}") for n in range(4)]
    start = threading.Barrier(len(trainers))

    def drain(trainer: JobRunner) -> list[str]:
        start.wait()
        claimed = []
        while (record := trainer.claim_next()) is not None:
            claimed.append(record.id)
        return claimed

    with ThreadPoolExecutor(len(trainers)) as pool:
        shares = list(pool.map(drain, trainers))
    every = [job_id for share in shares for job_id in share]
    assert sorted(every) == sorted(submitted)  # each exactly once
    for share in shares:  # each trainer took its jobs oldest first
        assert share == sorted(share, key=submitted.index)
    for job_id in submitted:
        record = submitter.get(job_id)
        assert record.state == JobState.RUNNING and [a.number for a in record.attempts] == [1]


def test_a_lapsed_lease_is_taken_over_and_the_old_attempt_is_fenced(replicas) -> None:
    a, b = replicas("trainer-a"), replicas("trainer-b")
    job = a.submit(TrainParams.of())
    first = _claim(a)
    assert b.recover() == []  # a live lease: nothing to reclaim
    assert a.child.heartbeat(first)  # renewed
    _lapse(b, job.id)  # trainer-a hangs: no heartbeat
    assert b.recover() == [job.id]
    requeued = b.get(job.id)
    assert requeued.state == JobState.QUEUED
    assert [(t.trainer, t.outcome) for t in requeued.attempts] == [("trainer-a", "lost")]
    second = _claim(b)
    assert second.attempt == 2
    # trainer-a comes back: its heartbeat finds the claim gone, and it writes nothing.
    assert a.child.heartbeat(first) is False
    a.child.end_attempt(first, JobState.FAILED, error="a's late verdict")
    now = a.get(job.id)
    assert now.state == JobState.RUNNING and now.trainer == "trainer-b" and not now.error
    # The fence a training process checks right before publishing: only attempt 2 passes.
    b.jobs.fence(job.id, 2)
    with pytest.raises(ClaimLost, match="attempt 1 of job .* no longer holds it"):
        a.jobs.fence(job.id, 1)
    assert _states(a, job.id) == ["QUEUED", "RUNNING", "QUEUED", "RUNNING"]


def test_attempts_are_bounded(replicas) -> None:
    server = replicas("server", max_attempts=2)
    job = server.submit(TrainParams.of())
    for trainer in ("trainer-1", "trainer-2"):
        _claim(replicas(trainer))
        _lapse(server, job.id)
        assert server.recover() == [job.id]
    record = server.get(job.id)
    assert record.state == JobState.FAILED and record.lost_attempts == 2
    assert "its trainer died 2 times (trainer-1, trainer-2)" in record.error
    assert server.claim_next() is None


def test_cancel_a_queued_job_at_once_and_flag_a_claimed_one(replicas) -> None:
    a, b = replicas("replica-a", cancel_grace_s=0.1, heartbeat_s=0.1), replicas("trainer-b")
    queued, claimed = a.submit(TrainParams.of()), a.submit(TrainParams.of())
    assert a.cancel(queued.id).state == JobState.CANCELLED
    running = _claim(b)
    assert running.id == claimed.id
    a.jobs.request_cancel(claimed.id)
    # The trainer learns it with its next heartbeat (the same transaction renews the lease).
    held, cancelled = b.child._beat_and_check(running, _no_events())
    assert held and cancelled
    with pytest.raises(Conflict, match="already finished: CANCELLED"):
        b.cancel(queued.id)
    with pytest.raises(NotFound):
        a.cancel("nosuchjob")


def test_resume_queues_an_interrupted_job_once(replicas) -> None:
    a, b = replicas("replica-a"), replicas("replica-b")
    job = a.submit(TrainParams.of())
    with pytest.raises(Conflict, match="only an INTERRUPTED job"):
        a.resume(job.id)
    _claim(a)
    with a.jobs.locked(job.id) as transaction:  # as a replica stopped by hand leaves it
        transaction.record.state = JobState.INTERRUPTED
        transaction.save()
    with ThreadPoolExecutor(4) as pool:
        resumed = list(pool.map(lambda n: (a, b)[n % 2].resume(job.id), range(4)))
    assert {r.state for r in resumed} == {JobState.QUEUED} and b.get(job.id).resumes == 1
    assert b.queue_positions() == {job.id: 1}


def test_watch_follows_another_replicas_events_and_resumes_after_a_sequence(replicas) -> None:
    writer, reader = replicas("trainer-a"), replicas("replica-b")
    job = writer.submit(TrainParams.of())

    async def scenario() -> tuple[list[tuple[int, dict]], list[tuple[int, dict]]]:
        seen: list[tuple[int, dict]] = []

        async def follow() -> None:
            async for item in reader.watch(job.id):
                seen.append(item)

        task = asyncio.create_task(follow())
        for step in range(1, 4):
            while len(seen) < step:  # each event is seen before the next is written
                await asyncio.sleep(0.01)
            with writer.jobs.locked(job.id) as transaction:
                transaction.event("progress", step=step)
                transaction.save()
        await asyncio.to_thread(writer.cancel, job.id)
        await asyncio.wait_for(task, 20)  # ends by itself once the job is final
        later = [item async for item in reader.watch(job.id, after_sequence=2)]
        return seen, later

    seen, later = asyncio.run(scenario())
    assert [s for s, _ in seen] == [1, 2, 3, 4, 5]
    assert [e.get("step") for _, e in seen[1:4]] == [1, 2, 3]
    assert seen[-1][1]["state"] == "CANCELLED"
    assert later == seen[2:]  # a watcher that reconnects resumes after its last sequence


def _no_events() -> Any:
    from convserve.jobs.child import ChildEvents

    return ChildEvents(None, forward=False)
