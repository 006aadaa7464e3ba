"""The documents say what the code does: every `--flag` README.md and docs/*.md cite exists on
the command they cite it for, every repository path they cite exists, and docs/design.md's
module map lists the contracts package as it is.

Commands are read from code blocks (a backslash continues a line) and code spans. In one command
line, the flags after `convserve [SUBCOMMAND...]`, `python -m convserve.training` or
`benchmarks/NAME.py` belong to that command, until another command starts (`podman`, `kubectl`,
`-m torch.distributed.run`, ... own theirs, unchecked) or the line ends (`&&`, `;`, ` | `, `#`).
A flag cited with no command (`--max-queued-jobs` in a sentence) must exist on at least one of
convserve's commands, or be one of FOREIGN_FLAGS. The parsers are the real ones:
`convserve.cli.main.build_parser()`, `convserve.training.cli.build_parser()`; a benchmark's flags
are read from its source (its `add_argument` calls), so no benchmark is imported or run.
"""

from __future__ import annotations

import argparse
import ast
import re
from collections.abc import Iterator
from dataclasses import dataclass
from functools import cache
from pathlib import Path

from tests.conftest import REPO_ROOT

DOCUMENTS = ("README.md", "docs/*.md")

# Commands of other tools: the flags after them are theirs, not checked here.
FOREIGN_COMMANDS = frozenset({
    "apt-get", "curl", "docker", "env", "git", "grpcurl", "hadolint", "helm", "kubectl", "make",
    "mypy", "nginx", "perf_analyzer", "pg_isready", "pip", "podman", "podman-build", "psql",
    "py-spy", "pytest", "ruff", "tensorboard", "torch.distributed.run", "torchrun",
})
# Flags of other tools that the documents cite on their own, in prose: the tool they belong to.
FOREIGN_FLAGS = {
    "--format": "podman build (`--format docker` keeps the HEALTHCHECK)",
    "--health-cmd": "podman run / docker run (the container's health check)",
    "--gpus": "docker run",
    "--nproc-per-node": "torch.distributed.run",
    "--shape": "perf_analyzer (an input's shape)",
    "--standalone": "torch.distributed.run",
}

FLAG = re.compile(r"^[`\[(\"']*(--[a-z][a-z0-9-]*)")
SEPARATORS = re.compile(r"\s(?:&&|\|\||;|\|)\s")
COMMENT = re.compile(r"(?:^|\s)#")
FENCE = re.compile(r"^\s*(```|~~~)")
CODE_SPAN = re.compile(r"(`+)(.+?)\1", re.DOTALL)


@dataclass(frozen=True)
class Citation:
    file: str
    line: int
    command: str  # "convserve serve", "python -m convserve.training", "benchmarks/serve.py", ""
    flag: str

    def __str__(self) -> str:
        return f"{self.file}:{self.line}: {self.command or '(no command)'} {self.flag}"


# ----------------------------------------------------------------------------- the commands


def _options(parser: argparse.ArgumentParser) -> set[str]:
    return {option for action in parser._actions for option in action.option_strings
            if option.startswith("--")}


def _subparsers(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    return {name: sub for action in parser._actions
            if isinstance(action, argparse._SubParsersAction)
            for name, sub in action.choices.items()}


@cache
def convserve_commands() -> dict[tuple[str, ...], set[str]]:
    """Every `convserve` command path, () for `convserve` itself, to its flags."""
    from convserve.cli.main import build_parser

    commands: dict[tuple[str, ...], set[str]] = {}

    def walk(path: tuple[str, ...], parser: argparse.ArgumentParser) -> None:
        commands[path] = _options(parser)
        for name, sub in _subparsers(parser).items():
            walk((*path, name), sub)

    walk((), build_parser())
    return commands


@cache
def training_flags() -> set[str]:
    from convserve.training.cli import build_parser

    return _options(build_parser())


@cache
def benchmark_flags(name: str) -> set[str] | None:
    """The `--flags` a benchmark script's `add_argument` calls define; None if no such script."""
    path = REPO_ROOT / "benchmarks" / name
    if not path.is_file():
        return None
    flags = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
                and node.func.attr == "add_argument"):
            flags |= {arg.value for arg in node.args if isinstance(arg, ast.Constant)
                      and isinstance(arg.value, str) and arg.value.startswith("--")}
    return flags | {"--help"}


def every_known_flag() -> set[str]:
    flags = set().union(*convserve_commands().values(), training_flags())
    for path in (REPO_ROOT / "benchmarks").glob("*.py"):
        flags |= benchmark_flags(path.name) or set()
    return flags


