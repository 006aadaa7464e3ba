"""Fuzzing a live replica with Hypothesis: random and mutated request bodies for every method of
every service it exposes. Bounded and seeded (derandomize), so CI runs the same examples."""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass
from urllib.request import urlopen

import grpc
import pytest
from google.protobuf import message_factory
from grpc_health.v1 import health_pb2
from grpc_reflection.v1alpha import reflection_pb2
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from convserve.pb.convserve.oip import open_inference_pb2 as oip
from convserve.pb.convserve.v1 import convserve_pb2 as pb
from convserve.server import open_inference_grpc
from convserve.store.directory import DirectoryStore
from tests.servers import ServerProcess, images, publish

pytestmark = pytest.mark.slow
FUZZ = settings(max_examples=80, deadline=None, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture])


@dataclass(frozen=True)
class Method:
    path: str
    request: type
    client_streaming: bool
    server_streaming: bool


def _methods() -> list[Method]:
    services = [*pb.DESCRIPTOR.services_by_name.values(),
                health_pb2.DESCRIPTOR.services_by_name["Health"],
                reflection_pb2.DESCRIPTOR.services_by_name["ServerReflection"]]
    return [*(Method(f"/{service.full_name}/{m.name}",
                     message_factory.GetMessageClass(m.input_type), m.client_streaming,
                     m.server_streaming) for service in services for m in service.methods),
            # The Open Inference Protocol, registered by name (no service descriptor of its own).
            *(Method(f"/{open_inference_grpc.SERVICE}/{name}", request, False, False)
              for name, request in open_inference_grpc.REQUESTS.items())]


METHODS = _methods()


@pytest.fixture(scope="module")
def server(tmp_path_factory, onnx_models) -> Iterator[ServerProcess]:
    root = tmp_path_factory.mktemp("fuzz")
    (root / "datasets").mkdir()
    publish(DirectoryStore(root / "store"), onnx_models["good"])
    replica = ServerProcess(root / "store", root / "datasets")
    try:
        yield replica
    finally:
        replica.stop()


def _call(channel: grpc.Channel, method: Method, body: bytes) -> grpc.RpcError | None:
    """Send raw bytes to `method`; the error, or None when it answered OK."""
    try:
        if method.client_streaming:
            for _ in channel.stream_stream(method.path)(iter([body]), timeout=10):
                pass
        elif method.server_streaming:
            for _ in channel.unary_stream(method.path)(body, timeout=10):
                break  # one reply is enough (Health/Watch would go on)
        else:
            channel.unary_unary(method.path)(body, timeout=10)
    except grpc.RpcError as error:
        return error
    return None


def _parses(method: Method, body: bytes) -> bool:
    try:
        method.request.FromString(body)
    except Exception:
        return False
    return True


def _count(url: str, method: str, code: str) -> float:
    """Calls of `method` answered `code`, whatever the service (unknown methods: "unknown")."""
    page = urlopen(url, timeout=10).read().decode()
    return sum(float(value) for labels, value in re.findall(
        r"^convserve_requests_total\{(.*)\} (\S+)$", page, flags=re.MULTILINE)
        if f'method="{method}"' in labels and f'code="{code}"' in labels)


@FUZZ
@given(method=st.sampled_from(METHODS), body=st.binary(min_size=1, max_size=512))
def test_a_body_that_is_not_the_request_message_is_invalid_argument(server, method: Method,
                                                                     body: bytes) -> None:
    assume(not _parses(method, body))
    name = method.path.rsplit("/", 1)[-1]
    before = _count(server.metrics_url, name, "INVALID_ARGUMENT")
    with grpc.insecure_channel(server.address) as channel:
        error = _call(channel, method, body)
    assert error is not None and error.code() == grpc.StatusCode.INVALID_ARGUMENT, error
    assert "is not a valid protobuf message" in error.details()
    assert "DecodeError" not in error.details() and "<class" not in error.details()
    assert _count(server.metrics_url, name, "INVALID_ARGUMENT") == before + 1


VALID_PREDICT = pb.PredictRequest(raw=pb.RawImages(
    data=images(2).tobytes(), dtype=pb.UINT8, layout=pb.NHWC, shape=[2, 32, 32, 3]),
    top_k=3).SerializeToString()


@st.composite
def mutated(draw: st.DrawFn, valid: bytes) -> bytes:
    """A valid body with bytes flipped, cut, inserted or duplicated."""
    data = bytearray(valid)
    for _ in range(draw(st.integers(1, 4))):
        where = draw(st.integers(0, max(0, len(data) - 1)))
        action = draw(st.sampled_from(["flip", "cut", "insert", "repeat"]))
        if action == "flip" and data:
            data[where] ^= draw(st.integers(1, 255))
        elif action == "cut":
            del data[where:]
        elif action == "insert":
            data[where:where] = draw(st.binary(min_size=1, max_size=16))
        else:
            data += data[where:where + draw(st.integers(1, 64))]
    return bytes(data)


@FUZZ
@given(body=mutated(VALID_PREDICT))
def test_a_mutated_predict_gets_a_deliberate_answer_and_the_server_serves_on(server, body: bytes
                                                                               ) -> None:
    _answered_deliberately(server, "/convserve.v1.Inference/Predict", body, VALID_PREDICT)


def _answered_deliberately(server: ServerProcess, path: str, body: bytes, valid: bytes) -> None:
    """Every answer is one the status map chose (or OK): never UNKNOWN, never INTERNAL; and a
    valid call right after is answered."""
    method = next(m for m in METHODS if m.path == path)
    with grpc.insecure_channel(server.address) as channel:
        error = _call(channel, method, body)
        assert error is None or error.code() in {
            grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.RESOURCE_EXHAUSTED,
            grpc.StatusCode.NOT_FOUND}, (error.code(), error.details())
        assert _call(channel, method, valid) is None


def test_garbage_leaves_no_tracebacks_and_unknown_methods_are_counted(server) -> None:
    with grpc.insecure_channel(server.address) as channel:
        for body in (b"\xff" * 8, b"\x0a\xff\xff\xff\xff\x0f", b"\x08"):
            error = _call(channel, METHODS[0], body)
            assert error is not None and error.code() == grpc.StatusCode.INVALID_ARGUMENT
        before = _count(server.metrics_url, "unknown", "UNIMPLEMENTED")
        with pytest.raises(grpc.RpcError) as caught:
            channel.unary_unary("/convserve.v1.Inference/NoSuchMethod")(b"", timeout=10)
        assert caught.value.code() == grpc.StatusCode.UNIMPLEMENTED
        assert _count(server.metrics_url, "unknown", "UNIMPLEMENTED") == before + 1
    # gRPC's default would log an ERROR with a traceback for every undecodable body.
    assert not [line for line in server.stderr_lines if "Traceback" in line
                or "Exception deserializing" in line]


VALID_INFER = oip.ModelInferRequest(
    model_name="convserve", inputs=[oip.ModelInferRequest.InferInputTensor(
        name="pixels", datatype="UINT8", shape=[2, 32, 32, 3])],
    outputs=[oip.ModelInferRequest.InferRequestedOutputTensor(
        name="probabilities", parameters={"classification": oip.InferParameter(int64_param=2)})],
    raw_input_contents=[images(2).tobytes()]).SerializeToString()


@FUZZ
@given(body=mutated(VALID_INFER))
def test_a_mutated_model_infer_gets_a_deliberate_answer_and_the_server_serves_on(
        server, body: bytes) -> None:
    _answered_deliberately(server, f"/{open_inference_grpc.SERVICE}/ModelInfer", body,
                           VALID_INFER)
