"""One import path for every error class: the hierarchy lives in `convserve.contracts.errors`, and
every module (product code, tests, benchmarks) imports its error classes from there;
`convserve.errors` holds only what needs grpc (`ClientError`, `status_of`) and re-exports nothing."""

from __future__ import annotations

import ast
import inspect
from pathlib import Path

import grpc

import convserve.errors
from convserve.contracts import errors as contracts_errors
from convserve.contracts.errors import ConvserveError, InvalidInput, NotFound
from convserve.errors import ClientError, status_of
from tests.conftest import REPO_ROOT

HOME = "convserve.contracts.errors"
HIERARCHY = frozenset(name for name, value in vars(contracts_errors).items()
                      if inspect.isclass(value) and issubclass(value, ConvserveError))
# Where the namespace package's portions and the other trees start their module names.
ROOTS = {"service": REPO_ROOT / "service", "training": REPO_ROOT / "training",
         "tests": REPO_ROOT, "benchmarks": REPO_ROOT}


def module_name(path: Path, root: Path) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imported_from(node: ast.ImportFrom, module: str, is_package: bool) -> str:
    """The absolute module an `ImportFrom` names, relative imports resolved."""
    if not node.level:
        return node.module or ""
    package = module.split(".") if is_package else module.split(".")[:-1]
    base = package[:len(package) - (node.level - 1)]
    return ".".join([*base, *([node.module] if node.module else [])])


def wrong_imports(path: Path, root: Path) -> list[str]:
    """Each place in `path` that takes an error class of the hierarchy from anywhere but its home:
    `from M import Error`, or `alias.Error` where `alias` names an imported module."""
    module = module_name(path, root)
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    bound: dict[str, str] = {}  # a name an import binds -> the dotted path it stands for
    where = path.relative_to(REPO_ROOT if path.is_relative_to(REPO_ROOT) else root)
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.asname:
                    bound[alias.asname] = alias.name
                else:
                    head = alias.name.split(".")[0]
                    bound[head] = head
        elif isinstance(node, ast.ImportFrom):
            source = imported_from(node, module, path.name == "__init__.py")
            for alias in node.names:
                bound[alias.asname or alias.name] = f"{source}.{alias.name}"
                if alias.name in HIERARCHY and source != HOME:
                    found.append(f"{where}:{node.lineno}: "
                                 f"from {source} import {alias.name}")
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and node.attr in HIERARCHY:
            dotted = ast.unparse(node.value)
            head, _, rest = dotted.partition(".")
            if head in bound and ".".join(filter(None, [bound[head], rest])) != HOME:
                found.append(f"{where}:{node.lineno}: {dotted}.{node.attr}")
    return found


def test_every_module_imports_its_error_classes_from_contracts_errors() -> None:
    wrong = []
    scanned = 0
    for tree, root in ROOTS.items():
        for path in sorted((REPO_ROOT / tree).rglob("*.py")):
            if path.is_relative_to(REPO_ROOT / "service" / "convserve" / "pb"):
                continue  # generated
            wrong += wrong_imports(path, root)
            scanned += 1
    assert scanned > 100  # the trees were found
    assert not wrong, "import error classes from convserve.contracts.errors:\n" + "\n".join(wrong)


def test_the_scan_sees_each_wrong_form(tmp_path: Path) -> None:
    package = tmp_path / "convserve" / "server"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text("")
    module = package / "bad.py"
    module.write_text("from convserve.errors import ClientError, InvalidInput\n"
                      "from ..errors import NotFound\n"
                      "from convserve.store.directory import StoreError\n"
                      "from convserve.contracts.errors import ConfigError\n"
                      "from convserve.contracts import errors\n"
                      "import convserve.errors\n"
                      "from convserve.server import config\n"
                      "ok = (ConfigError, errors.NoModel)\n"
                      "bad = (convserve.errors.Unavailable, config.ConfigError)\n")
    found = [line.partition(": ")[2] for line in wrong_imports(module, tmp_path)]
    assert found == ["from convserve.errors import InvalidInput",
                     "from convserve.errors import NotFound",
                     "from convserve.store.directory import StoreError",
                     "convserve.errors.Unavailable", "config.ConfigError"]


def test_convserve_errors_holds_only_what_needs_grpc() -> None:
    assert sorted(convserve.errors.__all__) == ["ClientError", "status_of"]
    assert not HIERARCHY & set(convserve.errors.__all__)
    assert "ClientError" not in HIERARCHY and issubclass(ClientError, ConvserveError)


def test_every_class_of_the_hierarchy_maps_to_a_grpc_status() -> None:
    assert {"ConvserveError", "InvalidInput", "ConfigError", "StoreError"} <= HIERARCHY
    for name in HIERARCHY:
        error = getattr(contracts_errors, name)("message")
        code, message = status_of(error)
        assert code == grpc.StatusCode[error.status] and message == "message", name
    assert status_of(InvalidInput("x"))[0] == grpc.StatusCode.INVALID_ARGUMENT
    assert status_of(NotFound("x"))[0] == grpc.StatusCode.NOT_FOUND
    assert status_of(KeyError("x"))[0] == grpc.StatusCode.INTERNAL
