"""Start a server as a child process and wait until it listens: the one way the demo, the
benchmarks and the tests start one.

`convserve serve` prints one line per metrics endpoint (METRICS_PREFIX, worker 0's first) and then
LISTENING_PREFIX with its address, once it accepts calls; this reads them.
"""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from convserve.server.config import HTTP_PREFIX, LISTENING_PREFIX, METRICS_PREFIX

START_TIMEOUT_S = 120.0  # a cold start imports onnxruntime and loads and warms a model


class ServerStartError(RuntimeError):
    """The server exited, or never said it was listening (`process`: what was started)."""

    def __init__(self, message: str, process: subprocess.Popen[str]) -> None:
        super().__init__(message)
        self.process = process


@dataclass
class LaunchedServer:
    process: subprocess.Popen[str]
    address: str                                        # host:port it listens on
    metrics_urls: list[str] = field(default_factory=list)  # one per serving process
    http_urls: list[str] = field(default_factory=list)     # Open Inference over HTTP, if on


def serve_command(*args: str, python: str = sys.executable) -> list[str]:
    """`convserve serve ARGS...` run by `python` (the one the caller runs, by default)."""
    return [python, "-m", "convserve.cli", "serve", *args]


def launch(command: Sequence[str], *, cwd: Path | None = None,
           env: Mapping[str, str] | None = None, stderr: int | IO[Any] = subprocess.DEVNULL,
           new_session: bool = False, timeout_s: float = START_TIMEOUT_S) -> LaunchedServer:
    """Run `command` and return once it says where it listens. Raises ServerStartError (and
    kills what it started) if it exits first or says nothing within `timeout_s`."""
    process = subprocess.Popen(list(command), cwd=cwd, env=None if env is None else dict(env),
                               stdout=subprocess.PIPE, stderr=stderr, stdin=subprocess.DEVNULL,
                               text=True, start_new_session=new_session)
    assert process.stdout is not None  # stdout=PIPE
    metrics: list[str] = []
    http: list[str] = []
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        line = process.stdout.readline()
        if line.startswith(METRICS_PREFIX):
            metrics.append(line.split()[-1])
        elif line.startswith(HTTP_PREFIX):
            http.append(line.split()[-1])
        elif line.startswith(LISTENING_PREFIX):
            return LaunchedServer(process, line.split()[-1], metrics, http)
        elif not line and process.poll() is not None:
            raise ServerStartError(f"the server exited with code {process.returncode} before "
                                   "it listened", process)
    process.kill()
    process.wait()
    raise ServerStartError(f"the server did not listen within {timeout_s:.0f} s", process)
