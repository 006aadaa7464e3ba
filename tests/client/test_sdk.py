"""The SDK's retry contract against a real gRPC server that answers UNAVAILABLE: Predict and reads
are retried, Promote and CancelJob are not, and Train's retries all carry one idempotency key
(which is what makes retrying it safe); a per-call timeout overrides the client's. The same for
the sync Client and the AsyncClient. The server is a real grpc server on loopback speaking
convserve.v1, flaky on purpose; only its replies are canned."""

from __future__ import annotations

import asyncio
import collections
import inspect
import time
from collections.abc import Callable, Iterator
from concurrent import futures
from typing import Any

import grpc
import numpy as np
import pytest

from convserve.client import AsyncClient, Client, ClientError
from convserve.pb.convserve.v1 import convserve_pb2 as pb
from convserve.serving import codec

FAILURES = 2  # UNAVAILABLE answers before a method succeeds


class FlakyServer:
    """Each method fails FAILURES times with UNAVAILABLE, then answers; every call is recorded."""

    def __init__(self) -> None:
        self.calls: dict[str, list[tuple[object, dict[str, str]]]] = collections.defaultdict(list)
        replies = {
            ("Inference", "Predict", pb.PredictRequest): codec.predict_response(
                1, [str(i) for i in range(10)], np.full((1, 10), 0.1, dtype=np.float32), 0),
            ("Inference", "GetModel", pb.GetModelRequest): pb.ModelInfo(version=1),
            ("Training", "GetJob", pb.GetJobRequest): pb.Job(id="j1", state=pb.RUNNING),
            ("Training", "Train", pb.TrainRequest): pb.Job(id="j1", state=pb.QUEUED),
            ("Training", "CancelJob", pb.CancelJobRequest): pb.Job(id="j1", state=pb.CANCELLED),
            ("Models", "Promote", pb.PromoteRequest): pb.ModelInfo(version=1),
            ("Inference", "ListModels", pb.ListModelsRequest): pb.ListModelsResponse(),
        }
        self.server = grpc.server(futures.ThreadPoolExecutor(4))
        by_service: dict[str, dict[str, grpc.RpcMethodHandler]] = collections.defaultdict(dict)
        for (service, method, request_type), reply in replies.items():
            by_service[service][method] = grpc.unary_unary_rpc_method_handler(
                self._behaviour(method, reply), request_deserializer=request_type.FromString,
                response_serializer=type(reply).SerializeToString)
        self.server.add_generic_rpc_handlers([
            grpc.method_handlers_generic_handler(f"convserve.v1.{service}", handlers)
            for service, handlers in by_service.items()])
        self.address = f"127.0.0.1:{self.server.add_insecure_port('127.0.0.1:0')}"
        self.server.start()

    def _behaviour(self, method: str, reply: object):
        def behaviour(request: object, context: grpc.ServicerContext) -> object:
            self.calls[method].append((request, dict(context.invocation_metadata())))
            if method == "ListModels":  # slow, never flaky: for the per-call timeout
                time.sleep(2.0)
                return reply
            if len(self.calls[method]) <= FAILURES:
                context.abort(grpc.StatusCode.UNAVAILABLE, "flaky on purpose")
            return reply
        return behaviour


@pytest.fixture
def flaky() -> Iterator[FlakyServer]:
    server = FlakyServer()
    yield server
    server.server.stop(None)


@pytest.fixture(params=["sync", "async"])
def calls(request: pytest.FixtureRequest) -> Callable[..., list[Any]]:
    """Run calls on one client of the kind under test: `calls(address, fn, ..., **options)`
    returns each fn(client)'s value in order (awaited for the AsyncClient)."""
    def run_sync(address: str, *fns: Callable[[Any], Any], **options: Any) -> list[Any]:
        with Client(address, **options) as client:
            return [fn(client) for fn in fns]

    def run_async(address: str, *fns: Callable[[Any], Any], **options: Any) -> list[Any]:
        async def main() -> list[Any]:
            async with AsyncClient(address, **options) as client:
                results = []
                for fn in fns:
                    result = fn(client)
                    assert inspect.isawaitable(result)  # the async API really is async
                    results.append(await result)
                return results
        return asyncio.run(main())

    return run_sync if request.param == "sync" else run_async


