"""The repository keeps the shape it was specified with, every module's path ends in its import
name, and the modules stay small enough to read: no source file over 400 lines, no function over
60 (generated stubs aside), in the package and in benchmarks/."""

from __future__ import annotations

import ast
import importlib.util
from pathlib import Path

from tests.conftest import REPO_ROOT

MAX_FILE_LINES = 400
MAX_FUNCTION_LINES = 60


def test_the_specified_top_level_is_there() -> None:
    for name in ("pyproject.toml", "README.md", "Dockerfile", "service", "training", "protos",
                 "tests"):
        assert (REPO_ROOT / name).exists(), name


def test_every_module_path_read_from_its_folder_is_its_import_name() -> None:
    """service/convserve/jobs/runner.py is `convserve.jobs.runner`, and so on for every module:
    what an editor, mypy and import-linter read is what `import` finds."""
    wrong = []
    for folder in ("service", "training"):
        for path in sorted((REPO_ROOT / folder).rglob("*.py")):
            parts = path.relative_to(REPO_ROOT / folder).with_suffix("").parts
            name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
            spec = importlib.util.find_spec(name)
            if spec is None or spec.origin is None or Path(spec.origin) != path:
                wrong.append(f"{path.relative_to(REPO_ROOT)}: `import {name}` finds "
                             f"{spec.origin if spec else None}")
    assert not wrong, wrong


def test_no_file_or_function_is_too_long_to_read() -> None:
    too_long: list[str] = []
    for folder in ("service", "training", "benchmarks"):
        for path in sorted((REPO_ROOT / folder).rglob("*.py")):
            if "pb" in path.relative_to(REPO_ROOT).parts:
                continue
            text = path.read_text(encoding="utf-8")
            if (lines := len(text.splitlines())) > MAX_FILE_LINES:
                too_long.append(f"{path.relative_to(REPO_ROOT)}: {lines} lines")
            for node in ast.walk(ast.parse(text)):
                if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                    length = (node.end_lineno or node.lineno) - node.lineno + 1
                    if length > MAX_FUNCTION_LINES:
                        too_long.append(f"{path.relative_to(REPO_ROOT)}:{node.lineno} "
                                        f"{node.name}: {length} lines")
    assert not too_long, too_long
