"""The Open Inference Protocol (KServe v2) with the clients its users already have: Triton's own
tritonclient over gRPC and HTTP, raw gRPC with typed contents, and curl (the README's lines),
against a real replica serving two versions."""

from __future__ import annotations

import json
import re
import subprocess
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from tritonclient.utils import InferenceServerException

from convserve.client import Client
from convserve.pb.convserve.oip import open_inference_pb2 as oip
from convserve.store.directory import DirectoryStore
from tests.conftest import REPO_ROOT
from tests.servers import ServerProcess, images, publish, running_server

MODEL = "convserve"


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory, onnx_models) -> Iterator[ServerProcess]:
    """Version 1: the trained model (its card names the classes); version 2, promoted: the same
    net untrained, so the two answer differently."""
    root = tmp_path_factory.mktemp("oip")
    (root / "datasets").mkdir()
    store = DirectoryStore(root / "store")
    assert publish(store, onnx_models["good"]) == 1
    assert publish(store, onnx_models["bad"]) == 2
    with running_server(root / "store", root / "datasets", "--http-port", "0") as server:
        yield server


def _clients(served: ServerProcess) -> tuple[grpcclient.InferenceServerClient,
                                             httpclient.InferenceServerClient]:
    return (grpcclient.InferenceServerClient(served.address),
            httpclient.InferenceServerClient(served.http_urls[0].removeprefix("http://")))


def test_health_readiness_and_metadata_over_grpc_and_http(served: ServerProcess) -> None:
    for client in _clients(served):
        assert client.is_server_live() and client.is_server_ready()
        assert client.is_model_ready(MODEL) and client.is_model_ready(MODEL, "1")
        assert not client.is_model_ready(MODEL, "9") and not client.is_model_ready("resnet")
        as_json = {"as_json": True} if isinstance(client, grpcclient.InferenceServerClient) else {}
        server = client.get_server_metadata(**as_json)
        metadata = client.get_model_metadata(MODEL, **as_json)
        config = client.get_model_config(MODEL, **as_json)
        config = config.get("config", config)  # gRPC wraps it in a ModelConfigResponse
        assert server["name"] == "convserve" and "classification" in server["extensions"]
        assert metadata["versions"] == ["1", "2"]
        assert [(t["name"], t["datatype"], [int(d) for d in t["shape"]]) for t in
                metadata["inputs"] + metadata["outputs"]] == [
            ("pixels", "UINT8", [-1, 32, 32, 3]), ("probabilities", "FP32", [-1, 10])]
        assert int(config["max_batch_size"]) > 0
        assert config["input"][0]["format"] == "FORMAT_NHWC"
        assert [int(d) for d in config["input"][0]["dims"]] == [32, 32, 3]


@pytest.mark.parametrize("transport", ["grpc", "http binary", "http json"])
def test_model_infer_returns_exactly_what_predict_returns(served: ServerProcess,
                                                          transport: str) -> None:
    pixels = images(5, seed=1)
    with Client(served.address) as sdk:
        expected = sdk.predict(pixels)
    grpc_client, http_client = _clients(served)
    if transport == "grpc":
        tensor = grpcclient.InferInput("pixels", list(pixels.shape), "UINT8")
        tensor.set_data_from_numpy(pixels)
        result = grpc_client.infer(MODEL, [tensor])
        version = result.get_response().model_version
    else:
        binary = transport == "http binary"
        tensor = httpclient.InferInput("pixels", list(pixels.shape), "UINT8")
        tensor.set_data_from_numpy(pixels, binary_data=binary)
        result = http_client.infer(MODEL, [tensor], outputs=[
            httpclient.InferRequestedOutput("probabilities", binary_data=binary)])
        version = result.get_response()["model_version"]
    assert version == str(expected.version) == "2"
    np.testing.assert_array_equal(result.as_numpy("probabilities"), expected.probabilities)


