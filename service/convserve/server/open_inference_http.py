"""The Open Inference Protocol over HTTP/REST (KServe v2 and Triton's extensions), on
`--http-port`, in the server's own event loop.

aiohttp, chosen because it is asyncio-native (the routes await the same OpenInference object,
batcher and decode pool as gRPC, with no thread hand-off), well kept, and what tritonclient's own
asyncio HTTP client is built on. JSON tensors as the spec gives them, and Triton's binary tensor
extension (a JSON header of `Inference-Header-Content-Length` bytes, then raw tensors), which
tritonclient.http uses by default. Errors are `{"error": "..."}` with the status the code maps to.
"""

from __future__ import annotations

import hmac
import json
import logging
import time
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

import numpy as np
from aiohttp import web

from convserve.contracts.errors import InvalidInput, PermissionDenied, Unauthenticated
from convserve.contracts.headers import REQUEST_ID_HEADER, REQUEST_ID_PATTERN
from convserve.errors import status_of
from convserve.server.logs import REQUEST_ID
from convserve.server.open_inference import Inferred, Input, OpenInference, Requested
from convserve.server.telemetry import RequestMetrics
from convserve.serving import tensors

log = logging.getLogger("convserve.rpc")
HEADER_LENGTH = "Inference-Header-Content-Length"
HTTP_STATUS = {"OK": 200, "INVALID_ARGUMENT": 400, "FAILED_PRECONDITION": 400, "NOT_FOUND": 404,
               "ALREADY_EXISTS": 409, "RESOURCE_EXHAUSTED": 429, "UNAUTHENTICATED": 401,
               "PERMISSION_DENIED": 403, "UNAVAILABLE": 503}  # anything else: 500
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def build_app(model: OpenInference, metrics: RequestMetrics, *, token: str = "",
              max_body_bytes: int = 64 << 20) -> web.Application:
    """`token`: the bearer token that model reads and inference need (empty: open)."""
    routes = _Routes(model)
    app = web.Application(client_max_size=max_body_bytes,
                          middlewares=[_calls(metrics, token.encode(), max_body_bytes)])
    model_paths = ("/v2/models/{name}", "/v2/models/{name}/versions/{version}")
    app.router.add_get("/v2/health/live", routes.live)
    app.router.add_get("/v2/health/ready", routes.ready)
    app.router.add_get("/v2", routes.server_metadata)
    app.router.add_post("/v2/repository/index", routes.repository_index)
    for path in model_paths:
        app.router.add_get(path, routes.model_metadata)
        app.router.add_get(path + "/ready", routes.model_ready)
        app.router.add_get(path + "/config", routes.model_config)
        app.router.add_get(path + "/stats", routes.model_statistics)
        app.router.add_post(path + "/infer", routes.infer)
    return app


# Routes that read or run the model; the others (health, server metadata) stay open to probes.
_PROTECTED = frozenset({"model_metadata", "model_config", "model_statistics", "infer",
                        "repository_index"})


def _calls(metrics: RequestMetrics, token: bytes, max_body_bytes: int) -> Any:
    @web.middleware
    async def call(request: web.Request, handler: Handler) -> web.StreamResponse:
        """Per call: request id, auth, the status map, the latency metric."""
        route = request.match_info.route
        name = getattr(route.handler, "__name__", "unknown") if route.resource else "unknown"
        request_id = request.headers.get(REQUEST_ID_HEADER, "")
        if not REQUEST_ID_PATTERN.fullmatch(request_id):
            request_id = uuid.uuid4().hex
        reset = REQUEST_ID.set(request_id)
        started, code = time.perf_counter(), "OK"
        try:
            if token and name in _PROTECTED:
                _authorize(request, token)
            response = await handler(request)
        except web.HTTPException as error:  # aiohttp's own: 404 route, 405, 413 body too large
            code = "NOT_FOUND" if error.status == 404 else "INVALID_ARGUMENT"
            response = _error(error.status, error.reason if error.status != 413 else
                              f"request body too large: at most {max_body_bytes} bytes")
        except Exception as error:  # the one status map, as for gRPC
            status, message = status_of(error)
            code = status.name
            if code == "INTERNAL":
                log.error("HTTP %s failed", request.path, exc_info=error)
            response = _error(HTTP_STATUS.get(code, 500), message)
        finally:
            REQUEST_ID.reset(reset)
        metrics.observe(f"http:{name}", code, time.perf_counter() - started, service="http")
        response.headers[REQUEST_ID_HEADER] = request_id
        return response

    return call