# ----------------------------------------------------------------------------- the documents


def documents() -> list[Path]:
    return sorted({path for pattern in DOCUMENTS for path in REPO_ROOT.glob(pattern)})


def segments(text: str) -> Iterator[tuple[int, str]]:
    """(line number, text, block) of every piece of a document that may cite a command or a flag:
    each logical line of a code block (block: its number, from 1), each code span and the prose
    around the spans (block 0)."""
    prose: list[str] = []
    lines = text.splitlines()
    in_block, block, pending, pending_line = False, 0, "", 0
    for number, line in enumerate(lines, 1):
        if FENCE.match(line):
            in_block = not in_block
            block += in_block
            prose.append("")
            continue
        if not in_block:
            prose.append(line)
            continue
        prose.append("")
        if not pending:
            pending_line = number
        if line.rstrip().endswith("\\"):
            pending += line.rstrip()[:-1] + " "
            continue
        yield pending_line, pending + line, block
        pending = ""
    # Code spans may wrap across lines (never across paragraphs); a citation's line is where its
    # span starts.
    body = "\n".join(prose)
    starts = [0, *(m.end() for m in re.finditer("\n", body))]

    def line_of(offset: int) -> int:
        return next(i for i in range(len(starts), 0, -1) if starts[i - 1] <= offset)

    for paragraph in re.finditer(r"(?:[^\n]+\n?)+", body):
        outside, last = [], paragraph.start()
        for span in CODE_SPAN.finditer(paragraph.group()):
            begin = paragraph.start() + span.start()
            if "\n\n" in span.group(2):
                continue
            yield line_of(begin), span.group(2).replace("\n", " "), 0
            outside.append((last, begin))
            last = paragraph.start() + span.end()
        outside.append((last, paragraph.end()))
        for begin, end in outside:
            for offset, line in enumerate(body[begin:end].split("\n")):
                if "--" in line:
                    yield line_of(begin) + offset, line, 0


def citations(file: str, line: int, text: str, inherited: str = ""
              ) -> tuple[list[Citation], str]:
    """The flags a piece of text cites and the command each belongs to, and the command its
    code ends in. A comment's bare flags belong to the command before it on its line, or on a
    comment-only line of a code block to the command of the line before (`inherited`)."""
    code, *comment = COMMENT.split(text, maxsplit=1)
    found: list[Citation] = []
    command = ""
    for part in SEPARATORS.split(code):
        command = _read_command(file, line, part, "", found)
    command = command or (inherited if not code.strip() else "")
    if comment:
        _read_command(file, line, comment[0], command, found)
    return found, command


def _read_command(file: str, line: int, text: str, command: str, found: list[Citation]) -> str:
    """Appends the citations of one command line to `found`; returns the last command in it."""
    tokens = text.split()
    index = 0
    while index < len(tokens):
        token = tokens[index].strip("`'\"()[],")
        word = token.rsplit("/", 1)[-1]
        previous = tokens[index - 1] if index else ""
        following = tokens[index + 1] if index + 1 < len(tokens) else ""
        if re.fullmatch(r"convserve(:[\w.-]+)?", word):
            command, index = _convserve_command(tokens, index, image=":" in word)
            continue
        if previous == "-m" and token == "convserve.training":
            command = "python -m convserve.training"
        elif previous == "-m" and token == "convserve.cli":
            command, index = _convserve_command(tokens, index, image=False)
            continue
        elif re.fullmatch(r"(\S*/)?benchmarks/[\w-]+\.py", token) or (
                token == word and word.endswith(".py") and following.startswith("--")
                and (REPO_ROOT / "benchmarks" / word).is_file()):
            command = "benchmarks/" + word
        elif word in FOREIGN_COMMANDS or (previous == "-m" and token in FOREIGN_COMMANDS):
            command = "foreign"
        elif (flag := FLAG.match(tokens[index])) and command != "foreign":
            found.append(Citation(file, line, command, flag.group(1)))
        index += 1
    return command


def _convserve_command(tokens: list[str], index: int, image: bool) -> tuple[str, int]:
    """The `convserve ...` command that starts at tokens[index], and where its arguments start.
    A container image (`convserve:serve`) runs `convserve` only when a subcommand follows it."""
    path: tuple[str, ...] = ()
    index += 1
    while index < len(tokens) and (*path, tokens[index]) in convserve_commands():
        path = (*path, tokens[index])
        index += 1
    if image and not path:
        return "foreign", index
    return " ".join(("convserve", *path)), index


