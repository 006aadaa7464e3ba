"""The RPC methods: decode, one call into the service, encode. Nothing else lives here.

Every method is wrapped by `rpc`/`rpc_stream`, the single place where an exception becomes a
status code (through `convserve.errors.status_of`); an unexpected one is logged with its traceback
and answered INTERNAL, and the server keeps serving. The wrappers also give each call its request
id (logged, echoed to the caller) and record its latency and status code
(`convserve.server.telemetry.RequestMetrics`; a stream's latency is its whole duration).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import itertools
import logging
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from concurrent.futures import Executor
from typing import Any, TypeVar

import grpc

from convserve.contracts.errors import InvalidInput
from convserve.contracts.headers import REQUEST_ID_HEADER, REQUEST_ID_PATTERN
from convserve.contracts.job_state import JobState
from convserve.errors import status_of
from convserve.jobs import JobRunner
from convserve.pb.convserve.v1 import convserve_pb2 as pb
from convserve.pb.convserve.v1 import convserve_pb2_grpc as pb_grpc
from convserve.server import messages
from convserve.server.guard import Undecodable
from convserve.server.logs import REQUEST_ID
from convserve.server.telemetry import RequestMetrics
from convserve.serving import codec
from convserve.serving.manager import ModelManager
from convserve.serving.predictor import Predictor
from convserve.store.base import ModelStore

log = logging.getLogger("convserve.rpc")
# A raw request larger than this (about 80 float32 images) is converted off the loop too.
INLINE_RAW_BYTES = 1 << 20
Reply = TypeVar("Reply")


def rpc(method: Callable[..., Awaitable[Reply]]) -> Callable[..., Awaitable[Reply]]:
    @functools.wraps(method)
    async def wrapper(self: Any, request: Any, context: grpc.aio.ServicerContext) -> Reply:
        async with _Call(self.metrics, self.SERVICE, method.__name__, context):
            return await method(self, _decoded(request), context)
        raise AssertionError("unreachable: _Call re-raises")

    return wrapper


def rpc_stream(method: Callable[..., AsyncIterator[Reply]]) -> Callable[..., AsyncIterator[Reply]]:
    @functools.wraps(method)
    async def wrapper(self: Any, request: Any, context: grpc.aio.ServicerContext
                      ) -> AsyncIterator[Reply]:
        async with _Call(self.metrics, self.SERVICE, method.__name__, context, stream=True):
            async for reply in method(self, _decoded(request), context):
                yield reply

    return wrapper


def _decoded(request: Any) -> Any:
    """The request, or InvalidInput when its body did not parse (see convserve.server.guard)."""
    if isinstance(request, Undecodable):
        raise InvalidInput(request.message)
    return request


class _Call:
    """One API call, around its method: the request id (the caller's `x-request-id`, or a new
    one; echoed in the trailing metadata and set for every log line), the status code (an
    exception becomes its code here, through `status_of`), the latency metric, a DEBUG line."""

    def __init__(self, metrics: RequestMetrics, service: str, name: str,
                 context: grpc.aio.ServicerContext, *, stream: bool = False) -> None:
        self._metrics, self._service, self._name = metrics, service, name
        self._context, self._stream = context, stream

    async def __aenter__(self) -> _Call:
        self.request_id = _request_id(self._context)
        self._token = REQUEST_ID.set(self.request_id)
        self._context.set_trailing_metadata(((REQUEST_ID_HEADER, self.request_id),))
        self._started = time.perf_counter()
        return self

    async def __aexit__(self, kind: type[BaseException] | None, error: BaseException | None,
                        traceback: object) -> bool:
        code = "OK"
        if isinstance(error, asyncio.CancelledError):
            code = "CANCELLED"
        elif isinstance(error, grpc.aio.AbortError):  # the method aborted by itself
            code = _code_name(self._context)
        elif isinstance(error, Exception):  # the one place errors become status codes
            code = status_of(error)[0].name
        # Recorded before the status goes out, so a caller who has its answer finds it counted.
        seconds = time.perf_counter() - self._started
        self._metrics.observe(self._name, code, seconds, service=self._service,
                              stream=self._stream)
        log.debug("%s %s in %.2f ms", self._name, code, seconds * 1000,
                  extra={"method": self._name, "code": code, "ms": round(seconds * 1000, 3)})
        try:
            if isinstance(error, Exception) and not isinstance(error, grpc.aio.AbortError):
                await _abort(self._context, self._name, error)  # raises AbortError
        finally:
            with contextlib.suppress(ValueError):  # a stream may end in another context
                REQUEST_ID.reset(self._token)
        return False


def _request_id(context: grpc.aio.ServicerContext) -> str:
    """The caller's id when it is a sane token (it ends up in logs), otherwise a new one: this
    process's random prefix and a counter (unique like a uuid4, without its urandom call)."""
    for key, value in context.invocation_metadata() or ():
        if key == REQUEST_ID_HEADER and isinstance(value, str) and REQUEST_ID_PATTERN.fullmatch(value):
            return value
    return f"{_ID_PREFIX}{next(_ID_COUNTER):016x}"  # 32 hex digits, as a uuid4().hex


