"""The job runner on its own: real store, real `python -m convserve.training` children, two "replicas"
(JobRunner objects with their own replica ids) sharing one store directory and its queue."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from convserve.contracts.errors import AlreadyExists, Conflict, InvalidInput, LimitExceeded, NotFound
from convserve.contracts.gate_policy import GateBounds
from convserve.contracts.job_state import JobState
from convserve.contracts.spec import TrainConfig
from convserve.jobs import JobRecord, JobRunner, RunnerConfig, TrainParams
from convserve.store.directory import DirectoryStore
from convserve.store.job_dir import read_events
from tests.conftest import REPO_ROOT
from tests.waits import started

TINY = {"dataset": "synthetic:200", "epochs": 1, "batch_size": 32}
LONG = {"dataset": "synthetic:5000", "epochs": 50}  # never finishes: cancelled or killed early
WAIT_S = 240.0  # 2 shared cores: a child can take a while


def _runner(store_dir: Path, replica: str = "replica-a", **config: Any) -> JobRunner:
    settings: dict[str, Any] = {
        "datasets_root": store_dir.parent / "datasets", "replica_id": replica,
        "child_env": {"PYTHONPATH": str(REPO_ROOT)}, "heartbeat_s": 0.2, "cancel_grace_s": 3.0,
        **config}
    return JobRunner(DirectoryStore(store_dir), RunnerConfig(**settings))


def _with_worker(runner: JobRunner, scenario: Callable[[], Awaitable[Any]]) -> Any:
    """Run `scenario` while `runner.run` works in the same loop; stop the worker afterwards."""

    async def main() -> Any:
        stop = asyncio.Event()
        worker = asyncio.create_task(runner.run(stop))
        try:
            return await scenario()
        finally:
            stop.set()
            await asyncio.wait_for(worker, 30)

    return asyncio.run(main())


async def _until(check: Callable[[], Any], what: str, timeout: float = WAIT_S) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        await asyncio.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def _running(runner: JobRunner, job_id: str) -> Callable[[], JobRecord | None]:
    def check() -> JobRecord | None:
        record = runner.get(job_id)
        assert not record.state.final, record
        return record if record.state == JobState.RUNNING and record.pid else None
    return check


def _events(store_dir: Path, job_id: str) -> list[dict[str, Any]]:
    return read_events(DirectoryStore(store_dir).work.job_dir(job_id) / "events.jsonl")


def _states(store_dir: Path, job_id: str) -> list[str]:
    return [e["state"] for e in _events(store_dir, job_id) if e["type"] == "state"]


def _group_gone(pgid: int, timeout: float = 60.0) -> bool:
    """True once no process is left in the group (an orphan is reaped by init a moment later)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            os.killpg(pgid, 0)
        except ProcessLookupError:
            return True
        time.sleep(0.05)
    return False


def _dead_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


# --- real trainings ------------------------------------------------------------------------------


def test_a_job_is_promoted_watched_from_another_replica_then_a_stricter_gate_rejects(
        store_dir: Path) -> None:
    a, b = _runner(store_dir, "replica-a"), _runner(store_dir, "replica-b")
    first = a.submit(TrainParams.of(**TINY, gate={"min_accuracy": 0.0}))
    second = a.submit(TrainParams.of(**TINY, seed=1, gate={"min_accuracy": 0.0,
                                                        "min_improvement": 1.0}))
    assert (a.queue_position(first.id), a.queue_position(second.id)) == (1, 2)
    assert b.queue_position(first.id) == 1  # one queue, in the store: every replica agrees

    async def scenario() -> list[tuple[int, dict]]:
        watched = [item async for item in b.watch(first.id)]
        await _until(lambda: a.get(second.id).state.final, "the second job")
        return watched

    watched = _with_worker(a, scenario)

    store = DirectoryStore(store_dir)
    done = b.get(first.id)
    assert done.state == JobState.PROMOTED, done.error
    assert done.model_version == 1 and done.gate and done.gate.promoted is True
    assert done.epoch == 1 and done.val_accuracy is not None
    assert done.started_at and done.finished_at and done.pid and done.replica == "replica-a"
    assert [(t.number, t.trainer, t.outcome) for t in done.attempts] == [
        (1, "replica-a", "PROMOTED")]
    assert store.versions() == [1] and store.promoted_version() == 1
    assert store.card(1)["job_id"] == first.id

    events = _events(store_dir, first.id)
    assert watched == list(enumerate(events, 1))  # every line, in order, sequences 1, 2, ...
    states = _states(store_dir, first.id)
    assert states[:2] == ["QUEUED", "RUNNING"] and states[-1] == "PROMOTED"
    assert states.count("PROMOTED") == 1 and "epoch" in {e["type"] for e in events}

    async def resume() -> list[tuple[int, dict]]:
        return [item async for item in b.watch(first.id, after_sequence=len(events) - 1)]

    assert asyncio.run(resume()) == [(len(events), events[-1])]
    assert [r.id for r in b.list()] == [second.id, first.id]  # newest first

    rejected = b.get(second.id)
    assert rejected.state == JobState.REJECTED, rejected.error
    assert rejected.model_version is None and rejected.gate.promoted is False
    assert "min_improvement" in rejected.gate.reason
    assert store.versions() == [1] and store.promoted_version() == 1
    assert _states(store_dir, second.id)[-1] == "REJECTED"

    with pytest.raises(Conflict, match=f"job {first.id} already finished: PROMOTED"):
        b.cancel(first.id)


