"""Progress of a training run: the seeds' `enumerateWithEstimate`, JSON-lines events, a terminal bar.

Events go to `events.jsonl` (one JSON object per line, flushed per line; the format is
convserve.contracts.job_dir's) so that a parent process (the service's job runner) can follow a
run by tailing the file; the bar is for a person at a terminal. Neither asks the device for
anything, so reporting never forces a host sync.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO, TypeVar

from convserve.contracts.job_dir import event_line
from convserve.progress_bar import render_bar

T = TypeVar("T")


@dataclass(frozen=True)
class Estimate:
    done: int        # items finished so far
    total: int
    rate: float      # items per second since the first item finished
    eta_s: float     # seconds left at that rate


def enumerate_with_estimate(items: Iterable[T], total: int, *, start: int = 0) -> Iterator[
        tuple[int, T, Estimate | None]]:
    """Like `enumerate`, plus an estimate of the time left after each item.

    The clock starts when the first item is *finished*, not when it is asked for, so that a slow
    first step (torch.compile, cuDNN autotuning, page faults) does not distort the rate; the
    first two items, before any timed item has finished, get None.
    """
    clock_start = 0.0
    for index, item in enumerate(items, start=start):
        timed = index - start - 1  # items finished since the clock started
        estimate = None
        if timed > 0:
            elapsed = time.perf_counter() - clock_start
            rate = timed / elapsed if elapsed > 0 else 0.0
            eta = (total - index) / rate if rate > 0 else float("inf")
            estimate = Estimate(done=index, total=total, rate=rate, eta_s=eta)
        yield index, item, estimate
        if index == start:
            clock_start = time.perf_counter()


class ProgressReporter:
    """Writes events to a JSON-lines file and, when attached to a terminal, draws a progress bar."""

    def __init__(self, events_path: Path | None, terminal: TextIO | None = None,
                 min_interval_s: float = 1.0) -> None:
        self._file = None
        if events_path is not None:
            events_path.parent.mkdir(parents=True, exist_ok=True)
            self._file = events_path.open("ab")
        stream = terminal if terminal is not None else sys.stderr
        self._terminal = stream if stream.isatty() else None
        self._min_interval_s = min_interval_s
        self._last_progress = 0.0

    def event(self, kind: str, **fields: Any) -> None:
        if self._file:  # one whole line per flush (contracts.job_dir: the events' format)
            self._file.write(event_line(kind, **fields))
            self._file.flush()

    def progress(self, *, epoch: int, epochs: int, step: int, steps: int, images_per_s: float,
                 eta_s: float, force: bool = False) -> None:
        """A rate-limited progress event (at most one per `min_interval_s` unless forced)."""
        now = time.monotonic()
        if not force and now - self._last_progress < self._min_interval_s:
            return
        self._last_progress = now
        eta = round(eta_s, 1) if eta_s != float("inf") else None
        self.event("progress", epoch=epoch, epochs=epochs, step=step, steps=steps,
                   images_per_s=round(images_per_s, 1), eta_s=eta)
        if self._terminal:
            self._terminal.write("\r" + render_bar(step, steps, epoch, epochs, images_per_s, eta))
            self._terminal.flush()

    def line(self, text: str) -> None:
        """A human-readable line for the terminal (ends the current bar)."""
        if self._terminal:
            self._terminal.write("\r\033[K" + text + "\n")
            self._terminal.flush()

    def close(self) -> None:
        if self._file:
            self._file.close()
            self._file = None
