"""The validation-accuracy gate: may this candidate replace the model being served?

It judges the exported ONNX file as ONNX Runtime scores it on the held-out validation split: the
artifact that will be served, not the torch module that made it. The champion is re-scored on the
same split, so the comparison stays fair when the data changes between jobs. Rules, in order:

1. the export's parity check passed;
2. candidate accuracy >= min_accuracy;
3. with a champion: candidate accuracy >= champion accuracy + min_improvement, on the same split;
   a candidate whose classes differ from the champion's is refused unless the request allows a
   class change (then rule 3 is skipped: label indices no longer mean the same classes);
4. optionally, no class's recall falls more than max_class_recall_drop below the champion's.

`decide_against` runs inside `ModelStore.publish`, under the store's lock, so the champion it
compares with is the one actually being replaced.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from convserve.contracts.errors import StoreError
from convserve.contracts.gate_policy import GatePolicy
from convserve.contracts.model_card import GateDecision
from convserve.store.base import ModelStore
from convserve.training.metrics import ValidationMetrics
from convserve.training.onnx_eval import OnnxClassifier

if TYPE_CHECKING:  # convserve.training.export imports torch; the gate itself needs none
    from convserve.training.export import ParityReport


@dataclass(frozen=True)
class Champion:
    version: int
    classes: tuple[str, ...]
    metrics: ValidationMetrics | None  # None when the classes differ: not comparable


def evaluate(policy: GatePolicy, parity: ParityReport, classes: tuple[str, ...],
             candidate: ValidationMetrics, champion: Champion | None) -> GateDecision:
    """Apply the rules; every failed rule contributes a reason a caller can act on."""
    failures: list[str] = []
    if not parity.passed:
        failures.append(f"export parity check failed (max |diff| {parity.max_abs_diff:.3g} > "
                        f"{parity.tolerance:g} or argmax differs)")
    required = policy.min_accuracy
    if candidate.accuracy < policy.min_accuracy:
        failures.append(f"accuracy {candidate.accuracy:.4f} is below min_accuracy "
                        f"{policy.min_accuracy:.4f}")
    drops: dict[str, float] = {}
    if champion is not None and champion.classes != classes and not policy.allow_class_change:
        failures.append(f"classes {list(classes)} differ from champion v{champion.version}'s "
                        f"{list(champion.classes)}; allow a class change to replace it")
    elif champion is not None and champion.metrics is not None:
        needed = champion.metrics.accuracy + policy.min_improvement
        required = max(required, needed)
        if needed > 1.0:  # no candidate can pass: say so, not merely "does not reach"
            failures.append(f"the bar is unreachable: champion v{champion.version}'s accuracy "
                            f"{champion.metrics.accuracy:.4f} + min_improvement "
                            f"{policy.min_improvement:.4f} = {needed:.4f} > 1; lower "
                            "min_improvement to promote anything")
        elif candidate.accuracy < needed:
            failures.append(f"accuracy {candidate.accuracy:.4f} does not reach champion "
                            f"v{champion.version}'s {champion.metrics.accuracy:.4f} + "
                            f"min_improvement {policy.min_improvement:.4f}")
        drops = recall_drops(candidate, champion.metrics)
        limit = policy.max_class_recall_drop
        worse = {name: drop for name, drop in drops.items() if limit is not None and drop > limit}
        if worse:
            listed = ", ".join(f"{name} -{drop:.3f}" for name, drop in sorted(worse.items()))
            failures.append(f"recall fell more than max_class_recall_drop {limit:.3f} for: {listed}")
    promoted = not failures
    reasons = failures or [_why_promoted(candidate, champion)]
    return GateDecision(
        promoted=promoted, reasons=tuple(reasons), candidate_accuracy=candidate.accuracy,
        required_accuracy=required, champion_version=champion.version if champion else None,
        champion_accuracy=champion.metrics.accuracy if champion and champion.metrics else None,
        class_recall_drops=drops, parity_passed=parity.passed, policy=policy)


def recall_drops(candidate: ValidationMetrics, champion: ValidationMetrics) -> dict[str, float]:
    """Per class, how much recall the candidate loses against the champion (negative: gains)."""
    before = champion.recall_by_class()
    return {name: round(before[name] - recall, 6)
            for name, recall in candidate.recall_by_class().items() if name in before}


def score_champion(store: ModelStore, version: int, classes: tuple[str, ...],
                   images: np.ndarray, labels: np.ndarray) -> Champion:
    """Re-score the champion's served file on the candidate's validation split.

    `store.verify` first: a champion whose file no longer matches its card is not scored (it
    raises, and the caller rejects the candidate rather than compare against a corrupt file).
    """
    champion = OnnxClassifier(store.open_version(version).path)
    metrics = champion.score(images, labels) if champion.classes == classes else None
    return Champion(version=version, classes=champion.classes, metrics=metrics)


def decide_against(store: ModelStore, policy: GatePolicy, parity: ParityReport,
                   classes: tuple[str, ...], candidate: ValidationMetrics, images: np.ndarray,
                   labels: np.ndarray) -> Callable[[int | None], GateDecision]:
    """The `decide` callback for `ModelStore.publish`: gate against whatever the champion is."""

    def decide(champion_version: int | None) -> GateDecision:
        champion = None
        if champion_version is not None:
            try:
                champion = score_champion(store, champion_version, classes, images, labels)
            except StoreError as error:
                return GateDecision(
                    promoted=False, reasons=(f"cannot score champion v{champion_version}: "
                                             f"{error}; an operator must promote a sound version "
                                             "first",),
                    candidate_accuracy=candidate.accuracy, champion_version=champion_version,
                    parity_passed=parity.passed, policy=policy)
        return evaluate(policy, parity, classes, candidate, champion)

    return decide


def _why_promoted(candidate: ValidationMetrics, champion: Champion | None) -> str:
    if champion is None:
        return f"first model: accuracy {candidate.accuracy:.4f} clears min_accuracy"
    if champion.metrics is None:
        return (f"class change allowed: replaces v{champion.version}; accuracy "
                f"{candidate.accuracy:.4f} clears min_accuracy")
    return (f"accuracy {candidate.accuracy:.4f} >= champion v{champion.version}'s "
            f"{champion.metrics.accuracy:.4f} + min_improvement")
