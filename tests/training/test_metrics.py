"""Validation metrics by boolean masks, checked against hand-computed figures."""

import numpy as np
import pytest

from convserve.training.metrics import accuracy, confusion_matrix, per_class_metrics, validation_metrics

LABELS = np.array([0, 0, 0, 1, 1, 2, 2, 2, 2, 2])
PREDICTED = np.array([0, 1, 0, 1, 1, 2, 2, 0, 1, 2])
NAMES = ("cat", "dog", "frog")


def test_accuracy() -> None:
    assert accuracy(PREDICTED, LABELS) == pytest.approx(0.7)


def test_confusion_matrix_rows_are_true_classes() -> None:
    assert confusion_matrix(PREDICTED, LABELS, 3).tolist() == [[2, 1, 0], [0, 2, 0], [1, 1, 3]]


def test_precision_and_recall_per_class() -> None:
    by_name = {m.name: m for m in per_class_metrics(PREDICTED, LABELS, NAMES)}
    assert by_name["cat"].precision == pytest.approx(2 / 3)
    assert by_name["cat"].recall == pytest.approx(2 / 3)
    assert by_name["dog"].precision == pytest.approx(2 / 4)
    assert by_name["dog"].recall == pytest.approx(1.0)
    assert by_name["frog"].precision == pytest.approx(1.0)
    assert by_name["frog"].recall == pytest.approx(3 / 5)
    assert [m.support for m in by_name.values()] == [3, 2, 5]


def test_a_class_never_predicted_or_absent_scores_zero_not_nan() -> None:
    metrics = per_class_metrics(np.array([0, 0]), np.array([0, 0]), ("a", "b"))
    assert metrics[1].precision == 0.0 and metrics[1].recall == 0.0


def test_validation_metrics_serialise_to_json_types() -> None:
    as_dict = validation_metrics(PREDICTED, LABELS, NAMES).to_dict()
    assert as_dict["accuracy"] == pytest.approx(0.7)
    assert as_dict["confusion_matrix"][2] == [1, 1, 3]
    assert as_dict["per_class"][0]["name"] == "cat"


@pytest.mark.parametrize(("predicted", "labels"), [
    (np.array([0, 1]), np.array([0])),
    (np.array([], dtype=int), np.array([], dtype=int)),
    (np.zeros((2, 2), dtype=int), np.zeros((2, 2), dtype=int)),
])
def test_mismatched_or_empty_inputs_are_refused(predicted: np.ndarray, labels: np.ndarray) -> None:
    with pytest.raises(ValueError):
        accuracy(predicted, labels)
