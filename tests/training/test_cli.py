"""`python -m convserve.training` as a person runs it: real subprocesses, one-line errors, the full job."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from tests.conftest import python_env


def _run(python: str, *args: str, cwd: Path | None = None, timeout: float = 600):
    return subprocess.run([python, "-m", "convserve.training", *args], env=python_env(), cwd=cwd,
                          capture_output=True, text=True, timeout=timeout, check=False)


@pytest.mark.parametrize(("args", "message"), [
    (["--epochs", "0"], "epochs=0 is out of range"),
    (["--epochs", "ten"], "invalid int value"),
    (["--lr", "-1"], "lr=-1.0 is out of range"),
    (["--compile", "maybe"], "compile='maybe' is unknown: expected one of auto, on, off"),
    (["--dataset", "mnist"], "dataset='mnist' is unknown: expected one of digits, cifar10"),
    (["--dataset", "folder:../etc"], "dataset='folder:../etc' is unknown"),
    (["--batch-size", "5000"], "batch_size=5000 is out of range: expected an integer in 1..4096"),
    (["--resume"], "--resume needs --out"),
    (["--min-accuracy", "1.5"], "min_accuracy=1.5 is out of range"),
    (["--no-such-flag"], "unrecognized arguments"),
])
def test_bad_arguments_give_one_line_and_exit_2(python, tmp_path, args, message) -> None:
    result = _run(python, *args, "--out", str(tmp_path / "run"), cwd=tmp_path) \
        if args != ["--resume"] else _run(python, *args, cwd=tmp_path)
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1 and message in result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize(("dataset", "message"), [
    ("folder:missing", "missing"),
    ("cifar10", "cifar-10-batches-py"),
])
def test_datasets_that_are_not_there_give_one_line_and_exit_2(python, tmp_path, dataset, message) -> None:
    result = _run(python, "--dataset", dataset, "--datasets-root", str(tmp_path / "data"),
                  "--out", str(tmp_path / "run"))
    assert result.returncode == 2, result.stderr
    assert message in result.stderr and "Traceback" not in result.stderr
    assert result.stderr.strip().count("\n") == 0
    events = [json.loads(line) for line in (tmp_path / "run" / "events.jsonl").read_text().splitlines()]
    assert events[-1]["state"] == "FAILED" and message in events[-1]["error"]


@pytest.mark.slow
def test_digits_ten_epochs_reach_95_percent_by_torch_and_onnx_runtime(python, tmp_path) -> None:
    """The issue's acceptance run, exactly as the README gives it."""
    run_dir = tmp_path / "demo"
    result = _run(python, "--dataset", "digits", "--epochs", "10", "--out", str(run_dir))
    assert result.returncode == 0, result.stderr[-2000:]
    assert f"model:      {run_dir / 'model.onnx'}" in result.stdout
    card = json.loads((run_dir / "card.json").read_text())
    assert card["metrics"]["torch_val_accuracy"] >= 0.95
    assert card["metrics"]["onnx_val_accuracy"] >= 0.95
    assert card["training"]["epochs"] == 10 and card["training"]["train_seconds"] > 0
    assert card["parity"]["passed"]


@pytest.mark.slow
def test_store_run_publishes_a_promoted_model_and_keeps_a_rejected_one_out(python, tmp_path) -> None:
    store = tmp_path / "store"
    common = ["--dataset", "synthetic:640", "--seed", "3", "--store", str(store),
              "--min-accuracy", "0"]
    first = _run(python, *common, "--epochs", "2", "--out", str(tmp_path / "a"))
    assert first.returncode == 0, first.stderr[-2000:]
    assert "gate:       PROMOTED as version 1" in first.stdout
    # The second candidate must beat v1 by 100 points of accuracy: impossible, so rejected.
    second = _run(python, *common, "--epochs", "1", "--min-improvement", "1.0",
                  "--out", str(tmp_path / "b"))
    assert second.returncode == 0, second.stderr[-2000:]
    assert "gate:       REJECTED" in second.stdout
    assert (store / "models" / "PROMOTED").read_text().strip() == "1"
    assert sorted(p.name for p in (store / "models").iterdir() if p.name.isdigit()) == ["1"]
    rejected_card = json.loads((tmp_path / "b" / "card.json").read_text())
    assert rejected_card["gate"]["promoted"] is False and rejected_card["version"] is None
    assert (tmp_path / "b" / "model.onnx").is_file()  # kept for inspection
    events = [json.loads(x) for x in (tmp_path / "b" / "events.jsonl").read_text().splitlines()]
    assert events[-1]["state"] == "REJECTED"
    assert [e["promoted"] for e in events if e["type"] == "gate"] == [False]
    published_card = json.loads((store / "models" / "1" / "card.json").read_text())
    assert published_card["gate"]["promoted"] and published_card["sha256"]
