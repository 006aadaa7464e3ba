"""Data-parallel training under torchrun: 2 real processes on CPU with the gloo backend."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
import torch

from convserve.contracts.errors import ConfigError, InvalidInput
from convserve.contracts.spec import TrainConfig
from convserve.jobs import JobRunner, RunnerConfig, TrainParams
from convserve.store.directory import DirectoryStore
from convserve.store.job_dir import read_events
from convserve.training import distributed
from convserve.training.batches import epoch_batches
from convserve.training.data import load_dataset
from convserve.training.progress import ProgressReporter
from convserve.training.train import train
from tests.conftest import python_env

DATASET, EPOCHS = "synthetic:960", 3


def test_the_world_comes_from_torchruns_variables() -> None:
    assert distributed.from_environment({}) == distributed.World(0, 1, 0)
    world = distributed.from_environment({"RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "1"})
    assert world.distributed and not world.is_main
    with pytest.raises(ValueError, match="RANK=2 is out of range for WORLD_SIZE=2"):
        distributed.from_environment({"RANK": "2", "WORLD_SIZE": "2"})


def test_ranks_split_every_epoch_into_disjoint_shards_of_equal_steps() -> None:
    ranks = [distributed.World(r, 2, r) for r in (0, 1)]
    shards = [torch.cat(list(epoch_batches(100, 16, seed=5, epoch=2, device=torch.device("cpu"),
                                           world=w))) for w in ranks]
    assert len(shards[0]) == len(shards[1]) == 48  # 3 steps of 16 each: (100 // 2) // 16
    assert not set(shards[0].tolist()) & set(shards[1].tolist())


def test_the_global_batch_must_divide_among_the_processes(tmp_path: Path) -> None:
    data = load_dataset("synthetic:64", Path("unused"))
    with pytest.raises(ConfigError, match="expected a multiple of the 2 processes"):
        train(TrainConfig(dataset="synthetic:64", batch_size=63, compile="off"), data, tmp_path,
              ProgressReporter(None), world=distributed.World(0, 2, 0))
    runner = JobRunner(DirectoryStore(tmp_path / "store"),
                       RunnerConfig(datasets_root=tmp_path, processes=2))
    with pytest.raises(InvalidInput, match="must be a multiple of 2"):
        runner.submit(TrainParams.of(dataset="digits", batch_size=63))


def test_a_job_runner_with_several_processes_launches_torchrun(tmp_path: Path) -> None:
    runner = JobRunner(DirectoryStore(tmp_path / "store"),
                       RunnerConfig(datasets_root=tmp_path, processes=4))
    record = runner.submit(TrainParams.of(dataset="digits", batch_size=64))
    command = runner.command(record)
    assert command[1:8] == ["-m", "torch.distributed.run", "--standalone", "--nproc-per-node",
                            "4", "-m", "convserve.training"]


@pytest.mark.slow
def test_two_gloo_processes_train_like_one_and_publish_exactly_one_version(
        tmp_path: Path, python: str) -> None:
    common = ["--dataset", DATASET, "--epochs", str(EPOCHS), "--seed", "3", "--compile", "off"]
    env = python_env() | {"OMP_NUM_THREADS": "1"}  # 2 processes on a 2-core machine
    store = tmp_path / "store"
    ddp = subprocess.run(
        [python, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
         "-m", "convserve.training", *common, "--out", str(tmp_path / "ddp"), "--store", str(store),
         "--min-accuracy", "0"],
        env=env, capture_output=True, text=True, timeout=600)
    assert ddp.returncode == 0, ddp.stderr[-3000:]
    single = subprocess.run([python, "-m", "convserve.training", *common, "--out", str(tmp_path / "one")],
                            env=env, capture_output=True, text=True, timeout=600)
    assert single.returncode == 0, single.stderr[-3000:]

    ddp_card = json.loads((tmp_path / "ddp" / "card.json").read_text())
    one_card = json.loads((tmp_path / "one" / "card.json").read_text())
    ddp_accuracy = ddp_card["metrics"]["onnx_val_accuracy"]
    one_accuracy = one_card["metrics"]["onnx_val_accuracy"]
    assert one_accuracy > 0.5, "the 1-process reference did not learn: the band means nothing"
    assert abs(ddp_accuracy - one_accuracy) <= 0.08, (ddp_accuracy, one_accuracy)
    # The same number of optimiser steps: --batch-size is the global batch.
    losses = [json.loads((tmp_path / run / "log.json").read_text())["training_loss_per_batch"]
              for run in ("ddp", "one")]
    assert len(losses[0]) == len(losses[1])

    published = DirectoryStore(store)
    assert published.versions() == [1] and len(published.history()) == 1
    # Only rank 0 reported: one terminal state, one event per epoch.
    events = read_events(tmp_path / "ddp" / "events.jsonl")
    assert [e["epoch"] for e in events if e["type"] == "epoch"] == list(range(1, EPOCHS + 1))
    assert [e["state"] for e in events if e["type"] == "state"][-1] == "PROMOTED"
