"""The conversions between convserve.v1 messages and the service's records
(convserve.server.messages): what a Train request asks, and what GetJob, WatchJob and GetModel
answer."""

from __future__ import annotations

import json

import pytest

from convserve.contracts.errors import ConfigError
from convserve.contracts.job_state import JobState
from convserve.contracts.model_card import GateDecision, ModelCard
from convserve.contracts.spec import TrainConfig
from convserve.jobs import JobRecord, TrainParams
from convserve.jobs.records import Attempt
from convserve.pb.convserve.v1 import convserve_pb2 as pb
from convserve.server import messages

GATE = GateDecision(False, ("accuracy 0.42 is below min_accuracy 0.5", "parity ok"),
                    candidate_accuracy=0.42, required_accuracy=0.5, champion_version=3,
                    champion_accuracy=0.9, parity_passed=True)


# --- TrainRequest -> TrainParams ---------------------------------------------------------------


def test_unset_fields_keep_the_specs_defaults() -> None:
    params = messages.train_params(pb.TrainRequest())
    assert params.config == TrainConfig() and params.gate == {}


def test_set_fields_carry_over_and_an_explicit_zero_counts_where_there_is_presence() -> None:
    request = pb.TrainRequest(dataset="synthetic:64", epochs=3, batch_size=16, lr=0.01, seed=7,
                              val_fraction=0.25, augment="none", schedule="cosine",
                              label_smoothing=0.0, weight_decay=0.0,
                              gate=pb.GateOverrides(min_accuracy=0.0, min_improvement=0.02,
                                                    allow_class_change=True))
    params = messages.train_params(request)
    assert params.config == TrainConfig(dataset="synthetic:64", epochs=3, batch_size=16,
                                        lr=0.01, seed=7, val_fraction=0.25, augment="none",
                                        schedule="cosine", label_smoothing=0.0,
                                        weight_decay=0.0)
    # A gate override with presence is kept even at 0; allow_class_change only when true.
    assert params.gate == {"min_accuracy": 0.0, "min_improvement": 0.02,
                           "allow_class_change": True}
    assert "max_class_recall_drop" not in params.gate


def test_a_plain_proto3_zero_means_the_default() -> None:
    """epochs, batch_size, lr... have no presence: 0 is "unset", never a request for 0."""
    params = messages.train_params(pb.TrainRequest(epochs=0, batch_size=0, lr=0.0, dataset=""))
    assert params.config == TrainConfig()


@pytest.mark.parametrize(("request_", "fragment"), [
    (pb.TrainRequest(epochs=100000), "epochs=100000 is out of range"),
    (pb.TrainRequest(lr=5.0), "lr=5.0 is out of range"),
    (pb.TrainRequest(augment="rotate"), "augment='rotate' is unknown"),
    (pb.TrainRequest(label_smoothing=1.0), "label_smoothing=1.0"),
])
def test_a_bad_value_raises_config_error_in_the_specs_words(request_: pb.TrainRequest,
                                                             fragment: str) -> None:
    with pytest.raises(ConfigError, match=fragment) as raised:
        messages.train_params(request_)
    assert raised.value.status == "INVALID_ARGUMENT"


def test_train_request_and_train_params_round_trip() -> None:
    params = TrainParams.of(dataset="digits", epochs=4, weight_decay=0.0,
                            gate={"min_accuracy": 0.7, "max_class_recall_drop": 0.1})
    request = messages.train_request(params, "nightly")
    assert request.idempotency_key == "nightly" and request.HasField("weight_decay")
    assert request.gate.HasField("max_class_recall_drop")
    assert not request.gate.HasField("min_improvement")
    assert messages.train_params(request) == params


# --- JobRecord -> Job --------------------------------------------------------------------------


def test_job_carries_state_attempts_queue_position_and_gate() -> None:
    record = JobRecord(
        id="j1", state=JobState.REJECTED, params=TrainParams.of(epochs=2),
        created_at="t0", started_at="t1", finished_at="t3", error="", model_version=None,
        gate=GATE, epoch=2, val_accuracy=0.42, idempotency_key="key",
        attempts=[Attempt(1, "host:1", "t1", "t2", "lost"),
                  Attempt(2, "host:2", "t2", "t3", "REJECTED")])
    message = messages.job(record, queue_position=0)
    assert (message.id, message.state) == ("j1", pb.REJECTED)
    assert (message.created_at, message.started_at, message.finished_at) == ("t0", "t1", "t3")
    assert (message.epoch, message.model_version) == (2, 0)
    assert message.val_accuracy == pytest.approx(0.42)
    assert message.request.epochs == 2 and message.request.idempotency_key == "key"
    assert [(a.number, a.trainer, a.claimed_at, a.ended_at, a.outcome)
            for a in message.attempts] == [(1, "host:1", "t1", "t2", "lost"),
                                           (2, "host:2", "t2", "t3", "REJECTED")]
    assert message.HasField("gate") and message.gate.promoted is False
    assert list(message.gate.reasons) == list(GATE.reasons)
    assert message.gate.reason == GATE.reason
    assert (message.gate.champion_version, message.gate.champion_accuracy) == (3, 0.9)
    assert message.gate.parity_passed is True


def test_a_queued_job_has_its_place_and_no_gate() -> None:
    record = JobRecord(id="j2", state=JobState.QUEUED, params=TrainParams(), created_at="t0")
    message = messages.job(record, queue_position=3)
    assert (message.state, message.queue_position) == (pb.QUEUED, 3)
    assert not message.HasField("gate") and message.val_accuracy == 0.0
    assert list(message.attempts) == []