_ID_PREFIX = uuid.uuid4().hex[:16]
_ID_COUNTER = itertools.count(1)


async def _abort(context: grpc.aio.ServicerContext, name: str, error: BaseException) -> None:
    code, message = status_of(error)
    if code == grpc.StatusCode.INTERNAL:
        log.error("%s failed", name, exc_info=error)
    await context.abort(code, message)


def _code_name(context: grpc.aio.ServicerContext) -> str:
    code = context.code()
    return code.name if isinstance(code, grpc.StatusCode) else "UNKNOWN"


class _Measured:
    """Servicers share one RequestMetrics (the server passes it; tests may leave it out), and
    name their gRPC service for it."""

    SERVICE = "unknown"

    def __init__(self, metrics: RequestMetrics | None) -> None:
        self.metrics = metrics or RequestMetrics()


class InferenceServicer(_Measured, pb_grpc.InferenceServicer):
    """`decode_pool`: where encoded (PNG/JPEG) and large raw requests are decoded, off the event
    loop, so a heavy request waits only on its own decoding; the pool's size bounds how many
    decode at once (and so the memory decoding holds: see `codec.Limits`)."""

    SERVICE = "convserve.v1.Inference"

    def __init__(self, manager: ModelManager, store: ModelStore, limits: codec.Limits,
                 predictor: Predictor, metrics: RequestMetrics | None = None,
                 decode_pool: Executor | None = None) -> None:
        super().__init__(metrics)
        self._manager = manager
        self._store = store
        self._limits = limits
        self._predictor = predictor
        self._decode_pool = decode_pool

    @rpc
    async def Predict(self, request: pb.PredictRequest, context: grpc.aio.ServicerContext
                      ) -> pb.PredictResponse:
        # Validated pixels: bad input stops here, before any queue. Small raw images are a view
        # of the request's bytes (microseconds): on the loop; everything heavier: in the pool.
        if request.WhichOneof("images") == "encoded" or len(request.raw.data) > INLINE_RAW_BYTES:
            pixels = await asyncio.get_running_loop().run_in_executor(
                self._decode_pool, codec.decode_images, request, self._limits)
        else:
            pixels = codec.decode_images(request, self._limits)
        model, probabilities = await self._predictor.predict(pixels, request.version)
        return codec.predict_response(model.version, model.classes, probabilities, request.top_k)

    @rpc
    async def GetModel(self, request: pb.GetModelRequest, context: grpc.aio.ServicerContext
                       ) -> pb.ModelInfo:
        version = request.version or self._manager.current().version
        return _model_info(self._store, version)

    @rpc
    async def ListModels(self, request: pb.ListModelsRequest, context: grpc.aio.ServicerContext
                         ) -> pb.ListModelsResponse:
        promoted = self._store.promoted_version() or 0
        infos = [_model_info(self._store, v) for v in self._store.versions()]
        return pb.ListModelsResponse(models=infos, promoted_version=promoted)


