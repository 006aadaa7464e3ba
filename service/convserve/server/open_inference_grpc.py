"""The Open Inference Protocol over gRPC: `inference.GRPCInferenceService`, served on the same
port as convserve.v1 with the messages of protos/convserve/oip/open_inference.proto. Registered by
name (the path tritonclient and perf_analyzer call), through the same guard and `rpc` wrapper as
convserve's own services: request ids, metrics, one status map."""

from __future__ import annotations

from typing import Any

import grpc
from google.protobuf.json_format import ParseDict

from convserve.pb.convserve.oip import open_inference_pb2 as oip
from convserve.server.open_inference import Inferred, Input, OpenInference, Requested
from convserve.server.servicers import _Measured, rpc
from convserve.server.telemetry import RequestMetrics
from convserve.serving import tensors

SERVICE = "inference.GRPCInferenceService"
# Each method and its request message (the responses are the matching *Response messages).
REQUESTS: dict[str, Any] = {
    "ServerLive": oip.ServerLiveRequest, "ServerReady": oip.ServerReadyRequest,
    "ModelReady": oip.ModelReadyRequest, "ServerMetadata": oip.ServerMetadataRequest,
    "ModelMetadata": oip.ModelMetadataRequest, "ModelInfer": oip.ModelInferRequest,
    "ModelConfig": oip.ModelConfigRequest, "ModelStatistics": oip.ModelStatisticsRequest,
    "RepositoryIndex": oip.RepositoryIndexRequest}
_TYPED_FIELD = {"UINT8": "uint_contents", "FP32": "fp32_contents"}


class OpenInferenceServicer(_Measured):
    SERVICE = SERVICE
    def __init__(self, model: OpenInference, metrics: RequestMetrics | None = None) -> None:
        super().__init__(metrics)
        self._model = model

    @rpc
    async def ServerLive(self, request: oip.ServerLiveRequest, context: Any
                         ) -> oip.ServerLiveResponse:
        return oip.ServerLiveResponse(live=True)

    @rpc
    async def ServerReady(self, request: oip.ServerReadyRequest, context: Any
                          ) -> oip.ServerReadyResponse:
        return oip.ServerReadyResponse(ready=self._model.server_ready())

    @rpc
    async def ModelReady(self, request: oip.ModelReadyRequest, context: Any
                         ) -> oip.ModelReadyResponse:
        return oip.ModelReadyResponse(ready=self._model.ready(request.name, request.version))

    @rpc
    async def ServerMetadata(self, request: oip.ServerMetadataRequest, context: Any
                             ) -> oip.ServerMetadataResponse:
        return ParseDict(self._model.server_metadata(), oip.ServerMetadataResponse())

    @rpc
    async def ModelMetadata(self, request: oip.ModelMetadataRequest, context: Any
                            ) -> oip.ModelMetadataResponse:
        return ParseDict(self._model.model_metadata(request.name, request.version),
                         oip.ModelMetadataResponse())

    @rpc
    async def ModelConfig(self, request: oip.ModelConfigRequest, context: Any
                          ) -> oip.ModelConfigResponse:
        config = ParseDict(self._model.model_config(request.name, request.version),
                           oip.ModelConfig())
        return oip.ModelConfigResponse(config=config)

    @rpc
    async def ModelInfer(self, request: oip.ModelInferRequest, context: Any
                         ) -> oip.ModelInferResponse:
        raw = list(request.raw_input_contents)
        inputs = [_input(tensor, raw[i] if i < len(raw) else None)
                  for i, tensor in enumerate(request.inputs)]
        requested = [Requested(o.name, _parameter(o.parameters.get("classification")))
                     if "classification" in o.parameters else Requested(o.name)
                     for o in request.outputs]
        inferred = await self._model.infer(request.model_name, request.model_version, inputs,
                                           requested)
        return _response(request, inferred, raw_outputs=bool(raw))

    @rpc
    async def ModelStatistics(self, request: oip.ModelStatisticsRequest, context: Any
                              ) -> oip.ModelStatisticsResponse:
        return ParseDict(self._model.model_statistics(request.name, request.version),
                         oip.ModelStatisticsResponse())

    @rpc
    async def RepositoryIndex(self, request: oip.RepositoryIndexRequest, context: Any
                              ) -> oip.RepositoryIndexResponse:
        return ParseDict({"models": self._model.repository_index(request.ready)},
                         oip.RepositoryIndexResponse())


def _input(tensor: oip.ModelInferRequest.InferInputTensor, raw: bytes | None) -> Input:
    if raw is not None:
        return Input(tensor.name, tensor.datatype, list(tensor.shape), data=raw)
    field = _TYPED_FIELD.get(tensor.datatype, "uint_contents")
    return Input(tensor.name, tensor.datatype, list(tensor.shape),
                 values=list(getattr(tensor.contents, field)))


def _parameter(parameter: oip.InferParameter | None) -> object:
    if parameter is None:
        return None
    which = parameter.WhichOneof("parameter_choice")
    return getattr(parameter, which) if which else None


def _response(request: oip.ModelInferRequest, inferred: Inferred, *, raw_outputs: bool
              ) -> oip.ModelInferResponse:
    response = oip.ModelInferResponse(model_name=request.model_name,
                                      model_version=str(inferred.version), id=request.id)
    for output in inferred.outputs:
        tensor = response.outputs.add(name=output.name, datatype=output.datatype,
                                      shape=output.shape)
        if raw_outputs:
            response.raw_output_contents.append(
                output.floats.tobytes() if output.floats is not None
                else tensors.serialize_bytes(output.strings))
        elif output.floats is not None:
            tensor.contents.fp32_contents.extend(output.floats.ravel().tolist())
        else:
            tensor.contents.bytes_contents.extend(output.strings)
    return response


def register(server: Any, servicer: OpenInferenceServicer) -> None:
    """Add the service under its protocol name (`server`: a grpc.aio.Server or the guard)."""
    handlers = {name: grpc.unary_unary_rpc_method_handler(
        getattr(servicer, name), request_deserializer=request.FromString,
        response_serializer=lambda reply: reply.SerializeToString())
        for name, request in REQUESTS.items()}
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE, handlers),))
