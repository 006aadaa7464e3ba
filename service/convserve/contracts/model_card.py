"""The model card and the gate decision as typed values: what crosses from the training process
(which writes card.json and its "gate" events) to the store, the job runner, the server and the
CLI. card.json stays plain JSON on disk (`ModelCard.raw`, shown whole by GetModel and `models
show`); every reader takes the fields it needs from here, read leniently once, so a card written
by an older version still serves. Standard library only."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, TypeGuard

from convserve.contracts.gate_policy import GatePolicy
from convserve.contracts.model_signature import SIGNATURE


@dataclass(frozen=True)
class GateDecision:
    """Why a candidate was promoted or rejected; `reasons` are sentences a caller can act on."""

    promoted: bool
    reasons: tuple[str, ...]
    candidate_accuracy: float = 0.0
    required_accuracy: float = 0.0
    champion_version: int | None = None
    champion_accuracy: float | None = None
    class_recall_drops: Mapping[str, float] = field(default_factory=dict)
    parity_passed: bool = False
    policy: GatePolicy | None = None

    @property
    def reason(self) -> str:
        return "; ".join(self.reasons)

    def to_dict(self) -> dict[str, Any]:
        """The form stored in the card and in "gate" events."""
        return {
            "promoted": self.promoted,
            "reason": self.reason,
            "reasons": list(self.reasons),
            "candidate_accuracy": self.candidate_accuracy,
            "required_accuracy": self.required_accuracy,
            "champion_version": self.champion_version,
            "champion_accuracy": self.champion_accuracy,
            "class_recall_drops": dict(self.class_recall_drops),
            "parity_passed": self.parity_passed,
            "policy": self.policy.to_dict() if self.policy else None,
        }

    @classmethod
    def from_dict(cls, values: object) -> GateDecision | None:
        """None when `values` is not a decision (absent, or not a JSON object)."""
        if not isinstance(values, Mapping) or not isinstance(values.get("promoted"), bool):
            return None
        reasons = values.get("reasons")
        if not isinstance(reasons, list) or not reasons:
            reasons = [values.get("reason", "")]
        drops = values.get("class_recall_drops")
        return cls(
            promoted=values["promoted"], reasons=tuple(str(r) for r in reasons),
            candidate_accuracy=_number(values.get("candidate_accuracy")) or 0.0,
            required_accuracy=_number(values.get("required_accuracy")) or 0.0,
            champion_version=_integer(values.get("champion_version")),
            champion_accuracy=_number(values.get("champion_accuracy")),
            class_recall_drops={str(k): v for k, v in drops.items() if _number(v) is not None}
            if isinstance(drops, Mapping) else {},
            parity_passed=values.get("parity_passed") is True,
            policy=_policy(values.get("policy")))


@dataclass(frozen=True)
class InputSpec:
    """The card's `input`: what its model takes. A field absent or of the wrong type reads as the
    model signature's (an older card still serves)."""

    name: str = SIGNATURE.input_name
    dtype: str = SIGNATURE.input_dtype
    layout: str = SIGNATURE.layout
    shape: tuple[int, ...] = SIGNATURE.input_shape

    @classmethod
    def from_dict(cls, spec: Mapping[str, Any]) -> InputSpec:
        shape = spec.get("shape")
        return cls(name=_text(spec.get("name"), cls.name), dtype=_text(spec.get("dtype"), cls.dtype),
                   layout=_text(spec.get("layout"), cls.layout),
                   shape=tuple(shape) if isinstance(shape, list) and all(
                       _integer(d) is not None for d in shape) else cls.shape)


@dataclass(frozen=True)
class ModelCard:
    """A published version's card: the fields convserve reads, and the whole JSON object."""

    raw: Mapping[str, Any]
    version: int | None = None
    classes: tuple[str, ...] = ()
    input: InputSpec = InputSpec()
    dataset: str = ""
    created_at: str = ""
    sha256: str = ""
    job_id: str | None = None
    val_accuracy: float | None = None       # ONNX Runtime's, on the validation split
    gate: GateDecision | None = None

    @classmethod
    def from_dict(cls, card: Mapping[str, Any]) -> ModelCard:
        spec, dataset, metrics = (_mapping(card.get(key)) for key in ("input", "dataset", "metrics"))
        classes = card.get("classes")
        return cls(
            raw=card, version=_integer(card.get("version")),
            classes=tuple(classes) if _strings(classes) else (),
            input=InputSpec.from_dict(spec),
            dataset=_text(dataset.get("name")), created_at=_text(card.get("created_at")),
            sha256=_text(card.get("sha256")), job_id=_text(card.get("job_id")) or None,
            val_accuracy=_number(metrics.get("onnx_val_accuracy")),
            gate=GateDecision.from_dict(card.get("gate")))


def _mapping(value: object) -> Mapping[str, Any]:
    return value if isinstance(value, Mapping) else {}


def _text(value: object, default: str = "") -> str:
    return value if isinstance(value, str) else default


def _strings(value: object) -> TypeGuard[list[str]]:
    return isinstance(value, list) and all(isinstance(v, str) for v in value)


def _number(value: object) -> float | None:
    return float(value) if isinstance(value, int | float) and not isinstance(value, bool) else None


def _integer(value: object) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def _policy(value: object) -> GatePolicy | None:
    try:
        return GatePolicy(**value) if isinstance(value, Mapping) else None
    except (TypeError, ValueError):  # a policy this version does not know
        return None
