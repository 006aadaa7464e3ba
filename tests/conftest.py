"""Shared fixtures: small real datasets and one short real training run reused across tests."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

# A real PostgreSQL server's fixtures (tests/postgres.py), for every test module.
from tests.postgres import own_postgres, postgres_server, postgres_template, postgres_url  # noqa: F401

# A real S3-compatible server's fixtures (tests/s3.py, SeaweedFS), for every test module.
from tests.s3 import own_s3_server, s3_server, s3_url, s3_weed  # noqa: F401

REPO_ROOT = Path(__file__).resolve().parent.parent
SMALL_SYNTHETIC = "synthetic:640"  # 640 train / 128 val images: a few seconds per epoch on 2 cores


@pytest.fixture(scope="session")
def repo_root() -> Path:
    return REPO_ROOT


def python_env() -> dict[str, str]:
    """Environment for child interpreters: the repo importable, output unbuffered."""
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")]))
    return env


@pytest.fixture
def datasets(tmp_path: Path) -> Path:
    """An empty datasets root (tests that need data write into it, or use digits/synthetic)."""
    (tmp_path / "datasets").mkdir()
    return tmp_path / "datasets"


@pytest.fixture
def store_dir(tmp_path: Path, datasets: Path) -> Path:
    """Where a test's model store goes (created by whoever opens it first), beside `datasets`."""
    return tmp_path / "store"


@pytest.fixture
def store(store_dir: Path):
    from convserve.store.directory import DirectoryStore

    return DirectoryStore(store_dir)


@pytest.fixture(scope="session")
def python() -> str:
    return sys.executable


@pytest.fixture(scope="session")
def small_run(tmp_path_factory: pytest.TempPathFactory):
    """One real 2-epoch run on small synthetic data (train → export → parity), shared by tests
    that only read its outputs."""
    from convserve.contracts.spec import TrainConfig
    from convserve.training.pipeline import run
    from convserve.training.progress import ProgressReporter

    run_dir = tmp_path_factory.mktemp("small_run")
    config = TrainConfig(dataset=SMALL_SYNTHETIC, epochs=2, seed=3, compile="off")
    reporter = ProgressReporter(run_dir / "events.jsonl")
    outcome = run(config, run_dir, reporter)
    reporter.close()
    return outcome


@pytest.fixture(scope="session")
def onnx_models(small_run, tmp_path_factory):
    """Real exported models: "good" (the trained small run, with its card beside it), "bad" (the
    same net untrained: ~10% accuracy), "other" (2 classes)."""
    import json

    import torch

    from convserve.training.export import export_onnx, serving_model
    from convserve.training.model import ConvNet, Preprocess

    folder = tmp_path_factory.mktemp("models")
    card = json.loads((small_run.run_dir / "card.json").read_text())
    preprocess = Preprocess(card["normalization"]["mean"], card["normalization"]["std"])
    torch.manual_seed(1)
    bad = export_onnx(serving_model(ConvNet(10), preprocess), folder / "bad" / "model.onnx",
                      {"classes": card["classes"]})
    other = export_onnx(serving_model(ConvNet(2), preprocess), folder / "other" / "model.onnx",
                        {"classes": ["cat", "dog"]})
    return {"good": small_run.model_path, "bad": bad, "other": other}


@pytest.fixture
def store_with_model(tmp_path: Path, onnx_models) -> tuple[Path, Path]:
    """A store whose version 1 (the "good" model) is promoted, and an empty datasets root."""
    from convserve.store.directory import DirectoryStore
    from tests.servers import publish  # imported here: tests.servers imports this module

    store, datasets = tmp_path / "store", tmp_path / "datasets"
    datasets.mkdir()
    publish(DirectoryStore(store), onnx_models["good"])
    return store, datasets