def test_a_child_refusing_its_input_fails_the_job_with_its_error_line(store_dir: Path) -> None:
    runner = _runner(store_dir)
    job = runner.submit(TrainParams.of(dataset="folder:missing", epochs=1))

    _with_worker(runner, lambda: _until(lambda: runner.get(job.id).state.final, "the job"))

    record = runner.get(job.id)
    assert record.state == JobState.FAILED and record.finished_at
    assert "python -m convserve.training: error:" in record.error and "missing" in record.error
    states = _states(store_dir, job.id)
    assert states[-1] == "FAILED" and states.count("FAILED") == 1  # the child's, not doubled


def test_a_child_killed_by_sigkill_fails_the_job_naming_the_signal(store_dir: Path) -> None:
    runner = _runner(store_dir)
    job = runner.submit(TrainParams.of(**LONG))

    async def scenario() -> None:
        record = await _until(_running(runner, job.id), "the child to start")
        os.kill(record.pid, signal.SIGKILL)  # what the OOM killer does
        await _until(lambda: runner.get(job.id).state.final, "the job to end")

    _with_worker(runner, scenario)
    record = runner.get(job.id)
    assert record.state == JobState.FAILED and record.finished_at
    assert "exited with code -9 (killed by SIGKILL)" in record.error
    last = _events(store_dir, job.id)[-1]
    assert (last["type"], last["state"]) == ("state", "FAILED")


def test_any_replica_cancels_a_running_job_and_a_queued_one(
        store_dir: Path, caplog: pytest.LogCaptureFixture) -> None:
    """Replica b runs no jobs; it cancels a's running job (a's trainer stops the child at its
    next heartbeat, and b's call waits for that) and a queued job (at once)."""
    caplog.set_level(logging.WARNING, logger="convserve.jobs")
    a, b = _runner(store_dir, "replica-a"), _runner(store_dir, "replica-b")
    running, queued = a.submit(TrainParams.of(**LONG)), a.submit(TrainParams.of(**TINY))

    async def scenario() -> tuple[JobRecord, JobRecord, JobRecord]:
        record = await _until(_running(a, running.id), "the child to start")
        asked = await asyncio.to_thread(b.cancel, queued.id)
        cancelled = await asyncio.to_thread(b.cancel, running.id)
        return record, asked, cancelled

    started, asked, cancelled = _with_worker(a, scenario)
    assert cancelled.state == JobState.CANCELLED and cancelled.finished_at
    assert [(t.trainer, t.outcome) for t in cancelled.attempts] == [("replica-a", "CANCELLED")]
    with pytest.raises(ProcessLookupError):
        os.kill(started.pid, 0)
    assert _states(store_dir, running.id)[-1] == "CANCELLED"
    assert "ignored SIGTERM" not in caplog.text  # SIGTERM did it, no SIGKILL after the grace

    assert asked.state == JobState.CANCELLED and asked.pid is None and asked.attempts == []
    assert _states(store_dir, queued.id) == ["QUEUED", "CANCELLED"]  # never claimed
    assert a.queued() == 0 and os.listdir(DirectoryStore(store_dir).work.queue_dir) == [".lock"]
    assert DirectoryStore(store_dir).versions() == []


