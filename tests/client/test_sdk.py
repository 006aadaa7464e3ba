"""The SDK's retry contract against a real gRPC server that answers UNAVAILABLE: Predict and reads
are retried (by gRPC's own retry policy, which marks each retry with grpc-previous-rpc-attempts),
Promote, CancelJob and the health check are not, and Train's retries all carry one idempotency
key (which is what makes retrying it safe); one deadline bounds a call and all its retries, and a
per-call timeout overrides the client's. The same for the sync Client and the AsyncClient. The
server is a real grpc server on loopback speaking convserve.v1, flaky on purpose; only its
replies are canned."""

from __future__ import annotations

import asyncio
import collections
import inspect
import json
import time
from collections.abc import Callable, Iterator
from concurrent import futures
from typing import Any

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2

from convserve.client import AsyncClient, Client, ClientError
from convserve.client.calls import RETRIED
from convserve.client.sdk import MAX_ATTEMPTS, service_config
from convserve.pb.convserve.v1 import convserve_pb2 as pb
from convserve.serving import codec

FAILURES = 2  # UNAVAILABLE answers before a method succeeds
PREVIOUS_ATTEMPTS = "grpc-previous-rpc-attempts"  # what gRPC's retries send, not a hand-written loop
IMAGE = np.zeros((1, 32, 32, 3), dtype=np.uint8)


class FlakyServer:
    """Each method fails `failures` times with UNAVAILABLE (each answer `delay_s` late), then
    answers; every call is recorded."""

    def __init__(self, failures: int = FAILURES, delay_s: float = 0.0) -> None:
        self.failures, self.delay_s = failures, delay_s
        self.calls: dict[str, list[tuple[object, dict[str, str]]]] = collections.defaultdict(list)
        replies = {
            ("convserve.v1.Inference", "Predict", pb.PredictRequest): codec.predict_response(
                1, [str(i) for i in range(10)], np.full((1, 10), 0.1, dtype=np.float32), 0),
            ("convserve.v1.Inference", "GetModel", pb.GetModelRequest): pb.ModelInfo(version=1),
            ("convserve.v1.Training", "GetJob", pb.GetJobRequest): pb.Job(id="j1", state=pb.RUNNING),
            ("convserve.v1.Training", "Train", pb.TrainRequest): pb.Job(id="j1", state=pb.QUEUED),
            ("convserve.v1.Training", "CancelJob", pb.CancelJobRequest):
                pb.Job(id="j1", state=pb.CANCELLED),
            ("convserve.v1.Models", "Promote", pb.PromoteRequest): pb.ModelInfo(version=1),
            ("convserve.v1.Inference", "ListModels", pb.ListModelsRequest): pb.ListModelsResponse(),
            ("convserve.v1.Training", "ListJobs", pb.ListJobsRequest):
                pb.ListJobsResponse(jobs=[pb.Job(id="j1", state=pb.RUNNING)]),
            ("grpc.health.v1.Health", "Check", health_pb2.HealthCheckRequest):
                health_pb2.HealthCheckResponse(status=health_pb2.HealthCheckResponse.SERVING),
        }
        self.server = grpc.server(futures.ThreadPoolExecutor(4))
        by_service: dict[str, dict[str, grpc.RpcMethodHandler]] = collections.defaultdict(dict)
        for (service, method, request_type), reply in replies.items():
            by_service[service][method] = grpc.unary_unary_rpc_method_handler(
                self._behaviour(method, reply), request_deserializer=request_type.FromString,
                response_serializer=type(reply).SerializeToString)
        self.server.add_generic_rpc_handlers([
            grpc.method_handlers_generic_handler(service, handlers)
            for service, handlers in by_service.items()])
        self.address = f"127.0.0.1:{self.server.add_insecure_port('127.0.0.1:0')}"
        self.server.start()

    def _behaviour(self, method: str, reply: object):
        def behaviour(request: object, context: grpc.ServicerContext) -> object:
            self.calls[method].append((request, dict(context.invocation_metadata())))
            time.sleep(self.delay_s)
            if len(self.calls[method]) <= self.failures:
                context.abort(grpc.StatusCode.UNAVAILABLE, "flaky on purpose")
            return reply
        return behaviour

    def previous_attempts(self, method: str) -> list[str | None]:
        return [metadata.get(PREVIOUS_ATTEMPTS) for _, metadata in self.calls[method]]


