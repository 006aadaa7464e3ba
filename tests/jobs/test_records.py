"""JobRecord (convserve.jobs.records): the value every job store keeps, its JSON round trip, and
the attempt bookkeeping the lease and recovery read."""

from __future__ import annotations

import json
import math
from datetime import UTC, datetime, timedelta

import pytest

from convserve.contracts.gate_policy import GatePolicy
from convserve.contracts.job_state import JobState
from convserve.contracts.model_card import GateDecision
from convserve.jobs.params import TrainParams
from convserve.jobs.records import Attempt, JobRecord, age_s

NOW = datetime(2026, 3, 1, 12, 0, 0, tzinfo=UTC)


def _record(**changes: object) -> JobRecord:
    values: dict = {"id": "job1", "state": JobState.RUNNING,
                    "params": TrainParams.of(epochs=3, gate={"min_accuracy": 0.6}),
                    "created_at": NOW.isoformat(), "queued_at": NOW.isoformat()}
    return JobRecord(**{**values, **changes})


def test_a_full_record_survives_a_json_round_trip() -> None:
    gate = GateDecision(True, ("first model", "clears min_accuracy"), candidate_accuracy=0.9,
                        required_accuracy=0.6, champion_version=2, champion_accuracy=0.8,
                        class_recall_drops={"cat": 0.01}, parity_passed=True,
                        policy=GatePolicy(min_accuracy=0.6))
    record = _record(state=JobState.PROMOTED, model_version=3, gate=gate, epoch=3,
                     val_accuracy=0.9, pid=1234, idempotency_key="nightly", resumes=1,
                     trainer="host:7", gate_policy=GatePolicy(min_accuracy=0.6).to_dict(),
                     attempts=[Attempt(1, "host:6", NOW.isoformat(), NOW.isoformat(), "lost"),
                               Attempt(2, "host:7", NOW.isoformat(), NOW.isoformat(),
                                       "PROMOTED")])
    stored = json.loads(json.dumps(record.to_dict()))  # as job.json or a JSON column holds it
    assert stored["state"] == "PROMOTED" and stored["params"]["epochs"] == 3
    assert stored["gate"]["promoted"] is True
    assert JobRecord.from_dict(stored) == record


def test_a_newer_replicas_record_is_read_with_its_unknown_keys_ignored() -> None:
    stored = _record(attempts=[Attempt(1, "host:1", NOW.isoformat())]).to_dict()
    stored["priority"] = "high"                      # a field this version does not know
    stored["attempts"][0]["gpu"] = "H200"            # ... in an attempt
    stored["params"]["optimizer_beta3"] = 0.5        # ... and a setting it does not know
    record = JobRecord.from_dict(stored)
    assert record.id == "job1" and record.params.config.epochs == 3
    assert record.attempts == [Attempt(1, "host:1", NOW.isoformat())]
    assert not hasattr(record, "priority")


def test_an_old_record_without_gate_or_attempts_reads_with_defaults() -> None:
    stored = {"id": "old", "state": "QUEUED", "params": {"epochs": 1},
              "created_at": NOW.isoformat()}
    record = JobRecord.from_dict(stored)
    assert record.gate is None and record.attempts == [] and record.attempt == 0
    assert record.gate_policy is None and record.params.gate == {}
    with pytest.raises(ValueError):
        JobRecord.from_dict({**stored, "state": "PAUSED"})  # not a state this version knows


def test_held_by_is_the_running_unended_latest_attempt_of_that_trainer() -> None:
    record = _record(attempts=[Attempt(1, "a", NOW.isoformat(), NOW.isoformat(), "lost"),
                               Attempt(2, "b", NOW.isoformat())])
    assert record.attempt == 2
    assert record.held_by("b", 2)
    assert not record.held_by("a", 1)       # an older attempt: fenced
    assert not record.held_by("a", 2)       # the right number, another trainer
    assert not record.held_by("b", 1)
    record.state = JobState.QUEUED
    assert not record.held_by("b", 2)       # not running: nobody holds it
    assert not _record().held_by("b", 0)    # no attempts at all


def test_end_attempt_ends_only_the_running_attempt_once() -> None:
    record = _record(attempts=[Attempt(1, "a", NOW.isoformat())])
    record.end_attempt("lost", "t1")
    assert (record.attempts[0].outcome, record.attempts[0].ended_at) == ("lost", "t1")
    record.end_attempt("FAILED", "t2")      # already ended: the first outcome stands
    assert (record.attempts[0].outcome, record.attempts[0].ended_at) == ("lost", "t1")
    assert not record.held_by("a", 1)
    empty = _record()
    empty.end_attempt("lost", "t3")         # no attempt: nothing to end, no error
    assert empty.attempts == []


def test_lost_attempts_counts_only_lost_ones() -> None:
    outcomes = ["lost", "released", "lost", ""]
    record = _record(attempts=[Attempt(n, "t", NOW.isoformat(), outcome=o)
                               for n, o in enumerate(outcomes, 1)])
    assert record.lost_attempts == 2 and record.attempt == 4


@pytest.mark.parametrize(("stamp", "expected"), [
    ((NOW - timedelta(seconds=30)).isoformat(), 30.0),
    ((NOW - timedelta(seconds=5)).replace(tzinfo=None).isoformat(), 5.0),  # naive: UTC
    ((NOW + timedelta(seconds=2)).isoformat(), -2.0),  # another host's clock ahead
])
def test_age_s_of_a_readable_time(stamp: str, expected: float) -> None:
    assert age_s(stamp, NOW) == pytest.approx(expected)


@pytest.mark.parametrize("stamp", ["", "yesterday", None])
def test_age_s_of_an_unreadable_time_is_infinite(stamp: object) -> None:
    assert age_s(stamp, NOW) == math.inf  # type: ignore[arg-type]
