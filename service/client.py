"""The convserve client SDK: numpy in, numpy out, one error type, safe retries; sync and asyncio.

    from convserve.client import AsyncClient, Client
    with Client("127.0.0.1:50051") as client:
        prediction = client.predict(images)          # uint8/float32 [N, 32, 32, 3] or [N, 3, 32, 32]
        job = client.train(dataset="digits", epochs=10)
        for event in client.watch(job.id): ...
        final = client.wait(job.id)

    async with AsyncClient("127.0.0.1:50051") as client:   # the same calls, awaited
        prediction = await client.predict(images, timeout=2.0)
        async for event in client.watch(job.id): ...

Every unary call takes `timeout=` (seconds; the client's default otherwise). Idempotent calls
(Predict, reads, and Train, which always carries an idempotency key) are retried on UNAVAILABLE
with exponential backoff; nothing else is retried. Installed by a bare `pip install convserve`:
grpcio, protobuf and numpy only (no ONNX Runtime, torch or Pillow).
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypedDict

import grpc
import numpy as np
from grpc_health.v1 import health_pb2, health_pb2_grpc

from convserve import arrays
from convserve.auth import AUTHORIZATION, channel_credentials
from convserve.contracts.job_dir import JobState
from convserve.errors import ClientError, ConvserveError
from convserve.logs import REQUEST_ID_HEADER
from convserve.pb.convserve.v1 import convserve_pb2 as pb
from convserve.pb.convserve.v1 import convserve_pb2_grpc as pb_grpc

if TYPE_CHECKING:
    from typing_extensions import Unpack  # typing's own from Python 3.12


@dataclass(frozen=True)
class Prediction:
    version: int                      # the model version that served it
    classes: tuple[str, ...]
    probabilities: np.ndarray         # float32 [N, classes], rows sum to 1
    predicted: np.ndarray             # int [N], argmax
    names: tuple[str, ...]            # class name per image
    top_k: tuple[tuple[tuple[str, float], ...], ...] = ()  # per image, when asked


@dataclass(frozen=True)
class Job:
    id: str
    state: str                        # a JobState name: QUEUED, RUNNING, PROMOTED, ...
    error: str
    model_version: int
    gate_reason: str
    epoch: int
    val_accuracy: float
    message: pb.Job                   # everything else the server said

    @property
    def finished(self) -> bool:
        """No more events will come (INTERRUPTED included: it only goes on if resumed)."""
        return JobState(self.state).final


@dataclass(frozen=True)
class _Call:
    """One logical call, built once for both clients: which stub method, the request, whether a
    retry is safe, and how the reply becomes the SDK's value."""

    service: str                      # "inference", "training", "models" or "health"
    method: str
    request: Any
    retry: bool
    result: Callable[[Any], Any] = lambda reply: reply


def _predict_call(images: np.ndarray | Sequence[bytes], top_k: int, version: int) -> _Call:
    request = pb.PredictRequest(top_k=top_k, version=version)
    if isinstance(images, np.ndarray):
        try:
            request.raw.CopyFrom(arrays.encode_raw(images))
        except ConvserveError as error:  # checked here, before anything is sent
            raise ClientError(error.code, str(error), "Predict") from None
    else:
        request.encoded.images.extend(bytes(image) for image in images)
    return _Call("inference", "Predict", request, retry=True, result=_prediction)


class TrainOptions(TypedDict, total=False):
    """What Client.train and AsyncClient.train accept besides the dataset."""

    epochs: int
    batch_size: int
    lr: float
    seed: int
    val_fraction: float
    min_accuracy: float | None
    min_improvement: float | None
    max_class_recall_drop: float | None
    allow_class_change: bool
    augment: str
    schedule: str
    label_smoothing: float | None
    weight_decay: float | None
    idempotency_key: str | None


def _train_call(dataset: str, *, epochs: int = 0, batch_size: int = 0, lr: float = 0.0,
                seed: int = 0, val_fraction: float = 0.0, min_accuracy: float | None = None,
                min_improvement: float | None = None, max_class_recall_drop: float | None = None,
                allow_class_change: bool = False, augment: str = "", schedule: str = "",
                label_smoothing: float | None = None, weight_decay: float | None = None,
                idempotency_key: str | None = None) -> _Call:
    request = pb.TrainRequest(dataset=dataset, epochs=epochs, batch_size=batch_size, lr=lr,
                              seed=seed, val_fraction=val_fraction, augment=augment,
                              schedule=schedule,
                              idempotency_key=idempotency_key or uuid.uuid4().hex)
    if label_smoothing is not None:
        request.label_smoothing = label_smoothing
    if weight_decay is not None:
        request.weight_decay = weight_decay
    for name, value in (("min_accuracy", min_accuracy), ("min_improvement", min_improvement),
                        ("max_class_recall_drop", max_class_recall_drop)):
        if value is not None:
            setattr(request.gate, name, value)
    request.gate.allow_class_change = allow_class_change
    return _Call("training", "Train", request, retry=True, result=_job)