@pytest.fixture
def serve() -> Iterator[Callable[..., FlakyServer]]:
    """Start FlakyServer(**options); each one started is stopped after the test."""
    servers: list[FlakyServer] = []

    def start(**options: Any) -> FlakyServer:
        servers.append(FlakyServer(**options))
        return servers[-1]

    yield start
    for server in servers:
        server.server.stop(None)


@pytest.fixture
def flaky(serve: Callable[..., FlakyServer]) -> FlakyServer:
    return serve()


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


def test_idempotent_calls_are_retried_by_grpc_with_one_request_id(flaky: FlakyServer,
                                                                    calls) -> None:
    prediction, model, _, job, jobs = calls(
        flaky.address, lambda c: c.predict(IMAGE), lambda c: c.model(1), lambda c: c.models(),
        lambda c: c.job("j1"), lambda c: c.jobs(), retries=4, backoff_s=0.01)
    assert (prediction.version, model.version, job.state, jobs[0].id) == (1, 1, "RUNNING", "j1")
    for method in ("Predict", "GetModel", "ListModels", "GetJob", "ListJobs"):
        attempts = flaky.calls[method]
        assert len(attempts) == FAILURES + 1, method
        ids = {metadata["x-request-id"] for _, metadata in attempts}
        assert len(ids) == 1, (method, ids)  # one logical call, however many attempts
        # gRPC's retry policy numbers its retries; a hand-written loop would send fresh calls
        assert flaky.previous_attempts(method) == [None, "1", "2"], method


def test_train_is_retried_and_every_attempt_carries_the_same_key(flaky: FlakyServer,
                                                                 calls) -> None:
    [job] = calls(flaky.address, lambda c: c.train("digits", epochs=1), retries=4,
                  backoff_s=0.01)
    assert job.id == "j1"
    keys = [request.idempotency_key for request, _ in flaky.calls["Train"]]
    assert len(keys) == FAILURES + 1 and len(set(keys)) == 1 and keys[0]
    assert flaky.previous_attempts("Train") == [None, "1", "2"]


@pytest.mark.parametrize("call, method", [
    (lambda client: client.promote(1, "rollback"), "Promote"),
    (lambda client: client.cancel("j1"), "CancelJob"),
    (lambda client: client.health(), "Check"),
], ids=["promote", "cancel", "health"])
def test_calls_that_change_state_and_the_health_check_are_not_retried(
        flaky: FlakyServer, calls, call, method: str) -> None:
    with pytest.raises(ClientError) as refused:
        calls(flaky.address, call, retries=4, backoff_s=0.01)
    assert refused.value.code == grpc.StatusCode.UNAVAILABLE
    assert str(refused.value) == f"{method}: UNAVAILABLE: flaky on purpose"
    [(_, metadata)] = flaky.calls[method]  # sent once
    assert refused.value.request_id == metadata["x-request-id"]
    assert PREVIOUS_ATTEMPTS not in metadata


def test_retries_give_up_after_the_configured_attempts(flaky: FlakyServer, calls) -> None:
    with pytest.raises(ClientError) as failed:
        calls(flaky.address, lambda c: c.predict(IMAGE), retries=1, backoff_s=0.01)
    assert failed.value.code == grpc.StatusCode.UNAVAILABLE
    assert str(failed.value) == "Predict: UNAVAILABLE: flaky on purpose"
    assert flaky.previous_attempts("Predict") == [None, "1"]  # the call and one retry
    ids = {metadata["x-request-id"] for _, metadata in flaky.calls["Predict"]}
    assert ids == {failed.value.request_id}


