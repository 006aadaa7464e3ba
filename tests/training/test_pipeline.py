"""One run from configuration to a card (convserve.training.pipeline): what the session's real
2-epoch run (`small_run`) wrote, and the gate-and-publish step on its candidate, against a
real model store: fenced, parity-failed, rejected and promoted."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import onnx
import pytest

from convserve.contracts.errors import ClaimLost
from convserve.contracts.gate_policy import GatePolicy
from convserve.contracts.model_metadata import read_metadata
from convserve.store.base import ModelStore, PublishResult
from convserve.store.directory import DirectoryStore
from convserve.store.job_dir import read_events
from convserve.training.data import Dataset, load_dataset
from convserve.training.export import INPUT_NAME, OUTPUT_NAME, ParityReport
from convserve.training.pipeline import Publication, RunOutcome, gate_and_publish
from tests.conftest import SMALL_SYNTHETIC


@pytest.fixture(scope="module")
def data() -> Dataset:
    """The small run's data, as its config loaded it (seed 3)."""
    return load_dataset(SMALL_SYNTHETIC, Path("unused"), seed=3)


def _publish(run: RunOutcome, data: Dataset, store: ModelStore, *,
             fence: Callable[[], None] | None = None, policy: GatePolicy | None = None,
             parity: ParityReport | None = None) -> PublishResult:
    publication = Publication(store, policy or GatePolicy(min_accuracy=0.0), actor="job:j1",
                              job_id="j1", fence=fence)
    return gate_and_publish(publication, run.model_path, run.card, parity or run.parity,
                            run.onnx_validation, data)


# --- what a run writes -------------------------------------------------------------------------


def test_the_card_says_what_the_model_is_and_how_good(small_run: RunOutcome) -> None:
    card, classes = small_run.card, small_run.card["classes"]
    assert small_run.published is None  # no store: nothing gated
    assert json.loads((small_run.run_dir / "card.json").read_text()) == card
    assert len(classes) == 10 and card["model_file"] == "model.onnx"
    assert card["input"] == {"name": INPUT_NAME, "dtype": "uint8", "layout": "NHWC",
                             "shape": [-1, 32, 32, 3], "channel_order": "RGB"}
    assert card["output"]["name"] == OUTPUT_NAME and card["output"]["shape"] == [-1, 10]
    assert len(card["normalization"]["mean"]) == len(card["normalization"]["std"]) == 3
    assert card["dataset"]["name"] == SMALL_SYNTHETIC
    assert card["training_config"]["epochs"] == 2 and card["training_config"]["seed"] == 3
    metrics = card["metrics"]
    assert metrics["onnx_val_accuracy"] == small_run.onnx_validation.accuracy
    assert metrics["val_images"] == 128 and len(metrics["confusion_matrix"]) == 10
    assert set(metrics) >= {"torch_val_accuracy", "train_accuracy", "per_class"}
    training = card["training"]
    assert training["epochs"] == 2 and training["compiled"] is False
    assert len(training["validation_accuracy_per_epoch"]) == 2
    assert card["parity"]["passed"] is True and small_run.parity.passed
    assert card["parity"]["images"] == 128


def test_the_run_directory_holds_config_log_model_and_phases(small_run: RunOutcome) -> None:
    run_dir = small_run.run_dir
    assert json.loads((run_dir / "config.json").read_text())["dataset"] == SMALL_SYNTHETIC
    assert "validation_accuracy_per_epoch" in json.loads((run_dir / "log.json").read_text())
    assert (run_dir / "checkpoints" / "last.pt").is_file()
    events = read_events(run_dir / "events.jsonl")
    states = [e["state"] for e in events if e["type"] == "state"]
    assert states == ["LOADING_DATA", "TRAINING", "EXPORTING"]  # no store: no GATING
    exported = [e for e in events if e["type"] == "exported"]
    assert len(exported) == 1 and exported[0]["parity"]["passed"] is True


def test_the_onnx_file_carries_the_metadata_the_card_starts_with(small_run: RunOutcome) -> None:
    props = {p.key: p.value for p in onnx.load(str(small_run.model_path)).metadata_props}
    metadata = read_metadata(props)
    for key in ("classes", "input", "output", "normalization", "dataset", "training_config"):
        assert metadata[key] == small_run.card[key], key
    assert metadata["output"]["meaning"] == "softmax probabilities"


# --- gate and publish --------------------------------------------------------------------------


def test_a_lost_claim_publishes_nothing(small_run: RunOutcome, data: Dataset,
                                        tmp_path: Path) -> None:
    store = DirectoryStore(tmp_path / "store")

    def lost() -> None:
        raise ClaimLost("attempt 1 of job j1 no longer holds it")

    with pytest.raises(ClaimLost):
        _publish(small_run, data, store, fence=lost)
    assert store.versions() == [] and store.promoted_version() is None


def test_a_claim_lost_while_waiting_for_the_stores_lock_publishes_nothing(
        small_run: RunOutcome, data: Dataset, tmp_path: Path) -> None:
    """The fence is checked again under the store's lock, right before the decision."""
    store, calls = DirectoryStore(tmp_path / "store"), []

    def lost_on_the_second_look() -> None:
        calls.append(1)
        if len(calls) > 1:
            raise ClaimLost("taken over meanwhile")

    with pytest.raises(ClaimLost, match="taken over meanwhile"):
        _publish(small_run, data, store, fence=lost_on_the_second_look)
    assert len(calls) == 2 and store.versions() == [] and store.history() == []


def test_a_held_claim_publishes_the_candidate_with_its_job(small_run: RunOutcome,
                                                           data: Dataset, tmp_path: Path) -> None:
    store = DirectoryStore(tmp_path / "store")
    result = _publish(small_run, data, store, fence=lambda: None)
    assert result.promoted and result.version == 1 and result.previous is None
    assert result.decision.parity_passed and result.decision.policy == GatePolicy(
        min_accuracy=0.0)
    card = store.model_card(1)
    assert card.job_id == "j1" and card.classes == tuple(small_run.card["classes"])
    assert store.promoted_version() == 1 and store.history()[-1].actor == "job:j1"


def test_a_failed_parity_is_rejected_without_touching_the_store(
        small_run: RunOutcome, data: Dataset, tmp_path: Path) -> None:
    store = DirectoryStore(tmp_path / "store")
    mismatch = ParityReport(images=128, max_abs_diff=0.5, argmax_equal=False, tolerance=1e-4)

    def never() -> None:
        raise AssertionError("a parity failure needs no fence: nothing is published")

    result = _publish(small_run, data, store, parity=mismatch, fence=never)
    assert not result.promoted and result.version is None and result.previous is None
    assert not result.decision.parity_passed
    assert "export parity check failed" in result.decision.reason
    assert store.versions() == [] and store.history() == []
    assert list((store.models_dir).iterdir()) == []  # not even the store's lock file


def test_a_candidate_below_the_policy_is_rejected_and_the_champion_stays(
        small_run: RunOutcome, data: Dataset, tmp_path: Path) -> None:
    store = DirectoryStore(tmp_path / "store")
    assert _publish(small_run, data, store).version == 1
    result = _publish(small_run, data, store, policy=GatePolicy(min_accuracy=1.0))
    assert not result.promoted and result.version is None and result.previous == 1
    assert "min_accuracy" in result.decision.reason
    assert store.versions() == [1] and store.promoted_version() == 1
