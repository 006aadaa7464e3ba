"""A Train request as the job runner keeps it: the training spec's requestable settings (a
TrainConfig, checked when it is built) and the caller's gate overrides, checked here against the
server's bounds before anything is queued."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from convserve.contracts.errors import ConfigError, InvalidInput
from convserve.contracts.gate_policy import GateBounds, GatePolicy
from convserve.contracts.spec import REQUEST_SETTINGS, TrainConfig

MAX_IDEMPOTENCY_KEY = 256
_GATE_NUMBERS = ("min_accuracy", "min_improvement", "max_class_recall_drop")


@dataclass(frozen=True)
class TrainParams:
    """What a job was asked: its training settings (only the requestable ones count; the runner
    sets the server's own, such as the datasets root, when it starts the job) and gate overrides."""

    config: TrainConfig = field(default_factory=TrainConfig)
    gate: dict[str, Any] = field(default_factory=dict)  # overrides of the server's gate defaults

    @classmethod
    def of(cls, gate: dict[str, Any] | None = None, **settings: Any) -> TrainParams:
        """TrainParams.of(epochs=3, gate={...}); a bad setting raises ConfigError."""
        unknown = sorted(set(settings) - set(REQUEST_SETTINGS))
        if unknown:
            raise ConfigError(f"unknown training settings {unknown}; a request may set "
                              f"{list(REQUEST_SETTINGS)}")
        return cls(TrainConfig(**settings), dict(gate or {}))

    def validate(self, gate_defaults: GatePolicy | None = None,
                 gate_bounds: GateBounds | None = None) -> GatePolicy:
        """Check the gate overrides; returns the policy the job will be gated with."""
        if not isinstance(self.gate, dict):
            raise InvalidInput(f"gate overrides must be a mapping, got {type(self.gate).__name__}")
        for name in _GATE_NUMBERS:
            value = self.gate.get(name)
            optional = name == "max_class_recall_drop" and value is None  # None: not checked
            if name in self.gate and not optional and not _is_number(value):
                raise InvalidInput(f"gate override {name}={value!r}: expected a number")
        if not isinstance(self.gate.get("allow_class_change", False), bool):
            raise InvalidInput(f"gate override allow_class_change="
                               f"{self.gate['allow_class_change']!r}: expected true or false")
        try:
            return (gate_bounds or GateBounds()).apply(gate_defaults or GatePolicy(), self.gate)
        except ConfigError as error:
            raise InvalidInput(f"gate overrides: {error}") from None

    def to_dict(self) -> dict[str, Any]:
        return {**self.config.request_values(), "gate": dict(self.gate)}

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> TrainParams:
        """Settings this version does not know (a newer replica's) are ignored."""
        settings = {k: v for k, v in values.items() if k in REQUEST_SETTINGS}
        return cls(TrainConfig(**settings), dict(values.get("gate") or {}))


def _is_number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
