"""The model card and gate decision cross processes as JSON and are read back as typed values,
leniently: a card from an older version (or a hand-edited one) still reads."""

from __future__ import annotations

import json

import pytest

from convserve.contracts.gate_policy import GatePolicy
from convserve.contracts.job_state import JobState
from convserve.contracts.model_card import GateDecision, InputSpec, ModelCard
from convserve.jobs import JobRecord, TrainParams

DECISION = GateDecision(promoted=False, reasons=("accuracy 0.4 is below min_accuracy 0.5",
                                                 "recall fell"),
                        candidate_accuracy=0.4, required_accuracy=0.5, champion_version=3,
                        champion_accuracy=0.7, class_recall_drops={"cat": 0.25},
                        parity_passed=True, policy=GatePolicy(min_accuracy=0.5))


def test_a_decision_survives_json_and_reads_back_equal() -> None:
    text = json.dumps(DECISION.to_dict())
    assert GateDecision.from_dict(json.loads(text)) == DECISION
    assert DECISION.reason == "accuracy 0.4 is below min_accuracy 0.5; recall fell"


@pytest.mark.parametrize("value", [None, [], "PROMOTED", {"reason": "no verdict"},
                                   {"promoted": "yes"}])
def test_what_is_not_a_decision_reads_as_none(value: object) -> None:
    assert GateDecision.from_dict(value) is None


def test_an_older_decision_with_only_a_reason_reads() -> None:
    decision = GateDecision.from_dict({"promoted": True, "reason": "forced",
                                       "champion_version": "2", "policy": {"bogus": 1}})
    assert decision == GateDecision(promoted=True, reasons=("forced",))


def test_a_card_reads_its_fields_and_keeps_the_whole_object() -> None:
    raw = {"version": 4, "classes": ["cat", "dog"], "created_at": "2026-11-30T00:00:00+00:00",
           "input": {"name": "pixels", "dtype": "uint8", "layout": "NHWC",
                     "shape": [-1, 32, 32, 3]},
           "dataset": {"name": "digits"}, "metrics": {"onnx_val_accuracy": 0.91},
           "sha256": "ab" * 32, "job_id": "j1", "gate": DECISION.to_dict(), "extra": [1]}
    card = ModelCard.from_dict(raw)
    assert (card.version, card.classes, card.dataset, card.val_accuracy, card.job_id) == (
        4, ("cat", "dog"), "digits", 0.91, "j1")
    assert card.input == InputSpec() and card.gate == DECISION and card.raw is raw


def test_a_card_with_missing_or_wrong_typed_fields_reads_with_defaults() -> None:
    card = ModelCard.from_dict({"classes": "cat", "metrics": [], "input": {"shape": "big"},
                                "version": True, "job_id": None, "gate": "PROMOTED"})
    assert card == ModelCard(raw=card.raw)


def test_a_job_record_keeps_its_typed_decision_and_params_across_json() -> None:
    record = JobRecord(id="j1", state=JobState.REJECTED, params=TrainParams.of(epochs=3),
                       created_at="now", gate=DECISION)
    again = JobRecord.from_dict(json.loads(json.dumps(record.to_dict())))
    assert again == record and again.gate == DECISION and again.params.config.epochs == 3