def _model_call(version: int) -> _Call:
    return _Call("inference", "GetModel", pb.GetModelRequest(version=version), retry=True)


def _models_call() -> _Call:
    return _Call("inference", "ListModels", pb.ListModelsRequest(), retry=True)


def _promote_call(version: int, reason: str) -> _Call:
    return _Call("models", "Promote", pb.PromoteRequest(version=version, reason=reason),
                 retry=False)


def _health_call(service: str) -> _Call:
    return _Call("health", "Check", health_pb2.HealthCheckRequest(service=service), retry=False,
                 result=lambda reply: health_pb2.HealthCheckResponse.ServingStatus.Name(
                     reply.status))


def _resume_call(job_id: str) -> _Call:
    return _Call("training", "Train", pb.TrainRequest(resume_job=job_id), retry=True, result=_job)


def _job_call(job_id: str) -> _Call:
    return _Call("training", "GetJob", pb.GetJobRequest(id=job_id), retry=True, result=_job)


def _jobs_call() -> _Call:
    return _Call("training", "ListJobs", pb.ListJobsRequest(), retry=True,
                 result=lambda reply: [_job(j) for j in reply.jobs])


def _cancel_call(job_id: str) -> _Call:
    return _Call("training", "CancelJob", pb.CancelJobRequest(id=job_id), retry=False,
                 result=_job)


class _Connection:
    """What both clients hold: the settings, the stubs of one channel, the latest request id."""

    def __init__(self, address: str, channel: Any, timeout: float, retries: int,
                 backoff_s: float, token: str) -> None:
        self.address = address
        self.timeout = timeout
        self.retries = retries
        self.backoff_s = backoff_s
        self._auth = ((AUTHORIZATION, f"Bearer {token}"),) if token else ()
        self._channel = channel
        self._stubs = {"inference": pb_grpc.InferenceStub(channel),
                       "training": pb_grpc.TrainingStub(channel),
                       "models": pb_grpc.ModelsStub(channel),
                       "health": health_pb2_grpc.HealthStub(channel)}
        self.last_request_id = ""  # of the latest call: quote it when asking about a server log

    def _start(self, call: _Call, timeout: float | None) -> tuple[Callable[..., Any], dict, int]:
        """The stub, its keyword arguments and the attempts allowed, for one logical call
        (retries keep its request id, which the server logs and echoes)."""
        self.last_request_id = uuid.uuid4().hex
        metadata = ((REQUEST_ID_HEADER, self.last_request_id), *self._auth)
        stub = getattr(self._stubs[call.service], call.method)
        kwargs = {"timeout": self.timeout if timeout is None else timeout, "metadata": metadata}
        return stub, kwargs, self.retries + 1 if call.retry else 1

    def _failed(self, call: _Call, error: grpc.RpcError, attempt: int, attempts: int) -> float:
        """Seconds to wait before the next attempt; raises ClientError when there is none."""
        if error.code() != grpc.StatusCode.UNAVAILABLE or attempt == attempts - 1:
            raise ClientError(error.code(), error.details() or "", call.method,
                              request_id=self.last_request_id) from None
        return self.backoff_s * 2 ** attempt

    def _watch_failed(self, error: grpc.RpcError, attempt: int) -> float:
        if error.code() != grpc.StatusCode.UNAVAILABLE or attempt >= self.retries:
            raise ClientError(error.code(), error.details() or "", "WatchJob") from None
        return self.backoff_s * 2 ** attempt


def _channel_args(address: str, max_message_bytes: int, tls: bool, tls_ca_file: str,
                  tls_cert_file: str, tls_key_file: str) -> tuple[Any, list[tuple[str, int]]]:
    """(credentials or None, options) for a channel to `address`."""
    options = [("grpc.max_receive_message_length", max_message_bytes),
               ("grpc.max_send_message_length", max_message_bytes)]
    if tls or tls_ca_file or tls_cert_file or tls_key_file:
        return channel_credentials(tls_ca_file, tls_cert_file, tls_key_file), options
    return None, options