def _stubborn_python(tmp_path: Path) -> str:
    """A stand-in for the interpreter: ignores SIGTERM and sleeps (its arguments unused)."""
    script = tmp_path / "stubborn-python"
    script.write_text("#!/bin/sh\ntrap '' TERM\nsleep 60\n")
    script.chmod(0o755)
    return str(script)


def test_a_child_ignoring_sigterm_is_killed_after_the_grace(
        store_dir: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="convserve.jobs")
    runner = _runner(store_dir, python=_stubborn_python(store_dir.parent), cancel_grace_s=0.5)
    job = runner.submit(TrainParams.of())

    async def scenario() -> tuple[JobRecord, JobRecord]:
        record = await _until(_running(runner, job.id), "the child to start")
        return record, await asyncio.to_thread(runner.cancel, job.id)

    started, cancelled = _with_worker(runner, scenario)
    assert cancelled.state == JobState.CANCELLED
    assert "ignored SIGTERM for 0.5 s: SIGKILL" in caplog.text
    assert _group_gone(started.pid)  # the shell and its sleep: the whole group


def test_a_stopping_trainer_puts_its_job_back_at_the_front_of_the_queue(store_dir: Path
                                                                       ) -> None:
    runner = _runner(store_dir, python=_stubborn_python(store_dir.parent), cancel_grace_s=0.5)
    job = runner.submit(TrainParams.of())
    started = _with_worker(runner, lambda: _until(_running(runner, job.id), "the child to start"))
    later = runner.submit(TrainParams.of())
    record = runner.get(job.id)
    assert record.state == JobState.QUEUED and record.pid is None
    assert [(t.number, t.trainer, t.outcome) for t in record.attempts] == [
        (1, "replica-a", "released")]
    assert record.lost_attempts == 0  # a clean stop does not count against the job
    assert _group_gone(started.pid)
    assert _states(store_dir, job.id) == ["QUEUED", "RUNNING", "QUEUED"]
    assert runner.queue_positions() == {job.id: 1, later.id: 2}  # its old place, before later's

    other = _runner(store_dir, "replica-b")
    claimed = other.claim_next()
    assert claimed is not None and claimed.id == job.id
    assert [(t.number, t.trainer) for t in claimed.attempts] == [(1, "replica-a"),
                                                                 (2, "replica-b")]
    assert "--resume" not in other.command(claimed)  # stopped in its first epoch: no checkpoint
    checkpoint = store_dir / "jobs" / job.id / "checkpoints" / "last.pt"
    checkpoint.parent.mkdir(parents=True)
    checkpoint.write_bytes(b"a checkpoint")  # only its existence matters to the command
    assert other.command(claimed)[-1] == "--resume"
    assert (store_dir / "jobs" / job.id / "claim").read_text() == "2 replica-b\n"


def test_resume_queues_an_interrupted_job_once_and_refuses_others(store_dir: Path) -> None:
    """INTERRUPTED: a record an earlier version wrote when its replica stopped."""
    runner = _runner(store_dir)
    job = runner.submit(TrainParams.of())
    assert runner.claim_next() is not None
    path = DirectoryStore(store_dir).work.job_dir(job.id) / "job.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), "state": "INTERRUPTED"}))
    other = _runner(store_dir, "replica-b")
    resumed = other.resume(job.id)
    assert (resumed.state, resumed.resumes, resumed.replica) == (JobState.QUEUED, 1, "replica-b")
    again = runner.resume(job.id)  # a retry, or a racing replica: the job as it now is
    assert (again.state, again.resumes) == (JobState.QUEUED, 1)
    assert runner.queue_positions() == {job.id: 1}
    fresh = other.submit(TrainParams.of())
    with pytest.raises(Conflict, match="is QUEUED: only an INTERRUPTED job can be resumed"):
        other.resume(fresh.id)


# --- no training ---------------------------------------------------------------------------------


