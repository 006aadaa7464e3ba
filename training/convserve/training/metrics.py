"""Classification metrics on the validation split, computed with boolean masks as the seeds describe.

numpy only, so the same functions score torch predictions (after `.cpu().numpy()`) and ONNX
Runtime outputs, and the gate compares like with like.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np


@dataclass(frozen=True)
class ClassMetrics:
    name: str
    support: int  # validation images whose true class this is
    precision: float
    recall: float


@dataclass(frozen=True)
class ValidationMetrics:
    accuracy: float
    per_class: tuple[ClassMetrics, ...]
    confusion: np.ndarray  # [true class, predicted class] counts

    def to_dict(self) -> dict[str, Any]:
        return {
            "accuracy": self.accuracy,
            "per_class": [vars(c) for c in self.per_class],
            "confusion_matrix": self.confusion.tolist(),
        }

    def recall_by_class(self) -> dict[str, float]:
        return {c.name: c.recall for c in self.per_class}


def accuracy(predicted: np.ndarray, labels: np.ndarray) -> float:
    _check_pair(predicted, labels)
    return float(np.mean(predicted == labels))


def confusion_matrix(predicted: np.ndarray, labels: np.ndarray, num_classes: int) -> np.ndarray:
    _check_pair(predicted, labels)
    # One bincount over flat (true, predicted) indices: no Python loop over images.
    flat = labels.astype(np.int64) * num_classes + predicted.astype(np.int64)
    return np.bincount(flat, minlength=num_classes * num_classes).reshape(num_classes, num_classes)


def per_class_metrics(predicted: np.ndarray, labels: np.ndarray,
                      class_names: Sequence[str]) -> tuple[ClassMetrics, ...]:
    """Precision and recall per class with the seeds' positive/negative masks.

    A class never predicted has precision 0 (not NaN) and one absent from the split recall 0, so
    cards stay valid JSON and a gate comparing recalls never meets NaN.
    """
    _check_pair(predicted, labels)
    out = []
    for index, name in enumerate(class_names):
        positive = labels == index        # images that truly are this class
        predicted_positive = predicted == index
        true_positive = int(np.count_nonzero(positive & predicted_positive))
        support = int(np.count_nonzero(positive))
        n_predicted = int(np.count_nonzero(predicted_positive))
        out.append(ClassMetrics(
            name=name,
            support=support,
            precision=true_positive / n_predicted if n_predicted else 0.0,
            recall=true_positive / support if support else 0.0,
        ))
    return tuple(out)


def validation_metrics(predicted: np.ndarray, labels: np.ndarray,
                       class_names: Sequence[str]) -> ValidationMetrics:
    return ValidationMetrics(
        accuracy=accuracy(predicted, labels),
        per_class=per_class_metrics(predicted, labels, class_names),
        confusion=confusion_matrix(predicted, labels, len(class_names)),
    )


def _check_pair(predicted: np.ndarray, labels: np.ndarray) -> None:
    if predicted.shape != labels.shape or predicted.ndim != 1:
        raise ValueError(f"need two 1-D label arrays of one length, got {predicted.shape} and "
                         f"{labels.shape}")
    if labels.size == 0:
        raise ValueError("cannot score an empty validation split")
