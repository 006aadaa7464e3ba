"""The validation-accuracy gate: its rules alone, then with real ONNX models in a real store."""

from __future__ import annotations

import json
import os
import subprocess
import tempfile
from pathlib import Path

import numpy as np
import pytest

from convserve.contracts.errors import ConfigError
from convserve.contracts.gate_policy import GateBounds, GatePolicy
from convserve.contracts.model_card import GateDecision
from convserve.store.base import ModelStore
from convserve.store.directory import DirectoryStore
from convserve.training import gate
from convserve.training.data import load_dataset
from convserve.training.export import ParityReport
from convserve.training.metrics import validation_metrics
from convserve.training.onnx_eval import OnnxClassifier
from tests.barrier import release_when_ready
from tests.conftest import SMALL_SYNTHETIC, python_env

PASSED = ParityReport(images=10, max_abs_diff=1e-7, argmax_equal=True, tolerance=1e-5)
NAMES = ("a", "b", "c")


def _metrics(correct_per_class: list[int], per_class: int = 10):
    """Validation metrics where class i has correct_per_class[i] of `per_class` right."""
    labels, predicted = [], []
    for index, correct in enumerate(correct_per_class):
        labels += [index] * per_class
        predicted += [index] * correct + [(index + 1) % len(correct_per_class)] * (per_class - correct)
    return validation_metrics(np.array(predicted), np.array(labels), NAMES)


def _champion(correct: list[int], classes=NAMES, version: int = 1) -> gate.Champion:
    return gate.Champion(version=version, classes=classes,
                         metrics=_metrics(correct) if classes == NAMES else None)


# --- the rules -------------------------------------------------------------------------------

def test_first_model_is_promoted_when_it_clears_min_accuracy() -> None:
    decision = gate.evaluate(GatePolicy(min_accuracy=0.7), PASSED, NAMES, _metrics([8, 8, 8]),
                             None)
    assert decision.promoted and "first model" in decision.reason


def test_first_model_below_min_accuracy_is_rejected() -> None:
    decision = gate.evaluate(GatePolicy(min_accuracy=0.9), PASSED, NAMES, _metrics([8, 8, 8]),
                             None)
    assert not decision.promoted and "below min_accuracy 0.9000" in decision.reason


def test_a_regression_is_rejected_and_a_tie_or_gain_promoted() -> None:
    policy = GatePolicy(min_accuracy=0.0)
    worse = gate.evaluate(policy, PASSED, NAMES, _metrics([8, 8, 7]), _champion([8, 8, 8]))
    assert not worse.promoted and "does not reach champion v1's 0.8000" in worse.reason
    assert worse.champion_accuracy == pytest.approx(0.8)
    tie = gate.evaluate(policy, PASSED, NAMES, _metrics([8, 8, 8]), _champion([8, 8, 8]))
    assert tie.promoted
    needs_gain = gate.evaluate(GatePolicy(min_accuracy=0.0, min_improvement=0.05), PASSED,
                               NAMES, _metrics([8, 8, 9]), _champion([8, 8, 8]))
    assert not needs_gain.promoted and needs_gain.required_accuracy == pytest.approx(0.85)


def test_a_bar_above_one_is_called_unreachable() -> None:
    perfect = _champion([10, 10, 10])  # accuracy 1.0: no candidate can beat it by 0.05
    decision = gate.evaluate(GatePolicy(min_accuracy=0.0, min_improvement=0.05), PASSED, NAMES,
                             _metrics([10, 10, 10]), perfect)
    assert not decision.promoted and "the bar is unreachable" in decision.reason
    assert "= 1.0500 > 1; lower min_improvement" in decision.reason


def test_class_change_is_refused_unless_allowed() -> None:
    other = _champion([9, 9, 9], classes=("x", "y"))
    refused = gate.evaluate(GatePolicy(min_accuracy=0.0), PASSED, NAMES, _metrics([8, 8, 8]),
                            other)
    assert not refused.promoted and "differ from champion v1" in refused.reason
    allowed = gate.evaluate(GatePolicy(min_accuracy=0.0, allow_class_change=True), PASSED,
                            NAMES, _metrics([8, 8, 8]), other)
    assert allowed.promoted and "class change allowed" in allowed.reason