@pytest.mark.parametrize(("asked", "fragment"), [
    (dict(dataset="../x"), "dataset='../x' is unknown: expected one of digits, cifar10"),
    (dict(dataset="folder:a/../../x"), "is unknown: expected one of digits"),
    (dict(dataset="folder:/etc"), "is unknown: expected one of digits"),
    (dict(dataset="mnist"), "is unknown: expected one of digits"),
    (dict(epochs=0), "epochs=0 is out of range"),
    (dict(epochs=201), "epochs=201 is out of range: expected an integer in 1..200"),
    (dict(batch_size=0), "batch_size=0"),
    (dict(lr=5.0), "lr=5.0 is out of range"),
    (dict(lr=float("nan")), "lr=nan"),
    (dict(val_fraction=1.0), "val_fraction=1.0"),
    (dict(seed=-1), "seed=-1"),
    (dict(gate={"min_accuracy": 0.1}), "below this server's floor 0.3"),
    (dict(gate={"min_improvement": -0.5}), "below this server's floor"),
    (dict(gate={"min_accuracy": "high"}), "expected a number"),
    (dict(gate={"bogus": 1}), "unknown gate settings"),
    (dict(augment="rotate"), "augment='rotate' is unknown: expected one of none, crop"),
    (dict(schedule="step"), "schedule='step' is unknown: expected one of"),
    (dict(label_smoothing=1.0), "label_smoothing=1.0"),
    (dict(weight_decay=-0.1), "weight_decay=-0.1"),
])
def test_bad_requests_are_refused_and_write_nothing(store_dir: Path, asked: dict,
                                                    fragment: str) -> None:
    runner = _runner(store_dir, gate_bounds=GateBounds(min_accuracy_floor=0.3))
    with pytest.raises(InvalidInput, match=re.escape(fragment)):
        runner.submit(TrainParams.of(**asked), idempotency_key="k1")
    assert os.listdir(DirectoryStore(store_dir).work.jobs_dir) == []


def test_an_idempotency_key_maps_to_one_job_across_replicas(store_dir: Path) -> None:
    a = _runner(store_dir, "replica-a", max_queue=1)
    b = _runner(store_dir, "replica-b")
    job = a.submit(TrainParams.of(epochs=3), idempotency_key="retry-me")
    assert job.id.startswith("k") and len(job.id) == 21
    again = b.submit(TrainParams.of(epochs=3), idempotency_key="retry-me")  # a retry elsewhere
    assert again.id == job.id and again.replica == "replica-a"
    assert a.submit(TrainParams.of(epochs=3), idempotency_key="retry-me").id == job.id  # when full
    assert (a.queue_position(job.id), b.queue_position(job.id)) == (1, 1)
    # The same key with other parameters is a conflict that names the job, not a silent reuse.
    with pytest.raises(AlreadyExists, match=rf"idempotency key 'retry-me' already names job "
                                            rf"{job.id}, created with other parameters "
                                            r"\(epochs, lr differ\)"):
        b.submit(TrainParams.of(epochs=9, lr=0.01), idempotency_key="retry-me")
    assert _states(store_dir, job.id) == ["QUEUED"]

    # Racing retries on two replicas at once: mkdir lets exactly one create the job.
    c = _runner(store_dir, "replica-c")
    with ThreadPoolExecutor(8) as pool:
        ids = set(pool.map(lambda i: (b, c)[i % 2].submit(TrainParams.of(), "race").id, range(16)))
    assert len(ids) == 1
    assert sorted(os.listdir(DirectoryStore(store_dir).work.jobs_dir)) == sorted([job.id, *ids])
    assert _states(store_dir, ids.pop()) == ["QUEUED"]


def test_a_full_queue_refuses_and_writes_nothing(store_dir: Path) -> None:
    runner = _runner(store_dir, max_queue=1)
    job = runner.submit(TrainParams.of())
    with pytest.raises(LimitExceeded, match=r"training queue is full \(1 jobs waiting\)"):
        runner.submit(TrainParams.of())
    assert os.listdir(DirectoryStore(store_dir).work.jobs_dir) == [job.id]
    runner.cancel(job.id)  # frees the place
    assert runner.submit(TrainParams.of()).state == JobState.QUEUED


