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

Every unary call takes `timeout=` (seconds; the client's default otherwise): one deadline for
the call, its retries included. Idempotent calls (Predict, reads, and Train, which always carries
an idempotency key) are retried on UNAVAILABLE by gRPC itself (its retry policy, set in the
channel's service config: exponential backoff with jitter, `retries` + 1 attempts, at most
gRPC's 5); nothing else is retried. A watch resumes a broken stream where it stopped. Installed
by a bare `pip install convserve`: grpcio, protobuf and numpy only (no ONNX Runtime, torch or
Pillow).
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import grpc
import numpy as np
from grpc_health.v1 import health_pb2_grpc

from convserve.client import calls
from convserve.client.calls import Job, Prediction, TrainOptions
from convserve.contracts.headers import AUTHORIZATION, REQUEST_ID_HEADER
from convserve.errors import ClientError
from convserve.pb.convserve.v1 import convserve_pb2 as pb
from convserve.pb.convserve.v1 import convserve_pb2_grpc as pb_grpc

if TYPE_CHECKING:
    from typing_extensions import Unpack  # typing's own from Python 3.12

__all__ = ["AsyncClient", "Client", "ClientError", "Job", "Prediction", "TrainOptions"]

MAX_ATTEMPTS = 5  # gRPC's cap on a retry policy's maxAttempts (gRFC A6); it clamps larger ones


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

    def _start(self, call: calls.Call, timeout: float | None) -> tuple[Callable[..., Any], dict]:
        """The stub and its keyword arguments for one logical call. gRPC retries it within the one
        deadline, resending the same metadata: its request id, which the server logs and echoes."""
        self.last_request_id = uuid.uuid4().hex
        metadata = ((REQUEST_ID_HEADER, self.last_request_id), *self._auth)
        stub = getattr(self._stubs[call.service], call.method)
        return stub, {"timeout": self.timeout if timeout is None else timeout, "metadata": metadata}

    def _error(self, call: calls.Call, error: grpc.RpcError) -> ClientError:
        """What a call raises once gRPC has given up on it (its last attempt's status)."""
        return ClientError(error.code(), error.details() or "", call.method,
                           request_id=self.last_request_id)

    def _watch_failed(self, error: grpc.RpcError, attempt: int) -> float:
        if error.code() != grpc.StatusCode.UNAVAILABLE or attempt >= self.retries:
            raise ClientError(error.code(), error.details() or "", "WatchJob") from None
        return self.backoff_s * 2 ** attempt


def service_config(retries: int, backoff_s: float) -> str:
    """The channel's service config (JSON, gRFC A6): the methods in calls.RETRIED retried on
    UNAVAILABLE, `retries` times at most (gRPC allows 4), the backoff doubling from `backoff_s`
    with gRPC's jitter. All attempts share the call's one deadline."""
    attempts = min(retries + 1, MAX_ATTEMPTS)
    if attempts < 2:  # gRPC rejects a policy of fewer than 2 attempts: then none at all
        return json.dumps({})
    # gRPC rejects a zero backoff, and grpcio 1.85 loses a retry whose jittered backoff rounds
    # down to 0 ms (the call then waits out its deadline): 10 ms at least.
    first = max(backoff_s, 0.01)
    policy = {"maxAttempts": attempts, "initialBackoff": f"{first:.3f}s",
              "maxBackoff": f"{first * 2 ** (attempts - 2):.3f}s",  # the last retry's: no cap
              "backoffMultiplier": 2, "retryableStatusCodes": ["UNAVAILABLE"]}
    names = [{"service": service, "method": method}
             for service, methods in calls.RETRIED.items() for method in methods]
    return json.dumps({"methodConfig": [{"name": names, "retryPolicy": policy}]})


def _channel_args(address: str, max_message_bytes: int, retries: int, backoff_s: float, tls: bool,
                  tls_ca_file: str, tls_cert_file: str, tls_key_file: str
                  ) -> tuple[Any, list[tuple[str, int | str]]]:
    """(credentials or None, options) for a channel to `address`."""
    options: list[tuple[str, int | str]] = [
        ("grpc.max_receive_message_length", max_message_bytes),
        ("grpc.max_send_message_length", max_message_bytes),
        ("grpc.enable_retries", 1),
        ("grpc.service_config", service_config(retries, backoff_s)),
        # gRPC stops retrying a call whose request outgrows this buffer (256 KiB by default: 86
        # uint8 images): let any request the channel may send be retried.
        ("grpc.per_rpc_retry_buffer_size", max_message_bytes)]
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
        credentials, options = _channel_args(address, max_message_bytes, retries, backoff_s, tls,
                                             tls_ca_file, tls_cert_file, tls_key_file)
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
        return self._call(calls.predict_call(images, top_k, version), timeout)

    def model(self, version: int = 0, *, timeout: float | None = None) -> pb.ModelInfo:
        return self._call(calls.model_call(version), timeout)

    def models(self, *, timeout: float | None = None) -> pb.ListModelsResponse:
        return self._call(calls.models_call(), timeout)

    def promote(self, version: int, reason: str, *, timeout: float | None = None
                ) -> pb.ModelInfo:
        return self._call(calls.promote_call(version, reason), timeout)

    def health(self, service: str = "", *, timeout: float | None = None) -> str:
        """grpc.health.v1 status of the server ("") or of one service: SERVING, NOT_SERVING..."""
        return self._call(calls.health_call(service), timeout)

    # --- training ------------------------------------------------------------------------------

    def train(self, dataset: str = "digits", *, timeout: float | None = None,
              **options: Unpack[TrainOptions]) -> Job:
        """Start a job. TrainOptions lists the settings (convserve.contracts.spec says what each
        accepts); one left out, or None, takes the server's default. A value out of range raises
        ClientError(INVALID_ARGUMENT) before anything is sent. The key makes a retry safe: the
        same key returns the same job; one is generated when none is given."""
        return self._call(calls.train_call(dataset, **options), timeout)

    def resume(self, job_id: str, *, timeout: float | None = None) -> Job:
        """Continue an INTERRUPTED job from its checkpoint (safe to retry: one resume wins)."""
        return self._call(calls.resume_call(job_id), timeout)

    def job(self, job_id: str, *, timeout: float | None = None) -> Job:
        return self._call(calls.job_call(job_id), timeout)

    def jobs(self, *, timeout: float | None = None) -> list[Job]:
        return self._call(calls.jobs_call(), timeout)

    def cancel(self, job_id: str, *, timeout: float | None = None) -> Job:
        return self._call(calls.cancel_call(job_id), timeout)

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

    def _call(self, call: calls.Call, timeout: float | None) -> Any:
        stub, kwargs = self._start(call, timeout)
        try:
            reply = stub(call.request, **kwargs)
        except grpc.RpcError as error:
            raise self._error(call, error) from None
        return call.result(reply)


class AsyncClient(_Connection):
    """The same calls as Client, for asyncio code (grpc.aio): await them, `async for` a watch.
    Create it inside the event loop that uses it."""

    def __init__(self, address: str, *, timeout: float = 30.0, retries: int = 4,
                 backoff_s: float = 0.1, max_message_bytes: int = 64 << 20, token: str = "",
                 tls: bool = False, tls_ca_file: str = "", tls_cert_file: str = "",
                 tls_key_file: str = "") -> None:
        credentials, options = _channel_args(address, max_message_bytes, retries, backoff_s, tls,
                                             tls_ca_file, tls_cert_file, tls_key_file)
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
        return await self._call(calls.predict_call(images, top_k, version), timeout)

    async def model(self, version: int = 0, *, timeout: float | None = None) -> pb.ModelInfo:
        return await self._call(calls.model_call(version), timeout)

    async def models(self, *, timeout: float | None = None) -> pb.ListModelsResponse:
        return await self._call(calls.models_call(), timeout)

    async def promote(self, version: int, reason: str, *, timeout: float | None = None
                      ) -> pb.ModelInfo:
        return await self._call(calls.promote_call(version, reason), timeout)

    async def health(self, service: str = "", *, timeout: float | None = None) -> str:
        return await self._call(calls.health_call(service), timeout)

    # --- training ------------------------------------------------------------------------------

    async def train(self, dataset: str = "digits", *, timeout: float | None = None,
                    **options: Unpack[TrainOptions]) -> Job:
        return await self._call(calls.train_call(dataset, **options), timeout)

    async def resume(self, job_id: str, *, timeout: float | None = None) -> Job:
        return await self._call(calls.resume_call(job_id), timeout)

    async def job(self, job_id: str, *, timeout: float | None = None) -> Job:
        return await self._call(calls.job_call(job_id), timeout)

    async def jobs(self, *, timeout: float | None = None) -> list[Job]:
        return await self._call(calls.jobs_call(), timeout)

    async def cancel(self, job_id: str, *, timeout: float | None = None) -> Job:
        return await self._call(calls.cancel_call(job_id), timeout)

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

    async def _call(self, call: calls.Call, timeout: float | None) -> Any:
        stub, kwargs = self._start(call, timeout)
        try:
            reply = await stub(call.request, **kwargs)
        except grpc.RpcError as error:
            raise self._error(call, error) from None
        return call.result(reply)


def channel_credentials(ca_file: str = "", cert_file: str = "", key_file: str = ""
                        ) -> grpc.ChannelCredentials:
    """The SDK's TLS: the server's CA (system roots when empty), and a client certificate."""
    def read(path: str) -> bytes | None:
        return Path(path).read_bytes() if path else None

    return grpc.ssl_channel_credentials(root_certificates=read(ca_file),
                                        private_key=read(key_file),
                                        certificate_chain=read(cert_file))
