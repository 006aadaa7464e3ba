"""The promotion gate's settings: what a job asks of its candidate, and how far a request may move
the server's defaults. The job runner checks requests with these; the training pipeline's gate
(convserve.training.gate) applies them. Standard library only.
"""

from __future__ import annotations

import argparse
import dataclasses
from dataclasses import dataclass
from typing import Any

from convserve.contracts.errors import ConfigError


@dataclass(frozen=True)
class GatePolicy:
    min_accuracy: float = 0.5
    min_improvement: float = 0.0      # 0: never promote a regression; ties are promoted
    max_class_recall_drop: float | None = None
    allow_class_change: bool = False

    def __post_init__(self) -> None:
        _in_range("min_accuracy", self.min_accuracy, 0.0, 1.0)
        _in_range("min_improvement", self.min_improvement, -1.0, 1.0)
        if self.max_class_recall_drop is not None:
            _in_range("max_class_recall_drop", self.max_class_recall_drop, 0.0, 1.0)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass(frozen=True)
class GateBounds:
    """How far a single request may move the server's gate: never below these floors."""

    min_accuracy_floor: float = 0.0
    min_improvement_floor: float = 0.0
    allow_class_change: bool = True

    def apply(self, defaults: GatePolicy, overrides: dict[str, Any]) -> GatePolicy:
        """The server's defaults with a request's overrides, refused outside the bounds."""
        unknown = set(overrides) - {f.name for f in dataclasses.fields(GatePolicy)}
        if unknown:
            raise ConfigError(f"unknown gate settings {sorted(unknown)}")
        policy = dataclasses.replace(defaults, **overrides)
        if policy.min_accuracy < self.min_accuracy_floor:
            raise ConfigError(f"min_accuracy={policy.min_accuracy} is below this server's "
                              f"floor {self.min_accuracy_floor}")
        if policy.min_improvement < self.min_improvement_floor:
            raise ConfigError(f"min_improvement={policy.min_improvement} is below this "
                              f"server's floor {self.min_improvement_floor}")
        if policy.allow_class_change and not self.allow_class_change:
            raise ConfigError("this server does not allow a request to change the classes")
        return policy


def _in_range(name: str, value: float, low: float, high: float) -> None:
    if not low <= value <= high:
        raise ConfigError(f"{name}={value} is out of range: expected {low}..{high}")


# The gate's flags, for the offline CLI (defaults: a GatePolicy) and the remote CLI (None: absent
# flags leave the server's defaults).
_GATE_HELP = {
    "min_accuracy": "lowest validation accuracy a candidate may have",
    "min_improvement": "accuracy the candidate must gain over the champion (0: never promote a "
                       "regression)",
    "max_class_recall_drop": "refuse a candidate whose recall of any class falls more than this "
                             "below the champion's (default: not checked)",
}


def add_gate_arguments(parser: argparse._ActionsContainer, defaults: GatePolicy | None) -> None:
    for name, help in _GATE_HELP.items():
        default = getattr(defaults, name) if defaults is not None else None
        shown = f" (default: {default})" if default is not None else ""
        parser.add_argument("--" + name.replace("_", "-"), type=float, default=default,
                            help=help + shown)
    parser.add_argument("--allow-class-change", action="store_true",
                        help="let a candidate with other classes than the champion replace it")


def gate_overrides_of(args: argparse.Namespace) -> dict[str, Any]:
    """The gate flags given on a command line (absent ones left out)."""
    given = {name: getattr(args, name) for name in _GATE_HELP if getattr(args, name) is not None}
    return given | ({"allow_class_change": True} if args.allow_class_change else {})


def gate_policy_of(args: argparse.Namespace) -> GatePolicy:
    return GatePolicy(**gate_overrides_of(args))