def test_a_gate_without_a_champion_leaves_its_accuracy_unset() -> None:
    decision = messages.gate_decision(GateDecision(True, ("first model",)))
    assert decision is not None and not decision.HasField("champion_accuracy")
    assert decision.champion_version == 0
    assert messages.gate_decision(None) is None


# --- events -> JobEvent ------------------------------------------------------------------------


def test_an_epoch_event_carries_its_numbers_metrics_and_a_line() -> None:
    event = {"time": "t", "type": "epoch", "epoch": 2, "epochs": 5, "val_accuracy": 0.75,
             "val_loss": 0.5, "train_loss": 0.6, "train_accuracy": 0.7, "eta_s": 12.5}
    message = messages.job_event(7, event, JobState.RUNNING)
    assert (message.sequence, message.time, message.type, message.state) == (
        7, "t", "epoch", pb.RUNNING)
    assert (message.epoch, message.epochs, message.eta_s) == (2, 5, 12.5)
    assert dict(message.metrics) == {"val_accuracy": 0.75, "val_loss": 0.5, "train_loss": 0.6,
                                     "train_accuracy": 0.7}
    assert message.message == "epoch 2/5 val accuracy 0.7500"
    assert json.loads(message.json) == event


def test_a_gate_event_carries_its_decision_and_an_infinite_eta_is_left_out() -> None:
    event = {"type": "gate", **GATE.to_dict(), "eta_s": float("inf")}
    message = messages.job_event(1, event, JobState.RUNNING)
    assert message.HasField("gate") and message.gate.reason == GATE.reason
    assert message.message == f"gate: rejected: {GATE.reason}"
    assert not message.HasField("eta_s")


@pytest.mark.parametrize(("event", "line"), [
    ({"type": "state", "state": "FAILED", "error": "boom"}, "state FAILED: boom"),
    ({"type": "state", "state": "QUEUED"}, "state QUEUED"),
    ({"type": "exported", "parity": {"max_abs_diff": 6e-07}, "onnx_val_accuracy": 0.99},
     "exported to ONNX; parity max |diff| 6e-07, ONNX Runtime val accuracy 0.9900"),
    ({"type": "compiled", "seconds": 3.5}, "torch.compile took 3.5 s"),
    ({"type": "resumed", "epoch": 4}, "resumed from the checkpoint after epoch 4"),
    ({"type": "progress", "step": 3, "steps": 10}, "progress"),
])
def test_each_event_kind_has_its_line(event: dict, line: str) -> None:
    assert messages.job_event(1, event, JobState.RUNNING).message == line


@pytest.mark.parametrize(("event", "previous", "expected"), [
    ({"type": "state", "state": "PROMOTED"}, JobState.RUNNING, JobState.PROMOTED),
    ({"type": "state", "state": "QUEUED"}, JobState.RUNNING, JobState.QUEUED),
    ({"type": "state", "state": "TRAINING"}, JobState.QUEUED, JobState.RUNNING),  # a phase
    ({"type": "state", "state": "STOPPED"}, JobState.RUNNING, JobState.RUNNING),
    ({"type": "epoch", "epoch": 1}, JobState.RUNNING, JobState.RUNNING),
    ({"type": "progress"}, JobState.QUEUED, JobState.QUEUED),
])
def test_state_after_follows_state_events_only(event: dict, previous: JobState,
                                               expected: JobState) -> None:
    assert messages.state_after(event, previous) == expected


# --- ModelCard -> ModelInfo --------------------------------------------------------------------


def test_model_info_carries_the_cards_fields_and_the_whole_card() -> None:
    raw = {"version": 4, "classes": ["cat", "dog"], "dataset": {"name": "digits"},
           "created_at": "t", "sha256": "ab", "job_id": "j1",
           "metrics": {"onnx_val_accuracy": 0.8}, "gate": GATE.to_dict(),
           "input": {"name": "pixels", "dtype": "uint8", "layout": "NHWC",
                     "shape": [-1, 32, 32, 3]}}
    info = messages.model_info(4, ModelCard.from_dict(raw), promoted=True, promoted_at="t9")
    assert (info.version, list(info.classes), info.dataset, info.job_id) == (
        4, ["cat", "dog"], "digits", "j1")
    assert (info.promoted, info.promoted_at, info.sha256) == (True, "t9", "ab")
    assert info.val_accuracy == pytest.approx(0.8)
    assert (info.input.name, info.input.dtype, info.input.layout, list(info.input.shape)) == (
        "pixels", "uint8", "NHWC", [-1, 32, 32, 3])
    assert info.HasField("gate") and json.loads(info.card_json) == raw
    bare = messages.model_info(1, ModelCard.from_dict({}), promoted=False, promoted_at="")
    assert not bare.HasField("gate") and bare.job_id == "" and bare.val_accuracy == 0.0


def test_a_gate_override_of_none_is_an_unset_field_not_an_error() -> None:
    """`max_class_recall_drop: None` ("not checked") passes validation from Python callers;
    the job's message must still build (GetJob, ListJobs answer for it)."""
    from convserve.jobs import TrainParams
    from convserve.server import messages as built

    params = TrainParams.of(gate={"max_class_recall_drop": None, "min_accuracy": 0.2})
    params.validate()
    request = built.train_request(params, "key")
    assert not request.gate.HasField("max_class_recall_drop")
    assert abs(request.gate.min_accuracy - 0.2) < 1e-6