def test_cancel_a_queued_job_at_once_and_a_finished_one_is_a_conflict(store_dir: Path) -> None:
    runner = _runner(store_dir)
    job = runner.submit(TrainParams.of())
    record = runner.cancel(job.id)
    assert record.state == JobState.CANCELLED and record.finished_at
    assert runner.get(job.id).state == JobState.CANCELLED
    assert runner.queue_position(job.id) == 0
    assert _states(store_dir, job.id) == ["QUEUED", "CANCELLED"]
    with pytest.raises(Conflict, match="already finished: CANCELLED"):
        runner.cancel(job.id)


def test_watch_follows_the_file_holds_back_a_partial_line_and_ends_when_final(
        store_dir: Path) -> None:
    writer, reader = _runner(store_dir, "replica-a"), _runner(store_dir, "replica-b")
    job = writer.submit(TrainParams.of())
    events_path = DirectoryStore(store_dir).work.job_dir(job.id) / "events.jsonl"

    async def scenario() -> list[tuple[int, dict]]:
        seen: list[tuple[int, dict]] = []

        async def follow() -> None:
            async for item in reader.watch(job.id):
                seen.append(item)

        task = asyncio.create_task(follow())
        await _until(lambda: len(seen) == 1, "the QUEUED event", 10)
        with events_path.open("a") as f:
            f.write('{"type": "progress", "step": 1}\n{"type": "progr')
        await _until(lambda: len(seen) == 2, "the progress event", 10)
        await asyncio.sleep(0.2)
        assert len(seen) == 2 and not task.done()  # the half line waits for its newline
        with events_path.open("a") as f:
            f.write('ess", "step": 2}\n')
        await _until(lambda: len(seen) == 3, "the completed line", 10)
        await asyncio.to_thread(writer.cancel, job.id)
        await asyncio.wait_for(task, 10)  # ends by itself once the job is final
        return seen

    seen = asyncio.run(scenario())
    assert [s for s, _ in seen] == [1, 2, 3, 4]
    assert [e.get("step") for _, e in seen[1:3]] == [1, 2]
    assert seen[-1][1]["state"] == "CANCELLED"


def test_unknown_and_invalid_job_ids(store_dir: Path) -> None:
    runner = _runner(store_dir)
    with pytest.raises(NotFound, match="nosuchjob"):
        runner.get("nosuchjob")
    with pytest.raises(NotFound):
        runner.cancel("nosuchjob")
    with pytest.raises(InvalidInput):
        runner.get("../etc")

    async def first_event() -> Any:
        return await anext(runner.watch("nosuchjob"))

    with pytest.raises(NotFound):
        asyncio.run(first_event())


def _edit(store_dir: Path, job_id: str, **change: Any) -> None:
    """What a trainer that died left in the record (written by hand, as it would stand)."""
    path = DirectoryStore(store_dir).work.job_dir(job_id) / "job.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **change}))