def all_citations() -> list[Citation]:
    found = []
    for path in documents():
        name = str(path.relative_to(REPO_ROOT))
        last, last_block = "", 0
        for line, text, block in segments(path.read_text(encoding="utf-8")):
            cited, last = citations(name, line, text, last if block and block == last_block else "")
            last_block = block
            found += cited
    return found


def flags_of(command: str) -> set[str] | None:
    if command == "python -m convserve.training":
        return training_flags()
    if command.startswith("benchmarks/"):
        return benchmark_flags(command.removeprefix("benchmarks/"))
    path = tuple(command.split()[1:])
    return convserve_commands().get(path)


# ----------------------------------------------------------------------------- the tests


def test_every_cited_flag_exists_on_its_command() -> None:
    known = every_known_flag()
    wrong = []
    for citation in all_citations():
        if not citation.command:
            if citation.flag not in known and citation.flag not in FOREIGN_FLAGS:
                wrong.append(f"{citation}: no convserve command has this flag")
            continue
        flags = flags_of(citation.command)
        if flags is None:
            wrong.append(f"{citation}: no such command")
        elif citation.flag not in flags:
            wrong.append(f"{citation}: not a flag of `{citation.command}`")
    assert not wrong, "\n".join(wrong)


def test_the_scan_finds_the_commands_the_documents_cite() -> None:
    """A guard on the scanner itself: it must attribute flags to each kind of command."""
    commands = {c.command for c in all_citations()}
    for expected in ("convserve serve", "convserve train", "python -m convserve.training",
                     "benchmarks/serve.py", "convserve models promote", ""):
        assert expected in commands, (expected, sorted(commands))


def test_the_scanner_reads_commands_as_a_shell_would() -> None:
    def cited(text: str, inherited: str = "") -> list[tuple[str, str]]:
        return [(c.command, c.flag) for c in citations("x.md", 1, text, inherited)[0]]

    assert cited(".venv/bin/convserve models promote 2 --reason x --store DIR") == [
        ("convserve models promote", "--reason"), ("convserve models promote", "--store")]
    assert cited("python -m torch.distributed.run --standalone -m convserve.training --epochs 3"
                 ) == [("python -m convserve.training", "--epochs")]
    assert cited("podman run --rm localhost/convserve:full serve --role train") == [
        ("convserve serve", "--role")]
    assert cited("podman run --rm --entrypoint python localhost/convserve:serve -c x") == []
    assert cited("convserve jobs && benchmarks/serve.py --rounds 3 # --no-floor") == [
        ("benchmarks/serve.py", "--rounds"), ("benchmarks/serve.py", "--no-floor")]
    assert cited("# defaults: --jobs 400", "benchmarks/job_queue.py") == [
        ("benchmarks/job_queue.py", "--jobs")]
    assert cited("issue: `job_queue.py --jobs-url`") == [("benchmarks/job_queue.py", "--jobs-url")]
    assert cited("with `--server-arg=--workers=2`") == [("", "--server-arg")]


def test_every_path_the_documents_cite_exists() -> None:
    prefixes = ("service/", "training/", "tests/", "benchmarks/", "deploy/", "protos/", "docs/")
    missing = []
    for path in documents():
        name = str(path.relative_to(REPO_ROOT))
        for line, text, _block in segments(path.read_text(encoding="utf-8")):
            for token in re.findall(r"[\w./-]+", text):
                token = token.rstrip(".,:")
                if (token.startswith(prefixes) and not re.search(r"[<>*{}]", text)
                        and not (REPO_ROOT / token).exists()):
                    missing.append(f"{name}:{line}: {token}")
    assert not missing, "\n".join(sorted(set(missing)))


def test_the_design_lists_every_contracts_module() -> None:
    """docs/design.md's module map names the contracts package's modules, no more, no fewer."""
    design = (REPO_ROOT / "docs" / "design.md").read_text(encoding="utf-8")
    block = re.search(r"^  contracts/ .*?\n((?:    .*\n)+)", design, re.MULTILINE)
    assert block, "docs/design.md's module map has no `contracts/` entry"
    listed = set(re.findall(r"^    ([a-z_]+)\.py ", block.group(1), re.MULTILINE))
    package = REPO_ROOT / "service" / "convserve" / "contracts"
    actual = {p.stem for p in package.glob("*.py") if p.name != "__init__.py"}
    assert listed == actual, {"not in the design": sorted(actual - listed),
                              "no such module": sorted(listed - actual)}