def test_fp32_in_unit_range_and_nchw_are_read_as_predict_reads_them(served: ServerProcess) -> None:
    pixels = images(3, seed=2)
    floats = (pixels / 255.0).astype(np.float32)
    with Client(served.address) as sdk:
        expected = sdk.predict(floats).probabilities
    client = grpcclient.InferenceServerClient(served.address)
    for array in (floats, np.ascontiguousarray(floats.transpose(0, 3, 1, 2))):
        tensor = grpcclient.InferInput("pixels", list(array.shape), "FP32")
        tensor.set_data_from_numpy(array)
        np.testing.assert_array_equal(client.infer(MODEL, [tensor]).as_numpy("probabilities"),
                                      expected)


def test_typed_contents_in_give_typed_contents_out(served: ServerProcess) -> None:
    """The spec's other tensor form (tritonclient always sends raw bytes): `contents`."""
    pixels = images(2, seed=3)
    request = oip.ModelInferRequest(model_name=MODEL, id="typed-1", inputs=[
        oip.ModelInferRequest.InferInputTensor(
            name="pixels", datatype="UINT8", shape=[2, 32, 32, 3],
            contents=oip.InferTensorContents(uint_contents=pixels.ravel().tolist()))])
    with grpc.insecure_channel(served.address) as channel, Client(served.address) as sdk:
        infer = channel.unary_unary("/inference.GRPCInferenceService/ModelInfer",
                                    request_serializer=oip.ModelInferRequest.SerializeToString,
                                    response_deserializer=oip.ModelInferResponse.FromString)
        reply = infer(request, timeout=30)
        expected = sdk.predict(pixels).probabilities
    assert (reply.id, reply.model_version, list(reply.raw_output_contents)) == ("typed-1", "2", [])
    output = reply.outputs[0]
    assert (output.name, output.datatype, list(output.shape)) == ("probabilities", "FP32", [2, 10])
    np.testing.assert_array_equal(np.array(output.contents.fp32_contents, np.float32).reshape(2, 10),
                                  expected)


def test_classification_gives_the_top_classes_as_value_index_label(served: ServerProcess) -> None:
    pixels = images(4, seed=4)
    with Client(served.address) as sdk:
        expected = sdk.predict(pixels, version=1)  # the trained model: distinct probabilities
    grpc_client, http_client = _clients(served)
    tensor = grpcclient.InferInput("pixels", list(pixels.shape), "UINT8")
    tensor.set_data_from_numpy(pixels)
    by_grpc = grpc_client.infer(MODEL, [tensor], model_version="1", outputs=[
        grpcclient.InferRequestedOutput("probabilities", class_count=3)]).as_numpy("probabilities")
    http_tensor = httpclient.InferInput("pixels", list(pixels.shape), "UINT8")
    http_tensor.set_data_from_numpy(pixels)
    by_http = http_client.infer(MODEL, [http_tensor], model_version="1", outputs=[
        httpclient.InferRequestedOutput("probabilities", class_count=3)]).as_numpy("probabilities")
    assert by_grpc.shape == by_http.shape == (4, 3)
    for row, grpc_row, http_row in zip(expected.probabilities, by_grpc, by_http, strict=True):
        entries = [entry.decode().split(":") for entry in grpc_row]
        order = np.argsort(-row, kind="stable")[:3]
        assert [int(index) for _, index, _ in entries] == order.tolist()
        assert [label for _, _, label in entries] == [expected.classes[i] for i in order]
        assert [float(value) for value, _, _ in entries] == pytest.approx(row[order], abs=1e-6)
        assert [e.decode() if isinstance(e, bytes) else e for e in http_row] == \
            [e.decode() for e in grpc_row]