class TrainingServicer(_Measured, pb_grpc.TrainingServicer):
    """Any replica answers for any job: jobs live in the job store (convserve.jobs)."""

    SERVICE = "convserve.v1.Training"

    def __init__(self, runner: JobRunner, metrics: RequestMetrics | None = None) -> None:
        super().__init__(metrics)
        self._runner = runner

    @rpc
    async def Train(self, request: pb.TrainRequest, context: grpc.aio.ServicerContext) -> pb.Job:
        if request.resume_job:
            record = await asyncio.to_thread(self._runner.resume, request.resume_job)
        else:
            params = messages.train_params(request)
            record = await asyncio.to_thread(self._runner.submit, params,
                                             request.idempotency_key)
        return messages.job(record, await asyncio.to_thread(self._runner.queue_position,
                                                            record.id))

    @rpc
    async def GetJob(self, request: pb.GetJobRequest, context: grpc.aio.ServicerContext) -> pb.Job:
        record = await asyncio.to_thread(self._runner.get, _job_id(request.id))  # file reads
        return messages.job(record, await asyncio.to_thread(self._runner.queue_position,
                                                            record.id))

    @rpc
    async def ListJobs(self, request: pb.ListJobsRequest, context: grpc.aio.ServicerContext
                       ) -> pb.ListJobsResponse:
        records = await asyncio.to_thread(self._runner.list)  # reads every job.json
        places = await asyncio.to_thread(self._runner.queue_positions)
        return pb.ListJobsResponse(jobs=[messages.job(r, places.get(r.id, 0)) for r in records])

    @rpc_stream
    async def WatchJob(self, request: pb.WatchJobRequest, context: grpc.aio.ServicerContext
                       ) -> AsyncIterator[pb.JobEvent]:
        state = JobState.QUEUED
        async for sequence, event in self._runner.watch(_job_id(request.id)):
            state = messages.state_after(event, state)
            if sequence > request.after_sequence:
                yield messages.job_event(sequence, event, state)

    @rpc
    async def CancelJob(self, request: pb.CancelJobRequest, context: grpc.aio.ServicerContext
                        ) -> pb.Job:
        record = await asyncio.to_thread(self._runner.cancel, _job_id(request.id))
        return messages.job(record)


class ModelsServicer(_Measured, pb_grpc.ModelsServicer):
    SERVICE = "convserve.v1.Models"

    def __init__(self, store: ModelStore, manager: ModelManager,
                 metrics: RequestMetrics | None = None) -> None:
        super().__init__(metrics)
        self._store = store
        self._manager = manager

    @rpc
    async def Promote(self, request: pb.PromoteRequest, context: grpc.aio.ServicerContext
                      ) -> pb.ModelInfo:
        if not request.version:
            raise InvalidInput("Promote needs a version (>= 1)")
        if not request.reason.strip():
            raise InvalidInput("Promote needs a reason (it is recorded in the promotion history)")
        await asyncio.to_thread(self._store.promote, request.version, reason=request.reason,
                                actor="operator:grpc")
        # Load it here too at once, so this replica answers with it as soon as Promote returns.
        await asyncio.to_thread(self._manager.refresh)
        return _model_info(self._store, request.version)


def _model_info(store: ModelStore, version: int) -> pb.ModelInfo:
    card = store.model_card(version)  # VersionNotFound -> NOT_FOUND
    promoted = store.promoted_version() == version
    promoted_at = next((e.time for e in reversed(store.history()) if e.version == version), "")
    return messages.model_info(version, card, promoted=promoted, promoted_at=promoted_at)


def _job_id(job_id: str) -> str:
    if not job_id:
        raise InvalidInput("a job id is required")
    return job_id