def test_recover_requeues_jobs_of_gone_trainers_until_their_attempts_run_out(
        store_dir: Path) -> None:
    old = _runner(store_dir, "gone-host:1")
    here_dead = f"{socket.gethostname()}:{_dead_pid()}"
    stale, fresh, orphaned, exhausted, cancelled, unfiled = (
        old.submit(TrainParams.of()) for _ in range(6))
    for _ in range(5):
        assert old.claim_next() is not None  # every one but `unfiled` claimed by gone-host:1
    leftover = subprocess.Popen(  # what a SIGKILLed trainer leaves: its child, in its own group
        [sys.executable, "-c", "import time; time.sleep(60)", "convserve.training", "--job-id",
         orphaned.id],
        start_new_session=True)
    started(leftover.pid)
    now = datetime.now(UTC)
    long_ago = (now - timedelta(minutes=5)).isoformat()
    _edit(store_dir, stale.id, pid=_dead_pid(), heartbeat_at=long_ago)
    _edit(store_dir, fresh.id, pid=_dead_pid(), heartbeat_at=now.isoformat())
    _edit(store_dir, orphaned.id, pid=leftover.pid, trainer=here_dead,
          attempts=[{"number": 1, "trainer": here_dead, "claimed_at": now.isoformat()}])
    _edit(store_dir, exhausted.id, heartbeat_at=long_ago, attempts=[
        {"number": n, "trainer": f"t{n}", "claimed_at": long_ago, "outcome": o}
        for n, o in ((1, "lost"), (2, "released"), (3, "lost"), (4, ""))])
    _edit(store_dir, cancelled.id, heartbeat_at=long_ago)
    (DirectoryStore(store_dir).work.job_dir(cancelled.id) / "cancel.requested").touch()
    _edit(store_dir, unfiled.id, queued_at=long_ago)  # and its queue file lost in a crash:
    for path in DirectoryStore(store_dir).work.queue_dir.glob(f"*.{unfiled.id}"):
        path.unlink()

    try:
        new = _runner(store_dir, "replica-new", stale_after_s=20, max_attempts=3)
        assert sorted(new.recover()) == sorted([stale.id, orphaned.id, exhausted.id,
                                                cancelled.id])
        # SIGTERM first (a real child then stops cleanly and keeps its checkpoint).
        assert leftover.wait(timeout=10) == -signal.SIGTERM
    finally:
        leftover.kill()
        leftover.wait()
    for job_id, trainer in ((stale.id, "gone-host:1"), (orphaned.id, here_dead)):
        record = new.get(job_id)
        assert record.state == JobState.QUEUED and record.pid is None
        assert [(t.trainer, t.outcome) for t in record.attempts] == [(trainer, "lost")]
        assert _events(store_dir, job_id)[-1]["reclaimed_from"] == trainer
    record = new.get(exhausted.id)
    assert record.state == JobState.FAILED and record.lost_attempts == 3
    assert "its trainer died 3 times (t1, t3, t4)" in record.error
    assert f"jobs/{exhausted.id}/checkpoints" in record.error
    assert new.get(cancelled.id).state == JobState.CANCELLED
    assert new.get(fresh.id).state == JobState.RUNNING  # another host, heartbeat fresh
    # FIFO by when each was first queued (the unfiled one's record says 5 minutes ago).
    assert list(new.queue_positions()) == [unfiled.id, stale.id, orphaned.id]
    assert new.recover() == []
    claimed = [new.claim_next() for _ in range(2)]
    assert [(r.id, len(r.attempts)) for r in claimed if r] == [(unfiled.id, 1), (stale.id, 2)]


def test_a_trainer_that_lost_its_claim_records_nothing_and_its_child_does_not_publish(
        store_dir: Path) -> None:
    """A hung trainer declared dead: its job went to another trainer. The old attempt's
    heartbeat finds the claim gone, and the fencing check refuses its publish."""
    from convserve.contracts.errors import ClaimLost
    from convserve.store.job_dir import check_claim

    a, b = _runner(store_dir, "trainer-a"), _runner(store_dir, "trainer-b")
    job = a.submit(TrainParams.of())
    first = a.claim_next()
    assert first is not None
    _edit(store_dir, job.id, heartbeat_at=(datetime.now(UTC) - timedelta(minutes=5)).isoformat())
    assert b.recover() == [job.id]
    second = b.claim_next()
    assert second is not None and [t.number for t in second.attempts] == [1, 2]
    assert a.child.heartbeat(first) is False  # a's heartbeat: the claim is b's now
    a.child.end_attempt(first, JobState.FAILED, error="a's late verdict")
    assert a.get(job.id).state == JobState.RUNNING and a.get(job.id).trainer == "trainer-b"
    job_dir = DirectoryStore(store_dir).work.job_dir(job.id)
    check_claim(job_dir, 2)
    with pytest.raises(ClaimLost, match="attempt 1 of job .* no longer holds it"):
        check_claim(job_dir, 1)


def test_trainers_racing_for_the_queue_claim_each_job_exactly_once(store_dir: Path) -> None:
    """Four trainers in four processes claim from one queue at once (benchmarks/job_queue.py,
    at a small size): every job once, each trainer's oldest first."""
    sys.path.insert(0, str(REPO_ROOT / "benchmarks"))
    import job_queue

    result = job_queue.measure(40, 4, store_dir)
    assert result["each_claimed_once"] and result["fifo"] and result["queue_left"] == 0, result
    runner = _runner(store_dir)
    for record in runner.list():
        assert record.state == JobState.RUNNING and len(record.attempts) == 1
        assert record.trainer == record.attempts[0].trainer
        assert _states(store_dir, record.id) == ["QUEUED", "RUNNING"]


