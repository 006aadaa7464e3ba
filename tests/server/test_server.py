"""A replica's assembly (convserve.server.server): what `start` builds for each role, the job
runner's and ONNX Runtime's settings it derives from ServerConfig, and its ports. Replicas run
in this process on 127.0.0.1 with free ports."""

from __future__ import annotations

import asyncio
import socket
import subprocess
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, TypeVar

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from convserve.contracts.errors import PortInUse
from convserve.contracts.gate_policy import GateBounds, GatePolicy
from convserve.contracts.job_state import JobState
from convserve.jobs import JobRunner, RunnerConfig, TrainParams
from convserve.pb.convserve.v1 import convserve_pb2 as pb
from convserve.pb.convserve.v1 import convserve_pb2_grpc as pb_grpc
from convserve.server import config, server
from convserve.store.directory import DirectoryStore
from tests.servers import predict_request

T = TypeVar("T")
SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


def _replica(store: Path, datasets: Path, role: str,
             scenario: Callable[[server.Replica, grpc.aio.Channel], Awaitable[T]],
             **settings: Any) -> T:
    async def main() -> T:
        replica = await server.start(config.ServerConfig(
            store=store, datasets_root=datasets, port=0, role=role,
            **{"metrics_port": -1, "poll_interval_s": 0.05, **settings}))
        try:
            async with grpc.aio.insecure_channel(replica.address) as channel:
                return await scenario(replica, channel)
        finally:
            await server.stop(replica, 1)

    return asyncio.run(main())


async def _health(channel: grpc.aio.Channel, service: str = "") -> int:
    reply = await health_pb2_grpc.HealthStub(channel).Check(
        health_pb2.HealthCheckRequest(service=service), timeout=10)
    return reply.status


def _task_names(replica: server.Replica) -> set[str]:
    return {task.get_name() for task in replica.tasks}


# --- roles -------------------------------------------------------------------------------------


def test_role_serve_loads_the_model_and_runs_no_trainer(
        store_with_model: tuple[Path, Path]) -> None:
    store, datasets = store_with_model

    async def scenario(replica: server.Replica, channel: grpc.aio.Channel) -> None:
        assert replica.serving is not None and not replica.trains
        assert replica.manager.live_version == 1
        assert _task_names(replica) == {"batcher", "model-manager", "health"}
        assert await _health(channel) == SERVING
        assert await _health(channel, "convserve.v1.Inference") == SERVING
        reply = await pb_grpc.InferenceStub(channel).Predict(predict_request(1), timeout=30)
        assert reply.model_version == 1
        job = await pb_grpc.TrainingStub(channel).Train(pb.TrainRequest(), timeout=30)
        assert job.state == pb.QUEUED  # queued in the store, for a trainer elsewhere
        assert replica.runner.get(job.id).state == JobState.QUEUED

    _replica(store, datasets, "serve", scenario)


def test_role_serve_without_a_model_is_live_but_not_serving(store_dir: Path,
                                                            datasets: Path) -> None:
    async def scenario(replica: server.Replica, channel: grpc.aio.Channel) -> None:
        assert replica.manager.live_version is None
        assert await _health(channel, server.LIVENESS) == SERVING
        assert await _health(channel) == NOT_SERVING

    _replica(store_dir, datasets, "serve", scenario)


def test_role_train_answers_training_and_health_without_a_model(store_dir: Path,
                                                                datasets: Path) -> None:
    async def scenario(replica: server.Replica, channel: grpc.aio.Channel) -> None:
        assert replica.serving is None and replica.trains
        assert {"job-runner", "job-recovery"} <= _task_names(replica)
        assert "batcher" not in _task_names(replica)
        assert await _health(channel) == SERVING  # a trainer needs no model to be ready
        assert await _health(channel, "convserve.v1.Training") == SERVING
        with pytest.raises(grpc.aio.AioRpcError) as raised:
            await _health(channel, "convserve.v1.Inference")
        assert raised.value.code() == grpc.StatusCode.NOT_FOUND  # not a service it answers
        listed = await pb_grpc.TrainingStub(channel).ListJobs(pb.ListJobsRequest(), timeout=30)
        assert list(listed.jobs) == []
        for call in (pb_grpc.InferenceStub(channel).Predict(predict_request(1), timeout=30),
                     pb_grpc.ModelsStub(channel).Promote(pb.PromoteRequest(version=1,
                                                                           reason="x"))):
            with pytest.raises(grpc.aio.AioRpcError) as raised:
                await call
            assert raised.value.code() == grpc.StatusCode.UNIMPLEMENTED

    _replica(store_dir, datasets, "train", scenario)


def test_role_all_serves_and_trains(store_with_model: tuple[Path, Path]) -> None:
    store, datasets = store_with_model

    async def scenario(replica: server.Replica, channel: grpc.aio.Channel) -> None:
        assert replica.serving is not None and replica.trains
        assert _task_names(replica) == {"batcher", "model-manager", "health", "job-runner",
                                        "job-recovery"}
        assert await _health(channel) == SERVING
        reply = await pb_grpc.InferenceStub(channel).Predict(predict_request(2), timeout=30)
        assert reply.model_version == 1

    _replica(store, datasets, "all", scenario)


