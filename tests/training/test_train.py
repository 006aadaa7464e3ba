"""The training loop: learning, repeatability, compilation, TensorBoard, checkpoints and resume."""

from __future__ import annotations

import signal
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from convserve.contracts.errors import ResumeError
from convserve.contracts.spec import TrainConfig
from convserve.store import durable_files
from convserve.store.job_dir import checkpoint_path, read_events
from convserve.training.batches import steps_per_epoch
from convserve.training.data import load_dataset
from convserve.training.progress import ProgressReporter
from convserve.training.train import train
from tests.conftest import SMALL_SYNTHETIC, python_env
from tests.progress_checks import assert_rates_and_a_countdown
from tests.waits import wait_until


@pytest.fixture(scope="module")
def small_data():
    return load_dataset(SMALL_SYNTHETIC, Path("unused"), seed=0)


def _train(tmp: Path, data, *, resume: bool = False, **overrides):
    config = TrainConfig(**{"dataset": SMALL_SYNTHETIC, "epochs": 2, "compile": "off",
                            **overrides})
    reporter = ProgressReporter(tmp / "events.jsonl")
    try:
        return train(config, data, tmp, reporter, resume=resume)
    finally:
        reporter.close()


def test_log_dict_has_the_tutorials_entries_and_the_model_learns(tmp_path, small_data) -> None:
    result = _train(tmp_path, small_data, epochs=3)
    steps = steps_per_epoch(len(small_data.train_labels), 64)
    log = result.log
    assert len(log.training_loss_per_batch) == 3 * steps
    assert len(log.validation_loss_per_batch) == 3 * 2  # 128 validation images, batches of 64
    assert len(log.training_accuracy_per_epoch) == len(log.validation_accuracy_per_epoch) == 3
    assert np.mean(log.training_loss_per_batch[-steps:]) < np.mean(log.training_loss_per_batch[:steps])
    assert log.validation_accuracy_per_epoch[-1] > 0.2  # 10 classes: chance is 0.1
    assert result.validation.accuracy == log.validation_accuracy_per_epoch[-1]


def test_cpu_training_is_repeatable_with_a_seed(tmp_path, small_data) -> None:
    first = _train(tmp_path / "a", small_data, epochs=1, seed=7)
    second = _train(tmp_path / "b", small_data, epochs=1, seed=7)
    other = _train(tmp_path / "c", small_data, epochs=1, seed=8)
    assert first.log.training_loss_per_batch == second.log.training_loss_per_batch
    for p, q in zip(first.net.parameters(), second.net.parameters(), strict=True):
        assert torch.equal(p, q)
    assert first.log.training_loss_per_batch != other.log.training_loss_per_batch


def test_compiled_training_runs_on_cpu_and_reports_compile_time(tmp_path, small_data) -> None:
    from torch._dynamo.utils import counters

    # Dynamo's own counters prove the step went through torch.compile: one frame captured into
    # one graph (no recompilation across the two epochs, no graph break), compiled by
    # AOTAutograd and Inductor. The eager run captures nothing.
    torch._dynamo.reset()
    counters.clear()
    result = _train(tmp_path, small_data, epochs=2, compile="on")
    captured = {name: dict(values) for name, values in counters.items()}
    assert captured["stats"]["unique_graphs"] == 1 and captured["frames"]["ok"] >= 1, captured
    assert captured["aot_autograd"]["ok"] >= 1 and "inductor" in captured, captured
    assert not captured.get("graph_break"), captured
    counters.clear()
    eager = _train(tmp_path / "eager", small_data, epochs=2, compile="off")
    assert not counters["stats"] and not counters["frames"]
    assert result.compiled and not eager.compiled and result.device == "cpu"
    assert result.compile_seconds > 0
    # The compiled graph computes the same function: the first step's loss (same init, same
    # batch) agrees to float tolerance, and the run ends in the eager run's accuracy band.
    assert result.log.training_loss_per_batch[0] == pytest.approx(
        eager.log.training_loss_per_batch[0], rel=1e-4)
    assert np.isfinite(result.log.training_loss_per_batch).all()
    assert abs(result.validation.accuracy - eager.validation.accuracy) <= 0.1
    events = read_events(tmp_path / "events.jsonl")
    assert [e["seconds"] for e in events if e["type"] == "compiled"] == [
        round(result.compile_seconds, 3)]


def test_tensorboard_scalars_read_back(small_run) -> None:
    accumulator = EventAccumulator(str(small_run.run_dir / "tensorboard"))
    accumulator.Reload()
    tags = set(accumulator.Tags()["scalars"])
    expected = {"Loss/train", "Loss/val", "Accuracy/train", "Accuracy/val", "LearningRate"}
    assert expected <= tags
    assert {f"Recall/class{i}" for i in range(10)} <= tags
    val_accuracy = accumulator.Scalars("Accuracy/val")
    assert [s.step for s in val_accuracy] == [1, 2]
    card_curve = small_run.card["training"]["validation_accuracy_per_epoch"]
    assert [s.value for s in val_accuracy] == pytest.approx(card_curve)
    # The default one-cycle schedule peaks at --lr (1e-3) and ends at 0 with the last step.
    rates = [s.value for s in accumulator.Scalars("LearningRate")]
    assert 0 < rates[0] <= 1e-3 and rates[-1] == pytest.approx(0.0, abs=1e-9)