def test_per_class_recall_drop_is_checked_when_asked() -> None:
    # Same overall accuracy, but class "a" loses 3 of 10 to gains elsewhere.
    champion, candidate = _champion([9, 6, 6]), _metrics([6, 8, 7])
    assert gate.evaluate(GatePolicy(min_accuracy=0.0), PASSED, NAMES, candidate,
                         champion).promoted
    strict = gate.evaluate(GatePolicy(min_accuracy=0.0, max_class_recall_drop=0.2), PASSED,
                           NAMES, candidate, champion)
    assert not strict.promoted and "a -0.300" in strict.reason
    assert strict.class_recall_drops["a"] == pytest.approx(0.3)


def test_failed_parity_is_rejected_whatever_the_accuracy() -> None:
    failed = ParityReport(images=10, max_abs_diff=0.2, argmax_equal=False, tolerance=1e-5)
    decision = gate.evaluate(GatePolicy(), failed, NAMES, _metrics([10, 10, 10]), None)
    assert not decision.promoted and "parity" in decision.reason
    assert decision.to_dict()["parity_passed"] is False


def test_policy_ranges_and_server_bounds() -> None:
    with pytest.raises(ConfigError, match="min_accuracy"):
        GatePolicy(min_accuracy=1.2)
    bounds = GateBounds(min_accuracy_floor=0.5, allow_class_change=False)
    defaults = GatePolicy(min_accuracy=0.6)
    assert bounds.apply(defaults, {"min_accuracy": 0.9}).min_accuracy == 0.9
    with pytest.raises(ConfigError, match="below this server's floor 0.5"):
        bounds.apply(defaults, {"min_accuracy": 0.1})
    with pytest.raises(ConfigError, match="does not allow"):
        bounds.apply(defaults, {"allow_class_change": True})
    with pytest.raises(ConfigError, match="unknown"):
        bounds.apply(defaults, {"min_acc": 0.9})


# --- real ONNX models, a real store ------------------------------------------------------------

@pytest.fixture(scope="module")
def val_split():
    data = load_dataset(SMALL_SYNTHETIC, Path("unused"), seed=3)  # small_run's split
    return data.classes, data.val_images, data.val_labels


@pytest.fixture(scope="module")
def models(onnx_models):
    return onnx_models


def _publish(store: ModelStore, model: Path, val_split, **policy):
    classes, images, labels = val_split
    classifier = OnnxClassifier(model)
    candidate = classifier.score(images, labels) if classifier.classes == classes else \
        validation_metrics(np.zeros(len(labels), dtype=int), np.zeros(len(labels), dtype=int),
                           classifier.classes)
    decide = gate.decide_against(store, GatePolicy(**policy), PASSED, classifier.classes,
                                 candidate, images, labels)
    return store.publish(model, {"metrics": {"onnx_val_accuracy": candidate.accuracy}}, decide,
                         actor="job:test")


def test_store_promotes_better_and_rejects_worse_models(tmp_path, models, val_split) -> None:
    store = DirectoryStore(tmp_path)
    first = _publish(store, models["bad"], val_split, min_accuracy=0.0)
    assert first.promoted and first.version == 1 and store.promoted_version() == 1
    better = _publish(store, models["good"], val_split, min_accuracy=0.0)
    assert better.promoted and better.version == 2 and better.previous == 1
    assert better.decision.champion_accuracy < better.decision.candidate_accuracy
    worse = _publish(store, models["bad"], val_split, min_accuracy=0.0)
    assert not worse.promoted and worse.version is None
    assert "does not reach champion v2" in worse.decision.reason
    assert store.promoted_version() == 2 and store.versions() == [1, 2]
    assert store.card(2)["gate"]["promoted"] is True


def test_first_model_under_min_accuracy_gets_no_version(tmp_path, models, val_split) -> None:
    store = DirectoryStore(tmp_path)
    result = _publish(store, models["bad"], val_split, min_accuracy=0.5)
    assert not result.promoted and "below min_accuracy" in result.decision.reason
    assert store.versions() == [] and store.promoted_version() is None


def test_store_refuses_a_class_change_unless_allowed(tmp_path, models, val_split) -> None:
    store = DirectoryStore(tmp_path)
    _publish(store, models["good"], val_split, min_accuracy=0.0)
    refused = _publish(store, models["other"], val_split, min_accuracy=0.0)
    assert not refused.promoted and "differ from champion v1" in refused.decision.reason
    allowed = _publish(store, models["other"], val_split, min_accuracy=0.0, allow_class_change=True)
    assert allowed.promoted and store.promoted_version() == 2


