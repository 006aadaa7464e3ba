"""The SDK's retry contract against a real gRPC server that answers UNAVAILABLE: Predict and reads
are retried, Promote and CancelJob are not, and Train's retries all carry one idempotency key
(which is what makes retrying it safe). The server is a real grpc server on loopback speaking
convserve.v1, flaky on purpose; only its replies are canned."""

from __future__ import annotations

import collections
from collections.abc import Iterator
from concurrent import futures

import grpc
import numpy as np
import pytest

from service import codec
from service.client import Client, ClientError
from service.pb.convserve.v1 import convserve_pb2 as pb

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
            if len(self.calls[method]) <= FAILURES:
                context.abort(grpc.StatusCode.UNAVAILABLE, "flaky on purpose")
            return reply
        return behaviour


@pytest.fixture
def flaky() -> Iterator[FlakyServer]:
    server = FlakyServer()
    yield server
    server.server.stop(None)


def test_idempotent_calls_are_retried_with_one_request_id(flaky: FlakyServer) -> None:
    with Client(flaky.address, retries=4, backoff_s=0.01) as client:
        assert client.predict(np.zeros((1, 32, 32, 3), dtype=np.uint8)).version == 1
        assert client.model(1).version == 1
        assert client.job("j1").state == "RUNNING"
    for method in ("Predict", "GetModel", "GetJob"):
        attempts = flaky.calls[method]
        assert len(attempts) == FAILURES + 1, method
        ids = {metadata["x-request-id"] for _, metadata in attempts}
        assert len(ids) == 1, (method, ids)  # one logical call, however many attempts


def test_train_is_retried_and_every_attempt_carries_the_same_key(flaky: FlakyServer) -> None:
    with Client(flaky.address, retries=4, backoff_s=0.01) as client:
        assert client.train("digits", epochs=1).id == "j1"
    keys = [request.idempotency_key for request, _ in flaky.calls["Train"]]
    assert len(keys) == FAILURES + 1 and len(set(keys)) == 1 and keys[0]


@pytest.mark.parametrize("call, method", [
    (lambda client: client.promote(1, "rollback"), "Promote"),
    (lambda client: client.cancel("j1"), "CancelJob"),
], ids=["promote", "cancel"])
def test_calls_that_change_state_are_not_retried(flaky: FlakyServer, call, method: str) -> None:
    with Client(flaky.address, retries=4, backoff_s=0.01) as client, \
            pytest.raises(ClientError) as refused:
        call(client)
    assert refused.value.code == grpc.StatusCode.UNAVAILABLE
    assert len(flaky.calls[method]) == 1


def test_retries_give_up_after_the_configured_attempts(flaky: FlakyServer) -> None:
    with Client(flaky.address, retries=1, backoff_s=0.01) as client, \
            pytest.raises(ClientError) as failed:
        client.predict(np.zeros((1, 32, 32, 3), dtype=np.uint8))
    assert failed.value.code == grpc.StatusCode.UNAVAILABLE
    assert len(flaky.calls["Predict"]) == 2  # the call and one retry