def test_progress_events_carry_epochs_rates_and_eta(small_run, tmp_path, small_data) -> None:
    events = read_events(small_run.run_dir / "events.jsonl")
    epochs = [e for e in events if e["type"] == "epoch"]
    assert [e["epoch"] for e in epochs] == [1, 2]
    assert {"train_loss", "val_loss", "train_accuracy", "val_accuracy"} <= set(epochs[0])
    states = [e["state"] for e in events if e["type"] == "state"]
    assert states == ["LOADING_DATA", "TRAINING", "EXPORTING"]

    # Every step's progress (no rate limit): images/s measured, and an ETA that counts down.
    reporter = ProgressReporter(tmp_path / "events.jsonl", min_interval_s=0.0)
    try:
        train(TrainConfig(dataset=SMALL_SYNTHETIC, epochs=3, compile="off"), small_data,
              tmp_path, reporter)
    finally:
        reporter.close()
    progress = [e for e in read_events(tmp_path / "events.jsonl") if e["type"] == "progress"]
    steps = steps_per_epoch(len(small_data.train_labels), 64)
    by_epoch = {epoch: [e for e in progress if e["epoch"] == epoch] for epoch in (1, 2, 3)}
    for events in by_epoch.values():  # a rate needs a few steps: then one event per step
        numbers = [e["step"] for e in events]
        assert numbers == list(range(numbers[0], steps + 1)) and numbers[0] <= 3, numbers
    assert_rates_and_a_countdown(progress, batch_size=64)


def test_resume_continues_the_epoch_count_and_matches_an_uninterrupted_run(
        tmp_path, small_data) -> None:
    # Extending a run (epochs 1 -> 3) replays exactly only with a schedule that does not depend
    # on the run's length; test_recipe covers an interrupted run with the default one-cycle.
    whole = _train(tmp_path / "whole", small_data, epochs=3, schedule="constant")
    _train(tmp_path / "split", small_data, epochs=1, schedule="constant")
    resumed = _train(tmp_path / "split", small_data, epochs=3, resume=True, schedule="constant")
    assert len(resumed.log.validation_accuracy_per_epoch) == 3
    assert resumed.log.training_loss_per_batch == whole.log.training_loss_per_batch
    events = read_events(tmp_path / "split" / "events.jsonl")
    assert [e["epoch"] for e in events if e["type"] == "epoch"] == [1, 2, 3]
    assert [e["epoch"] for e in events if e["type"] == "resumed"] == [1]


def test_resume_refuses_a_checkpoint_of_another_config(tmp_path, small_data) -> None:
    _train(tmp_path, small_data, epochs=1)
    with pytest.raises(ResumeError, match="lr"):
        _train(tmp_path, small_data, epochs=2, lr=0.01, resume=True)
    with pytest.raises(ResumeError, match="no checkpoint"):
        _train(tmp_path / "empty", small_data, epochs=2, resume=True)


def test_checkpoint_loads_with_weights_only(tmp_path, small_data) -> None:
    _train(tmp_path, small_data, epochs=1)
    state = torch.load(checkpoint_path(tmp_path), weights_only=True)
    assert state["epoch"] == 1 and state["config"]["dataset"] == SMALL_SYNTHETIC
    assert set(state) >= {"model", "optimizer", "config", "epoch", "log", "normalization"}


def test_each_checkpoint_is_written_durably_and_leaves_no_temporary(tmp_path, small_data,
                                                                      monkeypatch) -> None:
    """Checkpoints go through `durable_files.replace_with`: torch.save to a temporary file
    beside the checkpoint, fsync'd, renamed over it; the directory fsync'd."""
    synced: list[Path] = []
    real_fsync_file = durable_files.fsync_file

    def fsync_file(path: Path) -> None:
        synced.append(path)
        real_fsync_file(path)

    monkeypatch.setattr(durable_files, "fsync_file", fsync_file)
    _train(tmp_path, small_data, epochs=2)
    path = checkpoint_path(tmp_path)
    written = [p for p in synced if p.name.startswith(f".{path.name}.")]
    assert len(written) == 2 and all(p.parent == path.parent for p in written)  # one per epoch
    assert sorted(p.name for p in path.parent.iterdir()) == [path.name]
    assert torch.load(path, weights_only=True)["epoch"] == 2


@pytest.mark.slow
def test_a_killed_run_resumes_from_its_last_checkpoint(tmp_path, python) -> None:
    """A real process killed with SIGKILL mid-run, then resumed by the CLI."""
    run_dir = tmp_path / "run"
    args = [python, "-m", "convserve.training", "--dataset", "synthetic:2000", "--epochs", "3",
            "--out", str(run_dir)]
    child = subprocess.Popen(args, env=python_env(), stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL)
    def checkpointed() -> bool:
        assert child.poll() is None, "training ended before its first checkpoint"
        return checkpoint_path(run_dir).exists()

    try:
        wait_until(checkpointed, "the first checkpoint", timeout=300)
        child.send_signal(signal.SIGKILL)
    finally:
        child.wait()
    assert child.returncode == -signal.SIGKILL
    done = torch.load(checkpoint_path(run_dir), weights_only=True)["epoch"]
    assert done < 3, "the run finished before it could be interrupted"

    resumed = subprocess.run(args + ["--resume"], env=python_env(), capture_output=True,
                             text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr
    events = read_events(run_dir / "events.jsonl")
    assert [e["epoch"] for e in events if e["type"] == "resumed"] == [done]
    epochs = [e["epoch"] for e in events if e["type"] == "epoch"]
    assert epochs[-(3 - done):] == list(range(done + 1, 4))
    assert (run_dir / "model.onnx").is_file()