def test_a_corrupted_champion_is_not_scored_and_blocks_promotion(tmp_path, models,
                                                                 val_split) -> None:
    store = DirectoryStore(tmp_path)
    _publish(store, models["bad"], val_split, min_accuracy=0.0)
    path = store.model_path(1)
    os.chmod(path, 0o644)
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    result = _publish(store, models["good"], val_split, min_accuracy=0.0)
    assert not result.promoted and "cannot score champion v1" in result.decision.reason
    assert "sha256" in result.decision.reason
    assert store.promoted_version() == 1


def test_concurrent_jobs_are_serialised_and_the_better_model_wins(tmp_path, models, python,
                                                                  repo_root) -> None:
    """Two processes gate and publish at once: whoever goes second is judged against the first."""
    barrier = Path(tempfile.mkdtemp(prefix="barrier-", dir=tmp_path.parent))
    workers = [subprocess.Popen([python, str(repo_root / "tests" / "gate_worker.py"),
                                 str(tmp_path), str(models[name]), "--barrier", str(barrier)],
                                env=python_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                text=True) for name in ("bad", "good")]
    release_when_ready(barrier, len(workers))
    results = {}
    for name, worker in zip(("bad", "good"), workers, strict=True):
        out, err = worker.communicate(timeout=120)
        assert worker.returncode == 0, err
        results[name] = json.loads(out)
    store = DirectoryStore(tmp_path)
    assert store.card(store.promoted_version())["metrics"]["onnx_val_accuracy"] == \
        results["good"]["decision"]["candidate_accuracy"]
    # The good model was promoted; the bad one either went first (and was then beaten) or went
    # second and was judged against the good one: never against a stale empty store.
    assert results["good"]["promoted"]
    if results["bad"]["promoted"]:
        assert results["good"]["previous"] == results["bad"]["version"]
    else:
        assert results["bad"]["decision"]["champion_version"] == results["good"]["version"]
    assert len(store.versions()) == 1 + results["bad"]["promoted"]


def _champion_claiming(store: ModelStore, model: Path, accuracy: float, recall: float) -> int:
    """Publish `model` as the champion with a card whose numbers are made up: a gate that read
    them instead of re-scoring the file would decide differently."""
    card = {"metrics": {"onnx_val_accuracy": accuracy, "accuracy": accuracy,
                        "per_class_recall": {str(i): recall for i in range(10)}}}
    result = store.publish(model, card, lambda _: GateDecision(True, ("test",)),
                           actor="test")
    assert result.version is not None
    return result.version


@pytest.mark.parametrize("champion_name, claimed, candidate_name, promoted", [
    ("good", 0.0, "bad", False),   # the card undersells a strong champion: still rejected
    ("bad", 1.0, "good", True),    # the card oversells a weak champion: still promoted
], ids=["card-undersells", "card-oversells"])
def test_the_champion_is_rescored_on_the_candidates_split_not_read_from_its_card(
        tmp_path, models, val_split, champion_name: str, claimed: float, candidate_name: str,
        promoted: bool) -> None:
    classes, images, labels = val_split
    store = DirectoryStore(tmp_path)
    _champion_claiming(store, models[champion_name], accuracy=claimed, recall=claimed)
    rescored = OnnxClassifier(models[champion_name]).score(images, labels).accuracy
    candidate = OnnxClassifier(models[candidate_name]).score(images, labels).accuracy
    # The card's number and the re-scored one give opposite verdicts, each by several images.
    assert (candidate >= rescored) is promoted and (candidate >= claimed) is not promoted
    assert min(abs(candidate - rescored), abs(candidate - claimed)) > 4 / len(labels)

    result = _publish(store, models[candidate_name], val_split, min_accuracy=0.0)
    assert result.promoted is promoted, result.decision.reason
    assert result.decision.champion_accuracy == pytest.approx(rescored)


def test_the_per_class_recall_floor_uses_the_rescored_champion(tmp_path, models, val_split
                                                                ) -> None:
    """The champion's card claims zero recall everywhere, so no candidate could drop below it;
    re-scored, the strong champion's recall is high and the weak candidate drops far below."""
    store = DirectoryStore(tmp_path)
    _champion_claiming(store, models["good"], accuracy=0.0, recall=0.0)
    result = _publish(store, models["bad"], val_split, min_accuracy=0.0, min_improvement=-1.0,
                      max_class_recall_drop=0.2)
    assert not result.promoted
    assert max(result.decision.class_recall_drops.values()) > 0.2
    assert "recall" in result.decision.reason