def test_idempotent_calls_are_retried_with_one_request_id(flaky: FlakyServer, calls) -> None:
    prediction, model, job = calls(
        flaky.address, lambda c: c.predict(np.zeros((1, 32, 32, 3), dtype=np.uint8)),
        lambda c: c.model(1), lambda c: c.job("j1"), retries=4, backoff_s=0.01)
    assert (prediction.version, model.version, job.state) == (1, 1, "RUNNING")
    for method in ("Predict", "GetModel", "GetJob"):
        attempts = flaky.calls[method]
        assert len(attempts) == FAILURES + 1, method
        ids = {metadata["x-request-id"] for _, metadata in attempts}
        assert len(ids) == 1, (method, ids)  # one logical call, however many attempts


def test_train_is_retried_and_every_attempt_carries_the_same_key(flaky: FlakyServer,
                                                                 calls) -> None:
    [job] = calls(flaky.address, lambda c: c.train("digits", epochs=1), retries=4,
                  backoff_s=0.01)
    assert job.id == "j1"
    keys = [request.idempotency_key for request, _ in flaky.calls["Train"]]
    assert len(keys) == FAILURES + 1 and len(set(keys)) == 1 and keys[0]


@pytest.mark.parametrize("call, method", [
    (lambda client: client.promote(1, "rollback"), "Promote"),
    (lambda client: client.cancel("j1"), "CancelJob"),
], ids=["promote", "cancel"])
def test_calls_that_change_state_are_not_retried(flaky: FlakyServer, calls, call,
                                                 method: str) -> None:
    with pytest.raises(ClientError) as refused:
        calls(flaky.address, call, retries=4, backoff_s=0.01)
    assert refused.value.code == grpc.StatusCode.UNAVAILABLE
    assert len(flaky.calls[method]) == 1


def test_retries_give_up_after_the_configured_attempts(flaky: FlakyServer, calls) -> None:
    with pytest.raises(ClientError) as failed:
        calls(flaky.address, lambda c: c.predict(np.zeros((1, 32, 32, 3), dtype=np.uint8)),
              retries=1, backoff_s=0.01)
    assert failed.value.code == grpc.StatusCode.UNAVAILABLE
    assert len(flaky.calls["Predict"]) == 2  # the call and one retry


def test_a_per_call_timeout_overrides_the_clients(flaky: FlakyServer, calls) -> None:
    """The server takes 2 s; the client's own timeout (60 s) would wait it out, the call's 0.2 s
    does not: DEADLINE_EXCEEDED, sent once (not retried)."""
    with pytest.raises(ClientError) as late:
        calls(flaky.address, lambda c: c.models(timeout=0.2), timeout=60.0)
    assert late.value.code == grpc.StatusCode.DEADLINE_EXCEEDED
    assert len(flaky.calls["ListModels"]) == 1


@pytest.mark.parametrize("state, finished", [
    (pb.QUEUED, False), (pb.RUNNING, False), (pb.PROMOTED, True), (pb.REJECTED, True),
    (pb.FAILED, True), (pb.CANCELLED, True), (pb.INTERRUPTED, True),
    (pb.JOB_STATE_UNSPECIFIED, False),
])
def test_a_job_is_finished_in_every_final_state_interrupted_included(state: int,
                                                                     finished: bool) -> None:
    """Job.finished follows the job directory's JobState: INTERRUPTED is final (no more events
    come unless someone resumes it), as the server's watch stream treats it."""
    from convserve.client.calls import job_of

    assert job_of(pb.Job(id="j1", state=state)).finished is finished
