"""The job runner on its own: validation, idempotency across replicas, crashes, recovery."""

from __future__ import annotations

import asyncio
import json
import os
import signal
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from service.errors import InvalidInput, NotFound
from service.jobs import JobRunner, JobState, RunnerConfig, TrainParams
from service.store import ModelStore
from tests.conftest import REPO_ROOT


def _runner(store: Path, **config) -> JobRunner:
    return JobRunner(ModelStore(store), RunnerConfig(
        datasets_root=store.parent, child_env={"PYTHONPATH": str(REPO_ROOT)},
        heartbeat_s=0.2, **config))


@pytest.mark.parametrize(("params", "fragment"), [
    (TrainParams(dataset="../x"), "unknown dataset"),
    (TrainParams(dataset="folder:a/../../x"), "unknown dataset"),
    (TrainParams(dataset="mnist"), "unknown dataset"),
    (TrainParams(epochs=0), "epochs=0"),
    (TrainParams(lr=5.0), "lr=5.0"),
    (TrainParams(gate={"min_accuracy": 0.1}), "below this server's floor"),
    (TrainParams(gate={"bogus": 1}), "unknown gate settings"),
])
def test_bad_requests_are_refused_and_write_nothing(tmp_path, params, fragment) -> None:
    from training.gate import GateBounds

    runner = _runner(tmp_path / "store", gate_bounds=GateBounds(min_accuracy_floor=0.3))
    with pytest.raises(InvalidInput, match=fragment):
        runner.submit(params)
    assert runner.list() == []


def test_an_idempotency_key_maps_to_one_job_across_replicas(tmp_path) -> None:
    store = tmp_path / "store"
    first, second = _runner(store), _runner(store)
    job = first.submit(TrainParams(epochs=3), idempotency_key="retry-me")
    again = second.submit(TrainParams(epochs=9), idempotency_key="retry-me")
    assert again.id == job.id and again.params.epochs == 3
    assert [r.id for r in second.list()] == [job.id]
    assert second.get(job.id).replica == first.get(job.id).replica
    with pytest.raises(NotFound):
        second.get("nosuchjob")
    with pytest.raises(InvalidInput):
        second.get("../etc")


def test_recover_fails_jobs_of_a_dead_replica_and_leaves_live_ones(tmp_path) -> None:
    store = tmp_path / "store"
    old = _runner(store, replica_id="gone-host:1")
    stale, fresh = old.submit(TrainParams()), old.submit(TrainParams())
    for job_id, age in ((stale.id, timedelta(hours=1)), (fresh.id, timedelta(seconds=0))):
        path = ModelStore(store).job_dir(job_id) / "job.json"
        record = json.loads(path.read_text())
        record.update(state="RUNNING", heartbeat_at=(datetime.now(UTC) - age).isoformat())
        path.write_text(json.dumps(record))
    new = _runner(store, stale_after_s=20)
    assert new.recover() == [stale.id]
    failed = new.get(stale.id)
    assert failed.state == JobState.FAILED and "replica running it stopped" in failed.error
    assert new.get(fresh.id).state == JobState.RUNNING


def test_a_killed_training_process_is_recorded_failed_with_the_signal(tmp_path) -> None:
    runner = _runner(tmp_path / "store")

    async def scenario() -> None:
        stop = asyncio.Event()
        worker = asyncio.create_task(runner.run(stop))
        job = runner.submit(TrainParams(dataset="synthetic:5000", epochs=50))
        for _ in range(600):
            record = runner.get(job.id)
            if record.state == JobState.RUNNING and record.pid:
                break
            await asyncio.sleep(0.05)
        os.killpg(record.pid, signal.SIGKILL)  # what the OOM killer would do
        for _ in range(600):
            if runner.get(job.id).state.final:
                break
            await asyncio.sleep(0.05)
        stop.set()
        await worker

    asyncio.run(scenario())
    record = runner.get(runner.list()[0].id)
    assert record.state == JobState.FAILED
    assert "killed by SIGKILL" in record.error and record.finished_at
    events = [json.loads(line) for line in
              (ModelStore(tmp_path / "store").job_dir(record.id) / "events.jsonl").open()]
    assert events[-1] == {**events[-1], "type": "state", "state": "FAILED"}