def test_a_pinned_version_serves_and_an_unknown_one_is_not_found(served: ServerProcess) -> None:
    pixels = images(2, seed=5)
    with Client(served.address) as sdk:
        expected = sdk.predict(pixels, version=1).probabilities
    grpc_client, http_client = _clients(served)
    tensor = grpcclient.InferInput("pixels", [2, 32, 32, 3], "UINT8")
    tensor.set_data_from_numpy(pixels)
    pinned = grpc_client.infer(MODEL, [tensor], model_version="1")
    assert pinned.get_response().model_version == "1"
    np.testing.assert_array_equal(pinned.as_numpy("probabilities"), expected)
    for version, model in (("9", MODEL), ("1x", MODEL), ("", "resnet")):
        with pytest.raises(InferenceServerException) as refused:
            grpc_client.infer(model, [tensor], model_version=version)
        assert refused.value.status() == "StatusCode.NOT_FOUND"
    http_tensor = httpclient.InferInput("pixels", [2, 32, 32, 3], "UINT8")
    http_tensor.set_data_from_numpy(pixels)
    with pytest.raises(InferenceServerException, match="has no version '9'") as http_refused:
        http_client.infer(MODEL, [http_tensor], model_version="9")
    assert http_refused.value.status() == "404"


BAD = [({"shape": [2, 32, 32], "datatype": "UINT8"}, "expected shape [N, 32, 32, 3]"),
       ({"shape": [1, 32, 32, 3], "datatype": "INT32"}, "expected datatype UINT8 or FP32"),
       ({"shape": [1, 32, 32, 3], "datatype": "UINT8", "data": [300] * 3072}, "0..255"),
       ({"shape": [1, 32, 32, 3], "datatype": "FP32", "data": [2.0] * 3072}, "values in [0, 1]"),
       ({"shape": [1, 32, 32, 3], "datatype": "UINT8", "data": [1, 2]}, "needs 3072 values")]


@pytest.mark.parametrize(("tensor", "message"), BAD)
def test_bad_input_is_refused_with_a_reason_and_the_server_keeps_serving(
        served: ServerProcess, tensor: dict, message: str) -> None:
    values = tensor.get("data", [0] * int(np.prod(tensor["shape"])))
    body = {"inputs": [{"name": "pixels", **tensor, "data": values}]}
    status, reply = _post(served, f"/v2/models/{MODEL}/infer", json.dumps(body).encode())
    assert status == 400 and message in reply["error"]
    with grpc.insecure_channel(served.address) as channel:
        infer = channel.unary_unary("/inference.GRPCInferenceService/ModelInfer",
                                    request_serializer=oip.ModelInferRequest.SerializeToString,
                                    response_deserializer=oip.ModelInferResponse.FromString)
        typed = "fp32_contents" if tensor["datatype"] == "FP32" else "uint_contents"
        request = oip.ModelInferRequest(model_name=MODEL, inputs=[
            oip.ModelInferRequest.InferInputTensor(
                name="pixels", datatype=tensor["datatype"], shape=tensor["shape"],
                contents=oip.InferTensorContents(**{typed: values}))])
        with pytest.raises(grpc.RpcError) as refused:
            infer(request, timeout=30)
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert message in refused.value.details()
    assert grpcclient.InferenceServerClient(served.address).is_server_ready()
    assert not any("Traceback" in line for line in served.stderr_lines)


@pytest.mark.parametrize(("body", "headers", "message"), [
    (b"not json", {}, "expected a JSON object"),
    (b"[1, 2]", {}, "expected a JSON object, got list"),
    (b"{}", {}, "expected \"inputs\""),
    (b'{"inputs": [{"name": "pixels"}]}', {"Inference-Header-Content-Length": "999"},
     "Inference-Header-Content-Length"),
    (b"[" * 100_000, {}, "expected a JSON object"),
    (json.dumps({"inputs": [{"name": "images", "datatype": "UINT8", "shape": [1, 32, 32, 3],
                             "data": [0] * 3072}]}).encode(), {}, "one input named 'pixels'"),
])
def test_hostile_http_bodies_get_a_json_error(served: ServerProcess, body: bytes, headers: dict,
                                             message: str) -> None:
    status, reply = _post(served, f"/v2/models/{MODEL}/infer", body, headers)
    assert status == 400 and message in reply["error"]