def test_a_trainer_reclaims_a_dead_trainers_job_as_it_starts(store_dir: Path,
                                                             datasets: Path) -> None:
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    models = DirectoryStore(store_dir)
    dead = JobRunner(models, RunnerConfig(datasets_root=datasets,
                                          replica_id=f"{socket.gethostname()}:{gone.pid}"))
    job = dead.submit(TrainParams.of())
    assert dead.claim_next() is not None
    # A serve replica never reclaims jobs; a trainer does as it starts, before it claims any
    # (its children here exit 1 at once: what it does next is not this test's).

    async def serve_only(replica: server.Replica, channel: grpc.aio.Channel) -> JobState:
        return replica.runner.get(job.id).state

    assert _replica(store_dir, datasets, "serve", serve_only) == JobState.RUNNING

    async def trainer(replica: server.Replica, channel: grpc.aio.Channel) -> list[str]:
        return [a.outcome for a in replica.runner.get(job.id).attempts][:1]

    assert _replica(store_dir, datasets, "train", trainer,
                    training_python="/bin/false") == ["lost"]


# --- settings ----------------------------------------------------------------------------------


def test_runner_config_maps_the_servers_settings(tmp_path: Path) -> None:
    settings = config.ServerConfig(
        store=tmp_path, datasets_root=tmp_path / "data", jobs_url="files", max_queued_jobs=5,
        max_epochs=20, min_accuracy=0.6, min_accuracy_floor=0.4, min_improvement=-0.02,
        allow_class_change_requests=False, job_heartbeat_s=0.7, stale_job_after_s=9.0,
        job_progress_interval_s=0.3, training_processes=2, max_job_attempts=4,
        poll_interval_s=0.2, training_python="/opt/py/bin/python")
    runner = server.runner_config(settings)
    assert runner.jobs_url == ""  # "files": the model store's directory
    assert (runner.datasets_root, runner.max_queue, runner.max_epochs) == (
        tmp_path / "data", 5, 20)
    assert runner.gate_defaults == GatePolicy(min_accuracy=0.6, min_improvement=-0.02)
    # The operator's own negative min_improvement is the floor a request may go down to.
    assert runner.gate_bounds == GateBounds(min_accuracy_floor=0.4, min_improvement_floor=-0.02,
                                            allow_class_change=False)
    assert (runner.heartbeat_s, runner.stale_after_s, runner.progress_interval_s) == (
        0.7, 9.0, 0.3)
    assert (runner.processes, runner.max_attempts, runner.poll_s, runner.python) == (
        2, 4, 0.2, "/opt/py/bin/python")


def test_runner_config_defaults(tmp_path: Path) -> None:
    url = "postgresql://convserve@db.example/jobs"
    runner = server.runner_config(config.ServerConfig(store=tmp_path, jobs_url=url,
                                                      min_improvement=0.05))
    assert runner.jobs_url == url and runner.python == sys.executable
    assert runner.gate_bounds.min_improvement_floor == 0.0  # a positive default: floor 0
    assert runner.gate_defaults == GatePolicy(min_accuracy=0.5, min_improvement=0.05)


@pytest.mark.parametrize(("max_batch_size", "warmup"), [(256, (1, 8, 256)), (4, (1, 4)),
                                                        (1, (1,))])
def test_session_settings_warm_the_batch_sizes_the_batcher_forms(
        tmp_path: Path, max_batch_size: int, warmup: tuple[int, ...]) -> None:
    settings = server.session_settings(config.ServerConfig(
        store=tmp_path, max_batch_size=max_batch_size, providers=" cuda, cpu ,",
        intra_op_threads=3, graph_optimization="basic"))
    assert settings.warmup_batch_sizes == warmup
    assert settings.providers == ("cuda", "cpu")
    assert (settings.intra_op_threads, settings.graph_optimization) == (3, "basic")
    assert settings.allow_spinning is False


# --- ports -------------------------------------------------------------------------------------


def test_a_taken_grpc_port_is_port_in_use(store_dir: Path, datasets: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(PortInUse, match=str(port)):
            asyncio.run(server.start(config.ServerConfig(
                store=store_dir, datasets_root=datasets, port=port, metrics_port=-1,
                role="serve")))


def test_metrics_are_served_on_port_0_and_off_on_minus_1(store_dir: Path, datasets: Path) -> None:
    async def url(replica: server.Replica, channel: grpc.aio.Channel) -> str | None:
        return replica.metrics_url

    assert _replica(store_dir, datasets, "train", url) is None
    served = _replica(store_dir, datasets, "train", url, metrics_port=0)
    assert served is not None and served.startswith("http://127.0.0.1:")
    assert served.endswith("/metrics") and not served.endswith(":0/metrics")
