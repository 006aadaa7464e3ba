"""A Train request's parameters and their checks: what the job runner accepts before anything is
queued (the training process's own TrainConfig checks the rest)."""

from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass, field
from typing import Any

from convserve.contracts.gate_policy import GateBounds, GateConfigError, GatePolicy
from convserve.contracts.spec import AUGMENT_MODES, SCHEDULES, TrainConfig
from convserve.errors import InvalidInput

MAX_IDEMPOTENCY_KEY = 256
MAX_BATCH_SIZE = 4096
MAX_SEED = 2**32 - 1  # the child derives per-epoch seeds as seed * 1_000_003 + epoch (< 2**64)
DATASET_RE = re.compile(r"digits|cifar10|synthetic(:[0-9]{1,9})?|folder:[A-Za-z0-9._/-]{1,200}")
DATASET_FORMS = "digits, cifar10, synthetic, synthetic:<n>, folder:<relative path>"
_GATE_NUMBERS = ("min_accuracy", "min_improvement", "max_class_recall_drop")


@dataclass(frozen=True)
class TrainParams:
    """A Train request's parameters (the servicer maps the proto's zeros to defaults)."""

    dataset: str = "digits"
    epochs: int = 10
    batch_size: int = 64
    lr: float = 1e-3
    seed: int = 0
    val_fraction: float = 0.2
    gate: dict[str, Any] = field(default_factory=dict)  # overrides of the server's gate defaults
    augment: str = TrainConfig.augment
    schedule: str = TrainConfig.schedule
    label_smoothing: float = TrainConfig.label_smoothing
    weight_decay: float = TrainConfig.weight_decay

    def validate(self, max_epochs: int = 200, gate_defaults: GatePolicy | None = None,
                 gate_bounds: GateBounds | None = None) -> GatePolicy:
        """Refuse what the child would refuse (or should never see); returns the gate policy."""
        if (not isinstance(self.dataset, str) or not DATASET_RE.fullmatch(self.dataset)
                or ".." in self.dataset.split("/") or self.dataset.startswith("folder:/")):
            raise InvalidInput(f"unknown dataset {self.dataset!r}: expected one of {DATASET_FORMS}")
        _check_int("epochs", self.epochs, 1, max_epochs)
        _check_int("batch_size", self.batch_size, 1, MAX_BATCH_SIZE)
        _check_int("seed", self.seed, 0, MAX_SEED)
        _check_number("lr", self.lr, 0 < _num(self.lr) <= 1, "a number in (0, 1]")
        _check_number("val_fraction", self.val_fraction, 0 < _num(self.val_fraction) < 1,
                      "a number in (0, 1)")
        if self.augment not in AUGMENT_MODES:
            raise InvalidInput(f"augment={self.augment!r}: expected one of {list(AUGMENT_MODES)}")
        if self.schedule not in SCHEDULES:
            raise InvalidInput(f"schedule={self.schedule!r}: expected one of {list(SCHEDULES)}")
        _check_number("label_smoothing", self.label_smoothing,
                      0 <= _num(self.label_smoothing) < 1, "a number in [0, 1)")
        _check_number("weight_decay", self.weight_decay, 0 <= _num(self.weight_decay) <= 1,
                      "a number in [0, 1]")
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
        except GateConfigError as error:
            raise InvalidInput(f"gate overrides: {error}") from None

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> TrainParams:
        return cls(**known_fields(cls, values))


def known_fields(cls: type, values: dict[str, Any]) -> dict[str, Any]:
    names = {f.name for f in dataclasses.fields(cls)}
    return {k: v for k, v in values.items() if k in names}


def _is_number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def _num(value: object) -> float:
    return float(value) if _is_number(value) else math.nan  # type: ignore[arg-type]


def _check_int(name: str, value: object, low: int, high: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise InvalidInput(f"{name}={value!r} is out of range: expected an integer in "
                           f"{low}..{high}")


def _check_number(name: str, value: object, ok: bool, expected: str) -> None:
    if not ok:
        raise InvalidInput(f"{name}={value!r} is out of range: expected {expected}")