def test_the_readme_curl_lines_work(served: ServerProcess, tmp_path: Path) -> None:
    readme = (REPO_ROOT / "README.md").read_text()
    block = re.search(r"```sh\n# convserve serve --store /srv/store --http-port 8000.*?\n(.*?)```",
                      readme, re.S)
    assert block, "README: the curl block under 'Using convserve from Triton/KServe clients'"
    host = served.http_urls[0].removeprefix("http://")
    script = block.group(1).replace("localhost:8000", host)
    result = subprocess.run(["bash", "-euo", "pipefail", "-c", script], cwd=tmp_path,
                            capture_output=True, text=True, timeout=60, check=False)
    assert result.returncode == 0, result.stderr
    ready, rest = result.stdout.split("\n", 1)
    metadata, end = json.JSONDecoder().raw_decode(rest)  # curl adds no newline after a body
    reply = json.loads(rest[end:])
    assert ready == "200" and metadata["name"] == MODEL
    assert reply["model_version"] == "2" and reply["outputs"][0]["shape"] == [1, 10]


def test_open_inference_calls_are_counted_like_predict(served: ServerProcess) -> None:
    grpc_client, _ = _clients(served)
    tensor = grpcclient.InferInput("pixels", [1, 32, 32, 3], "UINT8")
    tensor.set_data_from_numpy(images(1))
    counted = {"name": "convserve_requests_total", "service": "inference.GRPCInferenceService",
               "method": "ModelInfer", "code": "OK"}
    before = served.metric(**counted)
    grpc_client.infer(MODEL, [tensor])
    assert served.metric(**counted) == before + 1
    http = {"name": "convserve_requests_total", "service": "http", "method": "http:infer",
            "code": "INVALID_ARGUMENT"}
    before = served.metric(**http)
    assert _post(served, f"/v2/models/{MODEL}/infer", b"{}")[0] == 400
    assert served.metric(**http) == before + 1
    stats = grpc_client.get_inference_statistics(MODEL, as_json=True)["model_stats"]
    assert int(stats[0]["inference_count"]) >= 1


def test_inference_auth_covers_the_protocol_and_leaves_probes_open(tmp_path: Path,
                                                                   store_with_model) -> None:
    store_dir, datasets = store_with_model
    token = tmp_path / "token"
    token.write_text("s3cret\n")
    with running_server(store_dir, datasets, "--http-port", "0", "--auth-token-file", str(token),
                        "--auth-inference", "true") as server:
        client = grpcclient.InferenceServerClient(server.address)
        assert client.is_server_ready()  # a probe needs no token
        tensor = grpcclient.InferInput("pixels", [1, 32, 32, 3], "UINT8")
        tensor.set_data_from_numpy(images(1))
        with pytest.raises(InferenceServerException) as refused:
            client.infer(MODEL, [tensor])
        assert refused.value.status() == "StatusCode.UNAUTHENTICATED"
        assert client.infer(MODEL, [tensor], headers={"authorization": "Bearer s3cret"})
        status, reply = _post(server, f"/v2/models/{MODEL}/infer", b"{}")
        assert status == 401 and "Bearer" in reply["error"]
        status, _ = _post(server, f"/v2/models/{MODEL}/infer", b"{}",
                          {"Authorization": "Bearer wrong"})
        assert status == 403


def _post(server: ServerProcess, path: str, body: bytes, headers: dict | None = None
          ) -> tuple[int, dict]:
    from urllib.error import HTTPError
    from urllib.request import Request, urlopen

    request = Request(server.http_urls[0] + path, data=body, headers=headers or {},
                      method="POST")
    try:
        with urlopen(request, timeout=30) as response:
            return response.status, json.loads(response.read())
    except HTTPError as error:
        return error.code, json.loads(error.read())


def test_http_calls_carry_the_callers_request_id_or_a_fresh_one(served: ServerProcess) -> None:
    from urllib.request import Request, urlopen

    for sent, kept in (("caller-42", True), ("not a\ttoken", False)):
        request = Request(served.http_urls[0] + "/v2/health/live", headers={"x-request-id": sent})
        with urlopen(request, timeout=10) as response:
            echoed = response.headers["x-request-id"]
        assert (echoed == sent) is kept and re.fullmatch(r"[A-Za-z0-9._:-]{1,128}", echoed)