class Client(_Connection):
    def __init__(self, address: str, *, timeout: float = 30.0, retries: int = 4,
                 backoff_s: float = 0.1, max_message_bytes: int = 64 << 20, token: str = "",
                 tls: bool = False, tls_ca_file: str = "", tls_cert_file: str = "",
                 tls_key_file: str = "") -> None:
        """`token`: the bearer token operator calls need (and Predict, where the server says so).
        TLS when `tls` or any tls_* file is given: the server's CA (system roots when empty),
        and a client certificate and key where the server requires one."""
        credentials, options = _channel_args(address, max_message_bytes, tls, tls_ca_file,
                                             tls_cert_file, tls_key_file)
        channel = (grpc.secure_channel(address, credentials, options=options) if credentials
                   else grpc.insecure_channel(address, options=options))
        super().__init__(address, channel, timeout, retries, backoff_s, token)

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._channel.close()

    # --- inference -----------------------------------------------------------------------------

    def predict(self, images: np.ndarray | Sequence[bytes], *, top_k: int = 0, version: int = 0,
                timeout: float | None = None) -> Prediction:
        """Probabilities for an array of images, or for a list of encoded PNG/JPEG files."""
        return self._call(_predict_call(images, top_k, version), timeout)

    def model(self, version: int = 0, *, timeout: float | None = None) -> pb.ModelInfo:
        return self._call(_model_call(version), timeout)

    def models(self, *, timeout: float | None = None) -> pb.ListModelsResponse:
        return self._call(_models_call(), timeout)

    def promote(self, version: int, reason: str, *, timeout: float | None = None
                ) -> pb.ModelInfo:
        return self._call(_promote_call(version, reason), timeout)

    def health(self, service: str = "", *, timeout: float | None = None) -> str:
        """grpc.health.v1 status of the server ("") or of one service: SERVING, NOT_SERVING..."""
        return self._call(_health_call(service), timeout)

    # --- training ------------------------------------------------------------------------------

    def train(self, dataset: str = "digits", *, timeout: float | None = None,
              **options: Unpack[TrainOptions]) -> Job:
        """Start a job (zeros, "" and None mean the server's defaults; TrainOptions lists the
        settings). The key makes a retry safe: the same key returns the same job; one is
        generated when none is given."""
        return self._call(_train_call(dataset, **options), timeout)

    def resume(self, job_id: str, *, timeout: float | None = None) -> Job:
        """Continue an INTERRUPTED job from its checkpoint (safe to retry: one resume wins)."""
        return self._call(_resume_call(job_id), timeout)

    def job(self, job_id: str, *, timeout: float | None = None) -> Job:
        return self._call(_job_call(job_id), timeout)

    def jobs(self, *, timeout: float | None = None) -> list[Job]:
        return self._call(_jobs_call(), timeout)

    def cancel(self, job_id: str, *, timeout: float | None = None) -> Job:
        return self._call(_cancel_call(job_id), timeout)

    def watch(self, job_id: str, *, timeout: float | None = None) -> Iterator[pb.JobEvent]:
        """Every event of the job until it ends; a broken stream is resumed where it stopped.
        `timeout` bounds the whole stream (none by default)."""
        after, attempt = 0, 0
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            remaining = None if deadline is None else max(0.0, deadline - time.monotonic())
            try:
                for event in self._stubs["training"].WatchJob(
                        pb.WatchJobRequest(id=job_id, after_sequence=after), timeout=remaining,
                        metadata=self._auth):
                    after, attempt = event.sequence, 0
                    yield event
                return
            except grpc.RpcError as error:
                time.sleep(self._watch_failed(error, attempt))
                attempt += 1

    def wait(self, job_id: str, *, timeout: float | None = None) -> Job:
        """Block until the job reaches a final state; returns it."""
        for _ in self.watch(job_id, timeout=timeout):
            pass
        return self.job(job_id)

    def _call(self, call: _Call, timeout: float | None) -> Any:
        stub, kwargs, attempts = self._start(call, timeout)
        for attempt in range(attempts):
            try:
                return call.result(stub(call.request, **kwargs))
            except grpc.RpcError as error:
                time.sleep(self._failed(call, error, attempt, attempts))
        raise AssertionError("unreachable")


