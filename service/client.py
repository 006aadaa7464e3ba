"""The convserve client SDK: numpy in, numpy out, one error type, safe retries.

    from service.client import Client
    with Client("127.0.0.1:50051") as client:
        prediction = client.predict(images)          # uint8/float32 [N, 32, 32, 3] or [N, 3, 32, 32]
        job = client.train(dataset="digits", epochs=10)
        for event in client.watch(job.id): ...
        final = client.wait(job.id)

Idempotent calls (Predict, reads, and Train, which always carries an idempotency key) are retried
on UNAVAILABLE with exponential backoff; nothing else is retried.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import grpc
import numpy as np
from grpc_health.v1 import health_pb2, health_pb2_grpc

from service import codec
from service.auth import AUTHORIZATION, channel_credentials
from service.errors import ClientError, ConvserveError
from service.logs import REQUEST_ID_HEADER
from service.pb.convserve.v1 import convserve_pb2 as pb
from service.pb.convserve.v1 import convserve_pb2_grpc as pb_grpc

T = TypeVar("T")
FINAL_STATES = frozenset({"PROMOTED", "REJECTED", "FAILED", "CANCELLED"})


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
    state: str                        # QUEUED, RUNNING, PROMOTED, REJECTED, FAILED, CANCELLED
    error: str
    model_version: int
    gate_reason: str
    epoch: int
    val_accuracy: float
    message: pb.Job                   # everything else the server said

    @property
    def finished(self) -> bool:
        return self.state in FINAL_STATES


class Client:
    def __init__(self, address: str, *, timeout: float = 30.0, retries: int = 4,
                 backoff_s: float = 0.1, max_message_bytes: int = 64 << 20, token: str = "",
                 tls: bool = False, tls_ca_file: str = "", tls_cert_file: str = "",
                 tls_key_file: str = "") -> None:
        """`token`: the bearer token operator calls need (and Predict, where the server says so).
        TLS when `tls` or any tls_* file is given: the server's CA (system roots when empty),
        and a client certificate and key where the server requires one."""
        self.address = address
        self.timeout = timeout
        self.retries = retries
        self.backoff_s = backoff_s
        self._auth = ((AUTHORIZATION, f"Bearer {token}"),) if token else ()
        options = [("grpc.max_receive_message_length", max_message_bytes),
                   ("grpc.max_send_message_length", max_message_bytes)]
        if tls or tls_ca_file or tls_cert_file or tls_key_file:
            credentials = channel_credentials(tls_ca_file, tls_cert_file, tls_key_file)
            self._channel = grpc.secure_channel(address, credentials, options=options)
        else:
            self._channel = grpc.insecure_channel(address, options=options)
        self._inference = pb_grpc.InferenceStub(self._channel)
        self._training = pb_grpc.TrainingStub(self._channel)
        self._models = pb_grpc.ModelsStub(self._channel)
        self._health = health_pb2_grpc.HealthStub(self._channel)
        self.last_request_id = ""  # of the latest call: quote it when asking about a server log

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._channel.close()

    # --- inference -----------------------------------------------------------------------------

    def predict(self, images: np.ndarray | Sequence[bytes], *, top_k: int = 0,
                version: int = 0) -> Prediction:
        """Probabilities for an array of images, or for a list of encoded PNG/JPEG files."""
        request = pb.PredictRequest(top_k=top_k, version=version)
        if isinstance(images, np.ndarray):
            try:
                request.raw.CopyFrom(codec.encode_raw(images))
            except ConvserveError as error:  # checked here, before anything is sent
                raise ClientError(error.code, str(error), "Predict") from None
        else:
            request.encoded.images.extend(bytes(image) for image in images)
        reply = self._call("Predict", self._inference.Predict, request, retry=True)
        return _prediction(reply)

    def model(self, version: int = 0) -> pb.ModelInfo:
        return self._call("GetModel", self._inference.GetModel,
                          pb.GetModelRequest(version=version), retry=True)

    def models(self) -> pb.ListModelsResponse:
        return self._call("ListModels", self._inference.ListModels, pb.ListModelsRequest(),
                          retry=True)

    def promote(self, version: int, reason: str) -> pb.ModelInfo:
        return self._call("Promote", self._models.Promote,
                          pb.PromoteRequest(version=version, reason=reason), retry=False)

    def health(self, service: str = "") -> str:
        """grpc.health.v1 status of the server ("") or of one service: SERVING, NOT_SERVING..."""
        reply = self._call("Health", self._health.Check,
                           health_pb2.HealthCheckRequest(service=service), retry=False)
        return health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)

    # --- training ------------------------------------------------------------------------------

    def train(self, dataset: str = "digits", *, epochs: int = 0, batch_size: int = 0,
              lr: float = 0.0, seed: int = 0, val_fraction: float = 0.0,
              min_accuracy: float | None = None, min_improvement: float | None = None,
              max_class_recall_drop: float | None = None, allow_class_change: bool = False,
              augment: str = "", schedule: str = "", label_smoothing: float | None = None,
              weight_decay: float | None = None, idempotency_key: str | None = None) -> Job:
        """Start a job (zeros, "" and None mean the server's defaults). The key makes a retry
        safe: the same key returns the same job; one is generated when none is given."""
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
        return _job(self._call("Train", self._training.Train, request, retry=True))

    def resume(self, job_id: str) -> Job:
        """Continue an INTERRUPTED job from its checkpoint (safe to retry: one resume wins)."""
        return _job(self._call("Train", self._training.Train,
                               pb.TrainRequest(resume_job=job_id), retry=True))

    def job(self, job_id: str) -> Job:
        return _job(self._call("GetJob", self._training.GetJob, pb.GetJobRequest(id=job_id),
                               retry=True))

    def jobs(self) -> list[Job]:
        reply = self._call("ListJobs", self._training.ListJobs, pb.ListJobsRequest(), retry=True)
        return [_job(j) for j in reply.jobs]

    def cancel(self, job_id: str) -> Job:
        return _job(self._call("CancelJob", self._training.CancelJob,
                               pb.CancelJobRequest(id=job_id), retry=False))

    def watch(self, job_id: str, *, timeout: float | None = None) -> Iterator[pb.JobEvent]:
        """Every event of the job until it ends; a broken stream is resumed where it stopped."""
        after, attempt = 0, 0
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            remaining = None if deadline is None else max(0.0, deadline - time.monotonic())
            try:
                for event in self._training.WatchJob(
                        pb.WatchJobRequest(id=job_id, after_sequence=after), timeout=remaining):
                    after, attempt = event.sequence, 0
                    yield event
                return
            except grpc.RpcError as error:
                if error.code() != grpc.StatusCode.UNAVAILABLE or attempt >= self.retries:
                    raise ClientError(error.code(), error.details() or "", "WatchJob") from None
                time.sleep(self.backoff_s * 2 ** attempt)
                attempt += 1

    def wait(self, job_id: str, *, timeout: float | None = None) -> Job:
        """Block until the job reaches a final state; returns it."""
        for _ in self.watch(job_id, timeout=timeout):
            pass
        return self.job(job_id)

    # --- plumbing ------------------------------------------------------------------------------

    def _call(self, method: str, stub: Callable[..., T], request: Any, *, retry: bool) -> T:
        """One logical call (retries keep its request id, which the server logs and echoes)."""
        self.last_request_id = uuid.uuid4().hex
        metadata = ((REQUEST_ID_HEADER, self.last_request_id), *self._auth)
        attempts = self.retries + 1 if retry else 1
        for attempt in range(attempts):
            try:
                return stub(request, timeout=self.timeout, metadata=metadata)
            except grpc.RpcError as error:
                if error.code() != grpc.StatusCode.UNAVAILABLE or attempt == attempts - 1:
                    raise ClientError(error.code(), error.details() or "", method,
                                      request_id=self.last_request_id) from None
                time.sleep(self.backoff_s * 2 ** attempt)
        raise AssertionError("unreachable")


def _prediction(reply: pb.PredictResponse) -> Prediction:
    classes = tuple(reply.class_names)
    top_k = tuple(tuple((classes[i], p) for i, p in zip(t.class_index, t.probability, strict=True))
                  for t in reply.top_k)
    return Prediction(version=reply.model_version, classes=classes,
                      probabilities=codec.probabilities_of(reply),
                      predicted=np.asarray(reply.predicted_class, dtype=np.int64),
                      names=tuple(reply.predicted_name), top_k=top_k)


def _job(message: pb.Job) -> Job:
    return Job(id=message.id, state=pb.JobState.Name(message.state), error=message.error,
               model_version=message.model_version, gate_reason=message.gate.reason,
               epoch=message.epoch, val_accuracy=message.val_accuracy, message=message)
