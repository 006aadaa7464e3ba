"""The SDK installs into another service's environment on its own: the project's wheel, installed
bare (`pip install convserve`, no extras) into a fresh virtual environment, brings neither torch
nor ONNX Runtime nor Pillow, and its Client calls Predict and health on a real server. Commands
that need the extras say which one to install."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO_ROOT
from tests.servers import running_server

HEAVY = ("torch", "torchvision", "onnxruntime", "onnxruntime-gpu", "onnx", "pillow",
         "tensorboard", "scikit-learn", "grpcio-reflection")
CLIENT_SCRIPT = """
import json, sys
import numpy as np
from convserve.client import Client
with Client(sys.argv[1]) as client:
    prediction = client.predict(np.zeros((2, 32, 32, 3), dtype=np.uint8), top_k=3)
    print(json.dumps({"version": prediction.version, "shape": list(prediction.probabilities.shape),
                      "health": client.health(),
                      "heavy": sorted(m for m in ("torch", "onnxruntime", "PIL", "convserve.training")
                                      if m in sys.modules)}))
"""


def test_every_package_folder_is_in_the_distribution() -> None:
    """pyproject.toml lists the packages (service/convserve is `convserve`, a namespace package,
    and training/convserve/training is `convserve.training`): a new subpackage left out would be
    missing from every install."""
    import tomllib

    setuptools = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    roots = {folder: name for name, folder in setuptools["package-dir"].items()}
    found = {"convserve"}  # the namespace package: no __init__.py of its own
    for folder, name in roots.items():
        for init in (REPO_ROOT / folder).rglob("__init__.py"):
            found.add(".".join((name, *init.parent.relative_to(REPO_ROOT / folder).parts)))
    assert sorted(setuptools["packages"]) == sorted(found)


def _run(args: list[str], **kwargs) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    return subprocess.run(args, capture_output=True, text=True, timeout=600, check=False, env=env,
                          **kwargs)


@pytest.mark.slow
def test_a_bare_install_is_the_sdk_alone_and_talks_to_a_server(tmp_path: Path,
                                                               store_with_model) -> None:
    wheels = tmp_path / "wheels"
    built = _run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
                  "--quiet", "--wheel-dir", str(wheels), str(REPO_ROOT)])
    assert built.returncode == 0, built.stderr[-3000:]
    [wheel] = wheels.glob("convserve-*.whl")

    venv = tmp_path / "venv"
    assert _run([sys.executable, "-m", "venv", str(venv)]).returncode == 0
    python = venv / "bin" / "python"
    installed = _run([str(python), "-m", "pip", "install", "--quiet", "--disable-pip-version-check",
                      "--constraint", str(REPO_ROOT / "requirements.lock"), str(wheel)])
    assert installed.returncode == 0, installed.stderr[-3000:]
    listed = _run([str(python), "-m", "pip", "list", "--format", "json"])
    names = {p["name"].lower() for p in json.loads(listed.stdout)}
    assert {"convserve", "grpcio", "grpcio-health-checking", "protobuf", "numpy"} <= names
    assert names.isdisjoint(HEAVY), names & set(HEAVY)
    top_level = _run([str(python), "-c", "import importlib.metadata as m; "
                      "print(m.distribution('convserve').read_text('top_level.txt') or '')"])
    assert top_level.stdout.split() in (["convserve"], [])  # only `convserve` is importable
    for name in ("service", "training"):
        missing = _run([str(python), "-c", f"import {name}"], cwd=tmp_path)
        assert "ModuleNotFoundError" in missing.stderr, name

    store, datasets = store_with_model
    with running_server(store, datasets) as server:
        called = _run([str(python), "-c", CLIENT_SCRIPT, server.address], cwd=tmp_path)
        assert called.returncode == 0, called.stderr[-3000:]
        assert json.loads(called.stdout) == {"version": 1, "shape": [2, 10], "health": "SERVING",
                                             "heavy": []}
        health = _run([str(venv / "bin" / "convserve"), "health", "--address", server.address],
                      cwd=tmp_path)
        assert health.returncode == 0 and "SERVING" in health.stdout, health.stderr
    serve = _run([str(venv / "bin" / "convserve"), "serve", "--store", str(tmp_path / "s")],
                 cwd=tmp_path)
    assert serve.returncode == 1 and "Traceback" not in serve.stderr, serve.stderr
    assert "pip install 'convserve[serve]'" in serve.stderr, serve.stderr