class AsyncClient(_Connection):
    """The same calls as Client, for asyncio code (grpc.aio): await them, `async for` a watch.
    Create it inside the event loop that uses it."""

    def __init__(self, address: str, *, timeout: float = 30.0, retries: int = 4,
                 backoff_s: float = 0.1, max_message_bytes: int = 64 << 20, token: str = "",
                 tls: bool = False, tls_ca_file: str = "", tls_cert_file: str = "",
                 tls_key_file: str = "") -> None:
        credentials, options = _channel_args(address, max_message_bytes, tls, tls_ca_file,
                                             tls_cert_file, tls_key_file)
        channel = (grpc.aio.secure_channel(address, credentials, options=options) if credentials
                   else grpc.aio.insecure_channel(address, options=options))
        super().__init__(address, channel, timeout, retries, backoff_s, token)

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        await self._channel.close()

    # --- inference -----------------------------------------------------------------------------

    async def predict(self, images: np.ndarray | Sequence[bytes], *, top_k: int = 0,
                      version: int = 0, timeout: float | None = None) -> Prediction:
        """Probabilities for an array of images, or for a list of encoded PNG/JPEG files."""
        return await self._call(_predict_call(images, top_k, version), timeout)

    async def model(self, version: int = 0, *, timeout: float | None = None) -> pb.ModelInfo:
        return await self._call(_model_call(version), timeout)

    async def models(self, *, timeout: float | None = None) -> pb.ListModelsResponse:
        return await self._call(_models_call(), timeout)

    async def promote(self, version: int, reason: str, *, timeout: float | None = None
                      ) -> pb.ModelInfo:
        return await self._call(_promote_call(version, reason), timeout)

    async def health(self, service: str = "", *, timeout: float | None = None) -> str:
        return await self._call(_health_call(service), timeout)

    # --- training ------------------------------------------------------------------------------

    async def train(self, dataset: str = "digits", *, timeout: float | None = None,
                    **options: Unpack[TrainOptions]) -> Job:
        return await self._call(_train_call(dataset, **options), timeout)

    async def resume(self, job_id: str, *, timeout: float | None = None) -> Job:
        return await self._call(_resume_call(job_id), timeout)

    async def job(self, job_id: str, *, timeout: float | None = None) -> Job:
        return await self._call(_job_call(job_id), timeout)

    async def jobs(self, *, timeout: float | None = None) -> list[Job]:
        return await self._call(_jobs_call(), timeout)

    async def cancel(self, job_id: str, *, timeout: float | None = None) -> Job:
        return await self._call(_cancel_call(job_id), timeout)

    async def watch(self, job_id: str, *, timeout: float | None = None
                    ) -> AsyncIterator[pb.JobEvent]:
        """Every event of the job until it ends; a broken stream is resumed where it stopped."""
        after, attempt = 0, 0
        loop = asyncio.get_running_loop()
        deadline = None if timeout is None else loop.time() + timeout
        while True:
            remaining = None if deadline is None else max(0.0, deadline - loop.time())
            try:
                async for event in self._stubs["training"].WatchJob(
                        pb.WatchJobRequest(id=job_id, after_sequence=after), timeout=remaining,
                        metadata=self._auth):
                    after, attempt = event.sequence, 0
                    yield event
                return
            except grpc.RpcError as error:
                await asyncio.sleep(self._watch_failed(error, attempt))
                attempt += 1

    async def wait(self, job_id: str, *, timeout: float | None = None) -> Job:
        """Until the job reaches a final state; returns it."""
        async for _ in self.watch(job_id, timeout=timeout):
            pass
        return await self.job(job_id)

    async def _call(self, call: _Call, timeout: float | None) -> Any:
        stub, kwargs, attempts = self._start(call, timeout)
        for attempt in range(attempts):
            try:
                reply: Awaitable[Any] = stub(call.request, **kwargs)
                return call.result(await reply)
            except grpc.RpcError as error:
                await asyncio.sleep(self._failed(call, error, attempt, attempts))
        raise AssertionError("unreachable")


def _prediction(reply: pb.PredictResponse) -> Prediction:
    classes = tuple(reply.class_names)
    top_k = tuple(tuple((classes[i], p) for i, p in zip(t.class_index, t.probability, strict=True))
                  for t in reply.top_k)
    return Prediction(version=reply.model_version, classes=classes,
                      probabilities=arrays.probabilities_of(reply),
                      predicted=np.asarray(reply.predicted_class, dtype=np.int64),
                      names=tuple(reply.predicted_name), top_k=top_k)


def _job(message: pb.Job) -> Job:
    return Job(id=message.id, state=pb.JobState.Name(message.state), error=message.error,
               model_version=message.model_version, gate_reason=message.gate.reason,
               epoch=message.epoch, val_accuracy=message.val_accuracy, message=message)
