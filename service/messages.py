"""Builders from the service's records (cards, job records, events) to convserve.v1 messages.

Pure functions, so the servicers stay thin and the client SDK can be tested against exactly what
the server sends.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from typing import Any

from convserve.contracts.job_dir import JobState
from convserve.jobs import JobRecord, TrainParams
from convserve.pb.convserve.v1 import convserve_pb2 as pb

_NUMERIC_METRICS = ("train_loss", "val_loss", "train_accuracy", "val_accuracy")


def gate_decision(decision: Mapping[str, Any] | None) -> pb.GateDecision | None:
    if not decision:
        return None
    message = pb.GateDecision(
        promoted=bool(decision.get("promoted")),
        reason=str(decision.get("reason", "")),
        reasons=[str(r) for r in decision.get("reasons", [])],
        candidate_accuracy=float(decision.get("candidate_accuracy") or 0.0),
        required_accuracy=float(decision.get("required_accuracy") or 0.0),
        champion_version=int(decision.get("champion_version") or 0),
        parity_passed=bool(decision.get("parity_passed", False)),
    )
    if decision.get("champion_accuracy") is not None:
        message.champion_accuracy = float(decision["champion_accuracy"])
    return message


def model_info(version: int, card: Mapping[str, Any], *, promoted: bool,
               promoted_at: str) -> pb.ModelInfo:
    spec = card.get("input", {})
    info = pb.ModelInfo(
        version=version,
        classes=list(card.get("classes", [])),
        input=pb.InputSpec(name=spec.get("name", "pixels"), dtype=spec.get("dtype", "uint8"),
                           layout=spec.get("layout", "NHWC"),
                           shape=spec.get("shape", [-1, 32, 32, 3])),
        val_accuracy=float(card.get("metrics", {}).get("onnx_val_accuracy") or 0.0),
        dataset=str(card.get("dataset", {}).get("name", "")),
        created_at=str(card.get("created_at", "")),
        promoted_at=promoted_at,
        promoted=promoted,
        sha256=str(card.get("sha256", "")),
        job_id=str(card.get("job_id") or ""),
        card_json=json.dumps(card, sort_keys=True),
    )
    decision = gate_decision(card.get("gate"))
    if decision is not None:
        info.gate.CopyFrom(decision)
    return info


def train_params(request: pb.TrainRequest, defaults: TrainParams) -> TrainParams:
    """Proto3 zeros mean "server default"; gate overrides only where the caller set them."""
    overrides: dict[str, Any] = {}
    for name in ("min_accuracy", "min_improvement", "max_class_recall_drop"):
        if request.gate.HasField(name):
            overrides[name] = getattr(request.gate, name)
    if request.gate.allow_class_change:
        overrides["allow_class_change"] = True
    return TrainParams(
        dataset=request.dataset or defaults.dataset,
        epochs=request.epochs or defaults.epochs,
        batch_size=request.batch_size or defaults.batch_size,
        lr=request.lr or defaults.lr,
        seed=request.seed,
        val_fraction=request.val_fraction or defaults.val_fraction,
        gate=overrides,
        augment=request.augment or defaults.augment,
        schedule=request.schedule or defaults.schedule,
        label_smoothing=(request.label_smoothing if request.HasField("label_smoothing")
                         else defaults.label_smoothing),
        weight_decay=(request.weight_decay if request.HasField("weight_decay")
                      else defaults.weight_decay),
    )


def train_request(params: TrainParams, idempotency_key: str) -> pb.TrainRequest:
    request = pb.TrainRequest(dataset=params.dataset, epochs=params.epochs,
                              batch_size=params.batch_size, lr=params.lr, seed=params.seed,
                              val_fraction=params.val_fraction, idempotency_key=idempotency_key,
                              augment=params.augment, schedule=params.schedule,
                              label_smoothing=params.label_smoothing,
                              weight_decay=params.weight_decay)
    for name, value in params.gate.items():
        setattr(request.gate, name, value)
    return request


def job(record: JobRecord, queue_position: int = 0) -> pb.Job:
    message = pb.Job(
        id=record.id,
        state=pb.JobState.Value(JobState(record.state).value),
        request=train_request(record.params, record.idempotency_key),
        created_at=record.created_at, started_at=record.started_at,
        finished_at=record.finished_at, error=record.error,
        model_version=record.model_version or 0,
        epoch=record.epoch, val_accuracy=record.val_accuracy or 0.0,
        queue_position=queue_position,
    )
    decision = gate_decision(record.gate)
    if decision is not None:
        message.gate.CopyFrom(decision)
    return message


def job_event(sequence: int, event: Mapping[str, Any], state: JobState) -> pb.JobEvent:
    """One line of events.jsonl as a JobEvent; `state` is the job's state as of this event."""
    message = pb.JobEvent(
        sequence=sequence, time=str(event.get("time", "")), type=str(event.get("type", "")),
        state=pb.JobState.Value(state.value),
        epoch=int(event.get("epoch") or 0), epochs=int(event.get("epochs") or 0),
        step=int(event.get("step") or 0), steps=int(event.get("steps") or 0),
        images_per_s=float(event.get("images_per_s") or 0.0),
        message=_event_message(event), json=json.dumps(event, sort_keys=True),
    )
    eta = event.get("eta_s")
    if isinstance(eta, int | float) and math.isfinite(eta):
        message.eta_s = float(eta)
    for name in _NUMERIC_METRICS:
        if isinstance(event.get(name), int | float):
            message.metrics[name] = float(event[name])
    if event.get("type") == "gate":
        decision = gate_decision(event)
        if decision is not None:
            message.gate.CopyFrom(decision)
    return message


def state_after(event: Mapping[str, Any], previous: JobState) -> JobState:
    """The job state an event implies: explicit service states, else the one before."""
    if event.get("type") == "state":
        name = str(event.get("state", ""))
        if name in JobState.__members__:
            return JobState[name]
        return JobState.RUNNING  # the child's own phases: LOADING_DATA, TRAINING, EXPORTING...
    return previous


def _event_message(event: Mapping[str, Any]) -> str:
    kind = event.get("type")
    if kind == "state":
        return f"state {event.get('state')}" + (f": {event['error']}" if event.get("error") else "")
    if kind == "epoch":
        return (f"epoch {event.get('epoch')}/{event.get('epochs')} val accuracy "
                f"{float(event.get('val_accuracy', 0)):.4f}")
    if kind == "gate":
        verdict = "promoted" if event.get("promoted") else "rejected"
        return f"gate: {verdict}: {event.get('reason', '')}"
    if kind == "exported":
        parity = event.get("parity", {})
        return (f"exported to ONNX; parity max |diff| {float(parity.get('max_abs_diff', 0)):.2g}, "
                f"ONNX Runtime val accuracy {float(event.get('onnx_val_accuracy', 0)):.4f}")
    if kind == "compiled":
        return f"torch.compile took {event.get('seconds')} s"
    if kind == "resumed":
        return f"resumed from the checkpoint after epoch {event.get('epoch')}"
    return str(kind)
