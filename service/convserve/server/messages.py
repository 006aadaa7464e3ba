"""Builders from the service's records (cards, job records, events) to convserve.v1 messages.

Pure functions, so the servicers stay thin and the client SDK can be tested against exactly what
the server sends.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from typing import Any

from convserve.contracts.job_state import JobState
from convserve.contracts.model_card import GateDecision, ModelCard
from convserve.contracts.spec import REQUEST_SETTINGS
from convserve.jobs import JobRecord, TrainParams
from convserve.pb.convserve.v1 import convserve_pb2 as pb

_NUMERIC_METRICS = ("train_loss", "val_loss", "train_accuracy", "val_accuracy")


def gate_decision(decision: GateDecision | None) -> pb.GateDecision | None:
    if decision is None:
        return None
    message = pb.GateDecision(
        promoted=decision.promoted, reason=decision.reason, reasons=decision.reasons,
        candidate_accuracy=decision.candidate_accuracy,
        required_accuracy=decision.required_accuracy,
        champion_version=decision.champion_version or 0, parity_passed=decision.parity_passed)
    if decision.champion_accuracy is not None:
        message.champion_accuracy = decision.champion_accuracy
    return message


def model_info(version: int, card: ModelCard, *, promoted: bool,
               promoted_at: str) -> pb.ModelInfo:
    info = pb.ModelInfo(
        version=version,
        classes=card.classes,
        input=pb.InputSpec(name=card.input.name, dtype=card.input.dtype,
                           layout=card.input.layout, shape=card.input.shape),
        val_accuracy=card.val_accuracy or 0.0,
        dataset=card.dataset,
        created_at=card.created_at,
        promoted_at=promoted_at,
        promoted=promoted,
        sha256=card.sha256,
        job_id=card.job_id or "",
        card_json=json.dumps(card.raw, sort_keys=True),
    )
    decision = gate_decision(card.gate)
    if decision is not None:
        info.gate.CopyFrom(decision)
    return info


def train_params(request: pb.TrainRequest) -> TrainParams:
    """The request's settings through the training spec (raises ConfigError, INVALID_ARGUMENT,
    in the spec's words). Unset means the default: a field with presence that is absent, or a
    plain proto3 field left at zero ("" or 0)."""
    settings = {}
    for name in REQUEST_SETTINGS:
        field = request.DESCRIPTOR.fields_by_name[name]
        given = request.HasField(name) if field.has_presence else bool(getattr(request, name))
        if given:
            settings[name] = getattr(request, name)
    overrides: dict[str, Any] = {}
    for name in ("min_accuracy", "min_improvement", "max_class_recall_drop"):
        if request.gate.HasField(name):
            overrides[name] = getattr(request.gate, name)
    if request.gate.allow_class_change:
        overrides["allow_class_change"] = True
    return TrainParams.of(gate=overrides, **settings)


def train_request(params: TrainParams, idempotency_key: str) -> pb.TrainRequest:
    request = pb.TrainRequest(idempotency_key=idempotency_key,
                              **params.config.request_values())
    for name, value in params.gate.items():
        if value is not None:  # None: "not checked", as an unset optional field says
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
        attempts=[pb.JobAttempt(number=a.number, trainer=a.trainer, claimed_at=a.claimed_at,
                                ended_at=a.ended_at, outcome=a.outcome) for a in record.attempts],
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
        decision = gate_decision(GateDecision.from_dict(event))
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
