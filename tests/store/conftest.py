"""Fixtures of the model store's tests."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

MODEL_BYTES = 300 * 1024  # several 64 KiB chunks, so "copy" really is mid-copy


@pytest.fixture
def make_model(tmp_path: Path):
    """Makes a new candidate file of MODEL_BYTES random bytes at each call."""
    counter = iter(range(1_000_000))

    def make() -> Path:
        path = tmp_path / f"candidate-{next(counter)}.onnx"
        path.write_bytes(os.urandom(MODEL_BYTES))
        return path

    return make