def test_the_runner_imports_no_torch() -> None:
    heavy = ("torch", "torchvision", "onnx", *(f"convserve.training.{m}" for m in (
        "train", "export", "model", "pipeline", "data")))
    script = ("import sys, convserve.jobs\n"
              f"print(sorted(m for m in {heavy!r} if m in sys.modules))")
    result = subprocess.run([sys.executable, "-c", script], cwd=REPO_ROOT, capture_output=True,
                            text=True, timeout=60, check=False)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip() == "[]"


def test_the_spec_travels_from_the_request_to_the_job_spec_file(store_dir: Path) -> None:
    """Unset fields take the spec's defaults, an explicit 0 stays 0, and the spec.json the runner
    writes for the child holds exactly the requested settings plus the server's own."""
    from convserve.pb.convserve.v1 import convserve_pb2 as pb
    from convserve.server import messages
    from convserve.store.job_spec import read_job_spec

    defaults = TrainConfig()
    unset = messages.train_params(pb.TrainRequest(dataset="digits")).config
    assert unset == defaults
    request = pb.TrainRequest(dataset="digits", augment="crop+flip", schedule="cosine",
                              label_smoothing=0.0, weight_decay=0.0, epochs=3,
                              gate=pb.GateOverrides(min_accuracy=0.4))
    params = messages.train_params(request)
    assert messages.train_params(messages.train_request(params, "k")) == params
    assert (params.config.label_smoothing, params.config.weight_decay) == (0.0, 0.0)

    runner = _runner(store_dir)
    record = runner.submit(params)
    command = runner.command(record)
    assert command[-2:] == ["--job", str(runner.models.work.job_dir(record.id))]
    job = read_job_spec(runner.models.work.job_dir(record.id))
    assert job.config == dataclasses.replace(
        params.config, datasets_root=str(store_dir.parent / "datasets"), compile="auto")
    assert (job.job_id, job.store, job.gate.min_accuracy) == (record.id, runner.models.location, 0.4)


@pytest.mark.slow
def test_recover_records_what_a_child_finished_after_its_replica_died(store_dir: Path) -> None:
    """The child finished on its own (published or rejected) while its replica was dead: a
    replica restarted on the store records the job's real outcome, not FAILED."""
    runner = _runner(store_dir, "replica-a")
    promoted = runner.submit(TrainParams.of(**TINY, gate={"min_accuracy": 0.0}))
    rejected = runner.submit(TrainParams.of(**TINY, gate={"min_improvement": 1.0}))

    async def scenario() -> None:
        for job in (promoted, rejected):
            await _until(lambda j=job: runner.get(j.id).state.final, f"{job.id} final")

    _with_worker(runner, scenario)
    assert runner.get(promoted.id).state == JobState.PROMOTED
    version = runner.get(promoted.id).model_version
    assert version == DirectoryStore(store_dir).promoted_version()
    # What the store holds when the replica dies after its child's last event but before it
    # recorded the outcome: the record still says RUNNING, under a replica that is gone.
    dead = f"{socket.gethostname()}:{_dead_pid()}"
    for job in (promoted, rejected):
        path = DirectoryStore(store_dir).work.job_dir(job.id) / "job.json"
        path.write_text(json.dumps({**json.loads(path.read_text()), "state": "RUNNING",
                                    "model_version": None, "gate": None, "finished_at": "",
                                    "trainer": dead, "pid": _dead_pid()}))
    restarted = _runner(store_dir, "replica-b")
    assert sorted(restarted.recover()) == sorted([promoted.id, rejected.id])
    record = restarted.get(promoted.id)
    assert (record.state, record.model_version) == (JobState.PROMOTED, version)
    assert record.gate and record.gate.promoted is True and record.error == ""
    record = restarted.get(rejected.id)
    assert record.state == JobState.REJECTED and record.gate.promoted is False
    # Their events already ended in the child's own final state: nothing is appended.
    assert _states(store_dir, promoted.id)[-1] == "PROMOTED"
    assert _states(store_dir, rejected.id)[-1] == "REJECTED"