def _authorize(request: web.Request, token: bytes) -> None:
    scheme, _, supplied = request.headers.get("Authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not supplied:
        raise Unauthenticated(f"{request.path} needs a bearer token: send the header "
                              "'Authorization: Bearer <token>'")
    if not hmac.compare_digest(supplied.encode(), token):
        raise PermissionDenied(f"{request.path}: the bearer token is not valid")


def _error(status: int, message: str) -> web.Response:
    return web.json_response({"error": message}, status=status)


class _Routes:
    def __init__(self, model: OpenInference) -> None:
        self._model = model

    async def live(self, request: web.Request) -> web.Response:
        return web.Response(status=200)

    async def ready(self, request: web.Request) -> web.Response:
        return web.Response(status=200 if self._model.server_ready() else 400)

    async def server_metadata(self, request: web.Request) -> web.Response:
        return web.json_response(self._model.server_metadata())

    async def model_ready(self, request: web.Request) -> web.Response:
        name, version = _model_of(request)
        return web.Response(status=200 if self._model.ready(name, version) else 400)

    async def model_metadata(self, request: web.Request) -> web.Response:
        return web.json_response(self._model.model_metadata(*_model_of(request)))

    async def model_config(self, request: web.Request) -> web.Response:
        return web.json_response(self._model.model_config(*_model_of(request)))

    async def model_statistics(self, request: web.Request) -> web.Response:
        return web.json_response(self._model.model_statistics(*_model_of(request)))

    async def repository_index(self, request: web.Request) -> web.Response:
        body = await _json_body(await request.read()) if request.can_read_body else {}
        return web.json_response(self._model.repository_index(body.get("ready") is True))

    async def infer(self, request: web.Request) -> web.Response:
        header, blobs = _split_binary(await request.read(), request.headers.get(HEADER_LENGTH))
        body = await _json_body(header)
        inputs = _inputs(body, blobs)
        requested, binary = _requested(body)
        name, version = _model_of(request)
        inferred = await self._model.infer(name, version, inputs, requested)
        return _infer_response(name, body, inferred, binary)


def _model_of(request: web.Request) -> tuple[str, str]:
    return request.match_info["name"], request.match_info.get("version", "")


async def _json_body(data: bytes) -> dict[str, Any]:
    try:
        body = json.loads(data or b"{}")
    except (ValueError, RecursionError) as error:
        raise InvalidInput(f"request body: expected a JSON object: {error}") from None
    if not isinstance(body, dict):
        raise InvalidInput(f"request body: expected a JSON object, got {type(body).__name__}")
    return body


def _split_binary(data: bytes, header_length: str | None) -> tuple[bytes, bytes]:
    """The JSON header and the binary tensors after it (Triton's binary tensor extension)."""
    if header_length is None:
        return data, b""
    if not header_length.isdigit() or int(header_length) > len(data):
        raise InvalidInput(f"{HEADER_LENGTH}: expected the JSON header's length in bytes, at "
                           f"most {len(data)}, got {header_length!r}")
    return data[:int(header_length)], data[int(header_length):]


def _inputs(body: dict[str, Any], blobs: bytes) -> list[Input]:
    given = body.get("inputs")
    if not isinstance(given, list) or not all(isinstance(i, dict) for i in given):
        raise InvalidInput("request body: expected \"inputs\", a list of tensor objects")
    inputs, offset = [], 0
    for tensor in given:
        parameters = tensor.get("parameters") or {}
        size = parameters.get("binary_data_size") if isinstance(parameters, dict) else None
        common = (str(tensor.get("name")), str(tensor.get("datatype")), tensor.get("shape") or [])
        if not isinstance(common[2], list):
            raise InvalidInput(f"input {common[0]!r}: expected \"shape\", a list of integers")
        if size is None:
            inputs.append(Input(*common, values=tensor.get("data")))
            continue
        if isinstance(size, bool) or not isinstance(size, int) or not 0 <= size <= len(blobs) - offset:
            raise InvalidInput(f"input {common[0]!r}: binary_data_size {size!r} does not fit the "
                               f"{len(blobs) - offset} binary bytes left")
        inputs.append(Input(*common, data=blobs[offset:offset + size]))
        offset += size
    return inputs


def _requested(body: dict[str, Any]) -> tuple[list[Requested], bool]:
    """The outputs asked for, and whether they go back as binary data."""
    parameters = body.get("parameters")
    binary = isinstance(parameters, dict) and parameters.get("binary_data_output") is True
    outputs = body.get("outputs") or []
    if not isinstance(outputs, list) or not all(isinstance(o, dict) for o in outputs):
        raise InvalidInput("request body: expected \"outputs\", a list of objects")
    requested = []
    for output in outputs:
        params = output.get("parameters") if isinstance(output.get("parameters"), dict) else {}
        binary = params.get("binary_data", binary) is True
        requested.append(Requested(str(output.get("name")), params.get("classification")))
    return requested, binary


def _infer_response(name: str, body: dict[str, Any], inferred: Inferred, binary: bool
                    ) -> web.Response:
    outputs, blobs = [], []
    for output in inferred.outputs:
        tensor: dict[str, Any] = {"name": output.name, "datatype": output.datatype,
                                  "shape": output.shape}
        if binary:
            blob = (output.floats.tobytes() if output.floats is not None
                    else tensors.serialize_bytes(output.strings))
            tensor["parameters"] = {"binary_data_size": len(blob)}
            blobs.append(blob)
        elif output.floats is not None:
            tensor["data"] = np.asarray(output.floats, dtype=np.float64).ravel().tolist()
        else:
            tensor["data"] = [s.decode() for s in output.strings]
        outputs.append(tensor)
    reply: dict[str, Any] = {"model_name": name, "model_version": str(inferred.version),
                             "outputs": outputs}
    if "id" in body:
        reply["id"] = str(body["id"])
    header = json.dumps(reply).encode()
    if not binary:
        return web.Response(body=header, content_type="application/json")
    return web.Response(body=header + b"".join(blobs), content_type="application/octet-stream",
                        headers={HEADER_LENGTH: str(len(header))})
