"""A job's record, the value every job store keeps (as job.json, or as a PostgreSQL row's JSON):
its state, request, resolved gate policy, attempts and progress. Data only: the stores read and
write it (convserve.jobs.files, convserve.jobs.postgres)."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from convserve.contracts.job_state import JobState
from convserve.contracts.model_card import GateDecision
from convserve.jobs.params import TrainParams


@dataclass
class Attempt:
    """One run of a job by one trainer, from its claim to its end."""

    number: int                         # 1, 2, ...: also the claim's fencing token
    trainer: str                        # the trainer's replica id (host:pid)
    claimed_at: str
    ended_at: str = ""
    # "" while it runs; then a final JobState name, "released" (its trainer stopped and put the
    # job back in the queue) or "lost" (its trainer died: no heartbeat, or its process is gone)
    outcome: str = ""

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> Attempt:
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in values.items() if k in names})


@dataclass
class JobRecord:
    id: str
    state: JobState
    params: TrainParams
    created_at: str
    started_at: str = ""
    finished_at: str = ""
    error: str = ""
    model_version: int | None = None
    gate: GateDecision | None = None
    epoch: int = 0
    val_accuracy: float | None = None
    replica: str = ""                   # the replica that accepted the Train
    pid: int | None = None              # the running attempt's training process
    heartbeat_at: str = ""              # the running attempt's trainer, every heartbeat_s
    idempotency_key: str = ""
    resumes: int = 0                    # times it was continued after an interruption
    queued_at: str = ""                 # its place in the queue (kept when it goes back)
    trainer: str = ""                   # the trainer of the latest attempt
    attempts: list[Attempt] = field(default_factory=list)
    # The gate policy the request resolved to, against the server's defaults and bounds at
    # submit; the trainer gates with it (None: a record from before it was stored).
    gate_policy: dict[str, Any] | None = None

    @property
    def lost_attempts(self) -> int:
        return sum(a.outcome == "lost" for a in self.attempts)

    @property
    def attempt(self) -> int:
        """The latest attempt's number: the fencing token of the claim that holds the job."""
        return self.attempts[-1].number if self.attempts else 0

    def held_by(self, trainer: str, number: int) -> bool:
        """Attempt `number` of `trainer` is the one running the job now (its lease)."""
        return (self.state == JobState.RUNNING and bool(self.attempts)
                and self.attempts[-1].number == number and self.attempts[-1].trainer == trainer
                and not self.attempts[-1].outcome)

    def end_attempt(self, outcome: str, ended_at: str) -> None:
        """The running attempt ends (a final state's name, "released" or "lost")."""
        if self.attempts and not self.attempts[-1].outcome:
            self.attempts[-1].outcome, self.attempts[-1].ended_at = outcome, ended_at

    def to_dict(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "state": self.state.value,
                "params": self.params.to_dict(), "gate": self.gate.to_dict() if self.gate else None}

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> JobRecord:
        """Unknown keys are ignored, so a replica can read records a newer one wrote."""
        names = {f.name for f in dataclasses.fields(cls)}
        known = {k: v for k, v in values.items() if k in names}
        return cls(**{**known, "state": JobState(values["state"]),
                      "gate": GateDecision.from_dict(values.get("gate")),
                      "params": TrainParams.from_dict(values["params"]),
                      "attempts": [Attempt.from_dict(a) for a in values.get("attempts") or ()]})


def age_s(iso_time: str, now: datetime) -> float:
    try:
        then = datetime.fromisoformat(iso_time)
    except (TypeError, ValueError):
        return math.inf  # unreadable: as good as no heartbeat at all
    if then.tzinfo is None:
        then = then.replace(tzinfo=UTC)
    return (now - then).total_seconds()

