"""The repository keeps the shape it was specified with, and its modules stay small enough to read:
no source file over 400 lines, no function over 60 (generated stubs aside)."""

from __future__ import annotations

import ast

from tests.conftest import REPO_ROOT

MAX_FILE_LINES = 400
MAX_FUNCTION_LINES = 60


def test_the_specified_top_level_is_there() -> None:
    for name in ("pyproject.toml", "README.md", "Dockerfile", "service", "training", "protos",
                 "tests"):
        assert (REPO_ROOT / name).exists(), name


def test_no_file_or_function_is_too_long_to_read() -> None:
    too_long: list[str] = []
    for folder in ("service", "training"):
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
