"""What the SDK's calls send and what they give back, built once for Client and AsyncClient:
the result types (Prediction, Job), one `Call` per RPC (stub, request, how the reply becomes
the result), which methods are safe to retry, and the replies' conversions."""

from __future__ import annotations

import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, TypedDict, Unpack

import numpy as np
from grpc_health.v1 import health_pb2

from convserve import arrays
from convserve.contracts.errors import ConfigError, ConvserveError
from convserve.contracts.job_state import FINAL
from convserve.contracts.spec import REQUEST_SETTINGS, TrainConfig
from convserve.errors import ClientError, status_of
from convserve.pb.convserve.v1 import convserve_pb2 as pb


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
        return self.state in FINAL  # JobState values are their names; an unknown one: False


@dataclass(frozen=True)
class Call:
    """One logical call, built once for both clients: which stub method, the request, and how the
    reply becomes the SDK's value (whether it is retried is the method's: RETRIED)."""

    service: str                      # "inference", "training", "models" or "health"
    method: str
    request: Any
    result: Callable[[Any], Any] = lambda reply: reply


# The methods that are safe to send again, by gRPC service: gRPC's retry policy (the SDK channel's
# service config) retries exactly these on UNAVAILABLE. Predict and the reads change nothing;
# Train always carries an idempotency key (or a resume's job id), so a repeat returns the same job.
# Promote and CancelJob change state and are sent once; so is the health check, a probe that
# should report what it finds.
RETRIED: dict[str, tuple[str, ...]] = {
    "convserve.v1.Inference": ("Predict", "GetModel", "ListModels"),
    "convserve.v1.Training": ("Train", "GetJob", "ListJobs"),
}


def predict_call(images: np.ndarray | Sequence[bytes], top_k: int, version: int) -> Call:
    request = pb.PredictRequest(top_k=top_k, version=version)
    if isinstance(images, np.ndarray):
        try:
            request.raw.CopyFrom(arrays.encode_raw(images))
        except ConvserveError as error:  # checked here, before anything is sent
            raise ClientError(*status_of(error), "Predict") from None
    else:
        request.encoded.images.extend(bytes(image) for image in images)
    return Call("inference", "Predict", request, result=prediction_of)


class TrainOptions(TypedDict, total=False):
    """What Client.train and AsyncClient.train accept besides the dataset: the training spec's
    requestable settings (convserve.contracts.spec, whose help says what each does), the gate
    overrides and an idempotency key. None, or leaving one out, means the server's default. A
    test checks these keys against the spec."""

    epochs: int | None
    batch_size: int | None
    lr: float | None
    seed: int | None
    val_fraction: float | None
    augment: str | None
    schedule: str | None
    label_smoothing: float | None
    weight_decay: float | None
    min_accuracy: float | None
    min_improvement: float | None
    max_class_recall_drop: float | None
    allow_class_change: bool
    idempotency_key: str | None


GATE_OPTIONS = ("min_accuracy", "min_improvement", "max_class_recall_drop")


def train_call(dataset: str, **options: Unpack[TrainOptions]) -> Call:
    """Checked here through the training spec, in the words the server would use, before
    anything is sent."""
    given: dict[str, Any] = {k: v for k, v in options.items() if v is not None}
    key = given.pop("idempotency_key", None) or uuid.uuid4().hex
    allow_class_change = bool(given.pop("allow_class_change", False))
    gate = {name: given.pop(name) for name in GATE_OPTIONS if name in given}
    try:
        unknown = sorted(set(given) - set(REQUEST_SETTINGS))
        if unknown:  # the server's own settings (device, compile...) are not a caller's
            raise ConfigError(f"unknown training settings {unknown}; a request may set "
                              f"{list(REQUEST_SETTINGS)}")
        config = TrainConfig.from_dict({"dataset": dataset, **given})
    except ConfigError as error:
        raise ClientError(*status_of(error), "Train") from None
    request = pb.TrainRequest(idempotency_key=key,
                              **{name: getattr(config, name) for name in ("dataset", *given)})
    for name, value in gate.items():
        setattr(request.gate, name, value)
    request.gate.allow_class_change = allow_class_change
    return Call("training", "Train", request, result=job_of)


def model_call(version: int) -> Call:
    return Call("inference", "GetModel", pb.GetModelRequest(version=version))


def models_call() -> Call:
    return Call("inference", "ListModels", pb.ListModelsRequest())


def promote_call(version: int, reason: str) -> Call:
    return Call("models", "Promote", pb.PromoteRequest(version=version, reason=reason))


def health_call(service: str) -> Call:
    return Call("health", "Check", health_pb2.HealthCheckRequest(service=service),
                 result=lambda reply: health_pb2.HealthCheckResponse.ServingStatus.Name(
                     reply.status))


def resume_call(job_id: str) -> Call:
    return Call("training", "Train", pb.TrainRequest(resume_job=job_id), result=job_of)


def job_call(job_id: str) -> Call:
    return Call("training", "GetJob", pb.GetJobRequest(id=job_id), result=job_of)


def jobs_call() -> Call:
    return Call("training", "ListJobs", pb.ListJobsRequest(),
                 result=lambda reply: [job_of(j) for j in reply.jobs])


def cancel_call(job_id: str) -> Call:
    return Call("training", "CancelJob", pb.CancelJobRequest(id=job_id), result=job_of)


def prediction_of(reply: pb.PredictResponse) -> Prediction:
    classes = tuple(reply.class_names)
    top_k = tuple(tuple((classes[i], p) for i, p in zip(t.class_index, t.probability, strict=True))
                  for t in reply.top_k)
    return Prediction(version=reply.model_version, classes=classes,
                      probabilities=arrays.probabilities_of(reply),
                      predicted=np.asarray(reply.predicted_class, dtype=np.int64),
                      names=tuple(reply.predicted_name), top_k=top_k)


def job_of(message: pb.Job) -> Job:
    return Job(id=message.id, state=pb.JobState.Name(message.state), error=message.error,
               model_version=message.model_version, gate_reason=message.gate.reason,
               epoch=message.epoch, val_accuracy=message.val_accuracy, message=message)
