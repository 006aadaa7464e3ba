"""Chaos: SIGKILL at random points of a publish and of a training job, then the store's
invariants. Random points are drawn by Hypothesis, seeded (derandomize) and few, so CI stays
within its time and replays the same points."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from convserve.client import Client
from convserve.contracts.job_state import JobState
from convserve.contracts.model_card import GateDecision
from convserve.store.base import ModelStore
from convserve.store.directory import DirectoryStore
from tests.conftest import REPO_ROOT, python_env
from tests.servers import ServerProcess, publish, running_server
from tests.waits import process_alive, wait_until

pytestmark = pytest.mark.slow
CHAOS = dict(deadline=None, derandomize=True, database=None,
             suppress_health_check=[HealthCheck.function_scoped_fixture])


def assert_store_invariants(store: ModelStore) -> None:
    """Every version complete and intact; PROMOTED names one of them; history consistent with
    the pointer; every job record agrees with what the store holds."""
    # A locked no-op first: it repairs a history a crash left one entry behind (by design).
    model = next(iter(store.models_dir.glob("*/model.onnx")), None)
    if model is not None:
        store.publish(model, {}, lambda _: GateDecision(False, ("check",)), actor="test")
    versions = store.versions()
    for version in versions:
        store.open_version(version)  # sha256 of model.onnx matches its card
        assert store.card(version)["version"] == version
    promoted = store.promoted_version()
    assert promoted is None or promoted in versions
    history = store.history()
    assert all(entry.version in versions for entry in history)
    assert (history[-1].version if history else None) == promoted
    published_by = {store.card(v).get("job_id"): v for v in versions if store.card(v).get("job_id")}
    for job_id in store.work.job_ids():
        path = store.work.job_dir(job_id) / "job.json"
        if not path.exists():
            continue
        record = json.loads(path.read_text())
        if record["state"] == "PROMOTED":
            assert published_by.get(job_id) == record["model_version"], record
        if job_id in published_by and JobState(record["state"]).final:
            assert record["state"] == "PROMOTED", (job_id, record["state"])


@settings(max_examples=8, **CHAOS)
@given(kill_after=st.floats(min_value=0.0, max_value=1.5))
def test_a_publish_killed_at_any_point_leaves_a_sound_store(tmp_path_factory, onnx_models,
                                                            kill_after: float) -> None:
    root = tmp_path_factory.mktemp("publish-chaos") / "store"
    store = DirectoryStore(root)
    publish(store, onnx_models["bad"], accuracy=0.1)
    worker = subprocess.Popen(
        [sys.executable, "tests/store_worker.py", str(root), str(onnx_models["good"]), "0.9",
         "--hold-seconds", "0.3"], cwd=REPO_ROOT, env=python_env(), stdout=subprocess.DEVNULL)
    time.sleep(kill_after)
    worker.send_signal(signal.SIGKILL)
    worker.wait(timeout=30)
    assert_store_invariants(store)
    # And the store goes on working: the next publish lands.
    assert publish(store, onnx_models["good"], accuracy=0.95) == max(store.versions())


@settings(max_examples=3, **CHAOS)
@given(kill_after=st.floats(min_value=0.5, max_value=25.0))
def test_a_replica_killed_at_any_point_of_a_job_ends_it_elsewhere_in_agreement_with_the_store(
        tmp_path_factory, onnx_models, kill_after: float) -> None:
    root = tmp_path_factory.mktemp("job-chaos")
    (root / "datasets").mkdir()
    store = DirectoryStore(root / "store")
    publish(store, onnx_models["bad"], accuracy=0.1)
    server = ServerProcess(store.root, root / "datasets")
    try:
        with Client(server.address) as client:
            job = client.train("synthetic:200", epochs=2, min_accuracy=0.0)
        time.sleep(kill_after)
        server.process.send_signal(signal.SIGKILL)
        server.process.wait(timeout=30)
    finally:
        server.stop()
    # Its training child stops with it (SIGTERM from the kernel), or has finished.
    record = json.loads((store.work.job_dir(job.id) / "job.json").read_text())
    if record.get("pid"):
        wait_until(lambda: not process_alive(record["pid"]),
                   "the training child to die with its replica")
    # A replica started on the store takes the job back (its trainer is gone) and ends it.
    with running_server(store.root, root / "datasets") as restarted, \
            Client(restarted.address) as client:
        final = client.wait(job.id, timeout=300)
    # A verdict whenever the first one died: never lost, never FAILED.
    assert final.state in ("PROMOTED", "REJECTED"), final.error
    assert [a.outcome for a in final.message.attempts][-1] == final.state
    assert_store_invariants(store)
