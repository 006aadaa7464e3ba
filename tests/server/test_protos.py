"""The committed stubs in service/convserve/pb are exactly what protos/ generates (run `make protos`)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

from tests.conftest import REPO_ROOT


def _generator():
    spec = importlib.util.spec_from_file_location("generate", REPO_ROOT / "protos" / "generate.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_stubs_are_current(tmp_path: Path) -> None:
    generated = _generator().generate(tmp_path)
    committed = REPO_ROOT / "service" / "convserve" / "pb"
    assert generated, "protos/ generated nothing"
    for path in generated:
        relative = path.relative_to(tmp_path)
        assert (committed / relative).read_bytes() == path.read_bytes(), \
            f"service/convserve/pb/{relative} is stale: run `make protos` and commit the result"
    committed_files = {p.relative_to(committed) for p in committed.rglob("*.py*")
                       if p.name != "__init__.py" and "__pycache__" not in p.parts}
    assert committed_files == {p.relative_to(tmp_path) for p in generated}
