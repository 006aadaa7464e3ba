"""The RPC methods (convserve.server.servicers) called through a real grpc.aio server on
127.0.0.1, started in this process with the serve role (no trainer: jobs stay QUEUED until the
test moves them): the status code each error maps to, and what each method answers."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, TypeVar

import grpc
import pytest

from convserve.contracts.job_state import JobState
from convserve.jobs import JobRunner, RunnerConfig
from convserve.pb.convserve.v1 import convserve_pb2 as pb
from convserve.pb.convserve.v1 import convserve_pb2_grpc as pb_grpc
from convserve.server import config, server
from convserve.store.directory import DirectoryStore
from tests.servers import predict_request, publish

T = TypeVar("T")
Code = grpc.StatusCode


class Stubs:
    def __init__(self, channel: grpc.aio.Channel, replica: server.Replica) -> None:
        self.training = pb_grpc.TrainingStub(channel)
        self.inference = pb_grpc.InferenceStub(channel)
        self.models = pb_grpc.ModelsStub(channel)
        self.replica = replica


def _serve(store: Path, datasets: Path, scenario: Callable[[Stubs], Awaitable[T]],
           **settings: Any) -> T:
    """Run `scenario` against a replica with the serve role on a free port."""

    async def main() -> T:
        replica = await server.start(config.ServerConfig(
            store=store, datasets_root=datasets, port=0, metrics_port=-1, role="serve",
            poll_interval_s=0.05, **settings))
        try:
            async with grpc.aio.insecure_channel(replica.address) as channel:
                return await scenario(Stubs(channel, replica))
        finally:
            await server.stop(replica, 1)

    return asyncio.run(main())


async def _code(call: Awaitable[Any]) -> tuple[Code, str]:
    try:
        await call
    except grpc.aio.AioRpcError as error:
        return error.code(), error.details() or ""
    raise AssertionError("the call succeeded")


# --- Training ----------------------------------------------------------------------------------


def test_job_calls_map_each_error_to_its_status(store_dir: Path, datasets: Path) -> None:
    async def scenario(s: Stubs) -> None:
        t = s.training
        assert await _code(t.GetJob(pb.GetJobRequest())) == (
            Code.INVALID_ARGUMENT, "a job id is required")
        code, details = await _code(t.GetJob(pb.GetJobRequest(id="nosuchjob")))
        assert code == Code.NOT_FOUND and "nosuchjob" in details
        code, details = await _code(t.GetJob(pb.GetJobRequest(id="../etc")))
        assert code == Code.INVALID_ARGUMENT and "job id must match" in details
        code, _ = await _code(t.CancelJob(pb.CancelJobRequest(id="nosuchjob")))
        assert code == Code.NOT_FOUND
        code, _ = await _code(t.WatchJob(pb.WatchJobRequest(id="nosuchjob")).read())
        assert code == Code.NOT_FOUND
        code, _ = await _code(t.WatchJob(pb.WatchJobRequest()).read())
        assert code == Code.INVALID_ARGUMENT
        code, details = await _code(t.Train(pb.TrainRequest(epochs=100000)))
        assert code == Code.INVALID_ARGUMENT and "epochs=100000 is out of range" in details

    _serve(store_dir, datasets, scenario)


def test_train_queues_a_job_and_get_list_and_cancel_answer_for_it(
        store_dir: Path, datasets: Path) -> None:
    async def scenario(s: Stubs) -> None:
        t = s.training
        first = await t.Train(pb.TrainRequest(dataset="digits", epochs=2, idempotency_key="k1"))
        second = await t.Train(pb.TrainRequest(dataset="digits", epochs=3))
        assert (first.state, first.queue_position, first.request.epochs) == (pb.QUEUED, 1, 2)
        assert second.queue_position == 2 and first.request.idempotency_key == "k1"
        again = await t.Train(pb.TrainRequest(dataset="digits", epochs=2, idempotency_key="k1"))
        assert again.id == first.id  # a retry gets the same job
        code, details = await _code(t.Train(pb.TrainRequest(dataset="digits", epochs=5,
                                                            idempotency_key="k1")))
        assert code == Code.ALREADY_EXISTS and "epochs differ" in details
        got = await t.GetJob(pb.GetJobRequest(id=second.id))
        assert (got.id, got.queue_position) == (second.id, 2)
        listed = await t.ListJobs(pb.ListJobsRequest())
        assert [(j.id, j.queue_position) for j in listed.jobs] == [(second.id, 2),
                                                                    (first.id, 1)]
        cancelled = await t.CancelJob(pb.CancelJobRequest(id=first.id))
        assert cancelled.state == pb.CANCELLED and cancelled.error == "cancelled while queued"
        code, details = await _code(t.CancelJob(pb.CancelJobRequest(id=first.id)))
        assert code == Code.FAILED_PRECONDITION and "already finished: CANCELLED" in details
        # Only an INTERRUPTED job can be resumed.
        code, details = await _code(t.Train(pb.TrainRequest(resume_job=second.id)))
        assert code == Code.FAILED_PRECONDITION and "only an INTERRUPTED job" in details
        assert (await t.GetJob(pb.GetJobRequest(id=second.id))).queue_position == 1

    _serve(store_dir, datasets, scenario)


def test_a_full_queue_is_resource_exhausted(store_dir: Path, datasets: Path) -> None:
    async def scenario(s: Stubs) -> None:
        await s.training.Train(pb.TrainRequest())
        code, details = await _code(s.training.Train(pb.TrainRequest()))
        assert code == Code.RESOURCE_EXHAUSTED and "training queue is full" in details

    _serve(store_dir, datasets, scenario, max_queued_jobs=1)


def test_an_unreadable_job_record_is_data_loss(store_dir: Path, datasets: Path) -> None:
    async def scenario(s: Stubs) -> None:
        job = await s.training.Train(pb.TrainRequest())
        (DirectoryStore(store_dir).work.job_dir(job.id) / "job.json").write_text("{not json")
        code, details = await _code(s.training.GetJob(pb.GetJobRequest(id=job.id)))
        assert code == Code.DATA_LOSS and "unreadable record" in details

    _serve(store_dir, datasets, scenario)


def test_watch_job_skips_events_up_to_after_sequence_but_tracks_their_state(
        store_dir: Path, datasets: Path) -> None:
    """Events 1 QUEUED, 2 RUNNING, 3 progress, 4 CANCELLED: a watcher resuming after 2 gets 3
    and 4, and 3 says RUNNING (the state of event 2, which it did not get)."""
    runner = JobRunner(DirectoryStore(store_dir), RunnerConfig(datasets_root=datasets))

    async def scenario(s: Stubs) -> tuple[list[pb.JobEvent], list[pb.JobEvent]]:
        job = await s.training.Train(pb.TrainRequest())
        with runner.jobs.locked(job.id) as transaction:  # what a trainer and its child write
            transaction.event("state", state=JobState.RUNNING.value)
            transaction.event("progress", step=3, steps=10, images_per_s=250.0)
            transaction.save()
        await s.training.CancelJob(pb.CancelJobRequest(id=job.id))
        every = [e async for e in s.training.WatchJob(pb.WatchJobRequest(id=job.id))]
        later = [e async for e in s.training.WatchJob(pb.WatchJobRequest(id=job.id,
                                                                          after_sequence=2))]
        return every, later

    try:
        every, later = _serve(store_dir, datasets, scenario)
    finally:
        runner.close()
    assert [(e.sequence, e.type, e.state) for e in every] == [
        (1, "state", pb.QUEUED), (2, "state", pb.RUNNING), (3, "progress", pb.RUNNING),
        (4, "state", pb.CANCELLED)]
    assert later == every[2:]
    assert (later[0].step, later[0].steps, later[0].images_per_s) == (3, 10, 250.0)


# --- Inference and Models ----------------------------------------------------------------------


def test_without_a_model_predict_and_get_model_are_failed_precondition(
        store_dir: Path, datasets: Path) -> None:
    async def scenario(s: Stubs) -> None:
        for call in (s.inference.Predict(predict_request(1)),
                     s.inference.GetModel(pb.GetModelRequest())):
            code, _ = await _code(call)
            assert code == Code.FAILED_PRECONDITION
        listed = await s.inference.ListModels(pb.ListModelsRequest())
        assert list(listed.models) == [] and listed.promoted_version == 0

    _serve(store_dir, datasets, scenario)


def test_get_model_list_models_and_promote_answer_from_the_store(
        store_with_model: tuple[Path, Path], onnx_models: dict[str, Path]) -> None:
    store_path, datasets = store_with_model
    store = DirectoryStore(store_path)
    publish(store, onnx_models["bad"], accuracy=0.1)  # version 2, promoted
    store.promote(1, reason="pin", actor="test")

    async def scenario(s: Stubs) -> None:
        current = await s.inference.GetModel(pb.GetModelRequest())
        assert (current.version, current.promoted) == (1, True)
        assert current.promoted_at and len(current.classes) == 10
        second = await s.inference.GetModel(pb.GetModelRequest(version=2))
        assert (second.version, second.promoted) == (2, False)
        assert second.val_accuracy == pytest.approx(0.1)
        code, _ = await _code(s.inference.GetModel(pb.GetModelRequest(version=9)))
        assert code == Code.NOT_FOUND
        listed = await s.inference.ListModels(pb.ListModelsRequest())
        assert [(m.version, m.promoted) for m in listed.models] == [(1, True), (2, False)]
        assert listed.promoted_version == 1

        m = s.models
        assert (await _code(m.Promote(pb.PromoteRequest(reason="x"))))[0] == \
            Code.INVALID_ARGUMENT
        assert (await _code(m.Promote(pb.PromoteRequest(version=2, reason=" "))))[0] == \
            Code.INVALID_ARGUMENT
        assert (await _code(m.Promote(pb.PromoteRequest(version=9, reason="x"))))[0] == \
            Code.NOT_FOUND
        promoted = await m.Promote(pb.PromoteRequest(version=2, reason="roll forward"))
        assert (promoted.version, promoted.promoted) == (2, True)
        # Promote loads it before it answers: this replica serves it at once.
        assert (await s.inference.Predict(predict_request(2))).model_version == 2

    _serve(store_path, datasets, scenario)
    assert DirectoryStore(store_path).history()[-1].reason == "roll forward"


def test_every_answer_echoes_the_callers_request_id_or_a_new_one(
        store_dir: Path, datasets: Path) -> None:
    async def scenario(s: Stubs) -> tuple[str, str, str]:
        mine = s.training.ListJobs(pb.ListJobsRequest(), metadata=(("x-request-id", "abc-123"),))
        await mine
        failed = s.training.GetJob(pb.GetJobRequest(id="nosuchjob"),
                                   metadata=(("x-request-id", "req-2"),))
        await _code(failed)
        fresh = s.training.ListJobs(pb.ListJobsRequest())
        await fresh
        ids = [dict(await call.trailing_metadata())["x-request-id"]
               for call in (mine, failed, fresh)]
        return ids[0], ids[1], ids[2]

    mine, failed, fresh = _serve(store_dir, datasets, scenario)
    assert (mine, failed) == ("abc-123", "req-2")
    assert len(fresh) == 32 and fresh not in (mine, failed)
