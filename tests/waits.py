"""Bounded waits for events another thread or process produces.

A test waits for what it claims (a state, a log line, a file), never for a length of time. The
limit only bounds a failure, so it is generous: a loaded 2-core CI machine must never reach it
when all is well.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

T = TypeVar("T")
DEFAULT_LIMIT_S = 60.0


def wait_until(condition: Callable[[], T], what: str, timeout: float = DEFAULT_LIMIT_S,
               interval: float = 0.05) -> T:
    """Poll `condition` until it returns something truthy, and return that; fail naming `what`
    once `timeout` seconds have passed."""
    deadline = time.monotonic() + timeout
    while not (result := condition()):
        if time.monotonic() > deadline:
            raise AssertionError(f"gave up waiting for {what} after {timeout:.0f} s")
        time.sleep(interval)
    return result


async def until(condition: Callable[[], T], what: str, timeout: float = DEFAULT_LIMIT_S,
                interval: float = 0.002) -> T:
    """`wait_until` for a coroutine: checks `condition` between turns of the event loop, so the
    tasks (and worker threads) that make it true keep running; fails naming `what`."""
    deadline = time.monotonic() + timeout
    while not (result := condition()):
        if time.monotonic() > deadline:
            raise AssertionError(f"gave up waiting for {what} after {timeout:.0f} s")
        await asyncio.sleep(interval)
    return result


def process_alive(pid: int) -> bool:
    """True while `pid` runs: neither gone nor a zombie waiting to be reaped."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[-1].split()[0] != "Z"


def started(pid: int) -> None:
    """Wait until a just-started process runs its own program: Popen may return while the
    kernel still sets it up (vfork), and its command line reads empty until then."""
    wait_until(lambda: Path(f"/proc/{pid}/cmdline").read_bytes(), f"process {pid} to start")