@pytest.mark.parametrize("retries, attempts", [(0, 1), (9, MAX_ATTEMPTS)])
def test_no_retries_and_more_than_grpc_allows(serve, calls, retries: int, attempts: int) -> None:
    """retries=0 sends each call once; more retries than gRPC's cap of 5 attempts get 5."""
    server = serve(failures=100)
    with pytest.raises(ClientError) as failed:
        calls(server.address, lambda c: c.model(1), retries=retries, backoff_s=0.01)
    assert failed.value.code == grpc.StatusCode.UNAVAILABLE
    assert len(server.calls["GetModel"]) == attempts


def test_a_zero_backoff_still_retries(serve, calls) -> None:
    """gRPC rejects a zero backoff and drops a retry due in 0 ms (the call then hangs until its
    deadline): the SDK's floor keeps backoff_s=0 retrying, and quickly."""
    server = serve(failures=100)
    started = time.monotonic()
    with pytest.raises(ClientError) as failed:
        calls(server.address, lambda c: c.job("j1"), lambda c: c.job("j1"), retries=4,
              backoff_s=0.0, timeout=10.0)
    assert failed.value.code == grpc.StatusCode.UNAVAILABLE
    assert len(server.calls["GetJob"]) == MAX_ATTEMPTS
    assert time.monotonic() - started < 8.0  # not the deadline: each retry came


def test_one_deadline_bounds_a_call_and_all_its_retries(serve, calls) -> None:
    """Every attempt fails after 0.8 s. Were each attempt given the call's 1 s timeout, its 5
    attempts would take 4 s; gRPC's retries share the one deadline, so the call ends at about
    1 s, after 2 attempts (at 0 and ~0.8 s; 1 on a machine too loaded to retry in time)."""
    server = serve(failures=100, delay_s=0.8)
    started = time.monotonic()
    with pytest.raises(ClientError) as late:
        calls(server.address, lambda c: c.predict(IMAGE, timeout=1.0), retries=4, backoff_s=0.01,
              timeout=60.0)
    elapsed = time.monotonic() - started
    assert late.value.code in (grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.UNAVAILABLE)
    assert 0.9 < elapsed < 3.0, elapsed  # generous for a loaded machine, well under 4 s
    # The deadline, not the policy, ends the call: one attempt on a loaded machine that cannot
    # retry in time, two otherwise, never the 5 that per-attempt timeouts would have allowed.
    assert 1 <= len(server.calls["Predict"]) <= 2


def test_a_per_call_timeout_overrides_the_clients(serve, calls) -> None:
    """The server takes 2 s; the client's own timeout (60 s) would wait it out, the call's 0.2 s
    does not: DEADLINE_EXCEEDED, sent once (not retried)."""
    server = serve(failures=0, delay_s=2.0)
    with pytest.raises(ClientError) as late:
        calls(server.address, lambda c: c.models(timeout=0.2), timeout=60.0)
    assert late.value.code == grpc.StatusCode.DEADLINE_EXCEEDED
    assert len(server.calls["ListModels"]) == 1


def test_a_batch_larger_than_grpcs_retry_buffer_is_retried(flaky: FlakyServer, calls) -> None:
    """gRPC retries only a request that fits its per-call retry buffer (256 KiB by default);
    200 images are 600 KiB."""
    images = np.zeros((200, 32, 32, 3), dtype=np.uint8)
    [prediction] = calls(flaky.address, lambda c: c.predict(images), retries=4, backoff_s=0.01)
    assert prediction.version == 1
    assert flaky.previous_attempts("Predict") == [None, "1", "2"]


def test_the_service_config_retries_exactly_the_safe_methods() -> None:
    config = json.loads(service_config(retries=4, backoff_s=0.1))
    [method_config] = config["methodConfig"]
    named = {(name["service"], name["method"]) for name in method_config["name"]}
    assert named == {(service, method) for service, methods in RETRIED.items()
                     for method in methods}
    assert not {method for _, method in named} & {"Promote", "CancelJob", "Check", "WatchJob"}
    assert method_config["retryPolicy"] == {
        "maxAttempts": 5, "initialBackoff": "0.100s", "maxBackoff": "0.800s",
        "backoffMultiplier": 2, "retryableStatusCodes": ["UNAVAILABLE"]}
    assert json.loads(service_config(retries=0, backoff_s=0.1)) == {}


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
