"""Progress of a training run: the seeds' `enumerateWithEstimate`, JSON-lines events, a terminal bar.

Events go to `events.jsonl` (one JSON object per line, flushed per line; the format is
convserve.contracts.job_dir's) so that a parent process (the service's job runner) can follow a
run by tailing the file; the bar is for a person at a terminal. Neither asks the device for
anything, so reporting never forces a host sync.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from convserve.progress_bar import ProgressDisplay
from convserve.store.job_dir import event_line

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
    """Writes events to a JSON-lines file and shows them to a person through `display` (a bar on
    a terminal, lines elsewhere); without a display, nothing is shown (tests, library use)."""

    def __init__(self, events_path: Path | None, display: ProgressDisplay | None = None,
                 min_interval_s: float = 1.0) -> None:
        self._file = None
        if events_path is not None:
            events_path.parent.mkdir(parents=True, exist_ok=True)
            self._file = events_path.open("ab")
        self._display = display
        self._min_interval_s = min_interval_s
        self._last_progress = 0.0

    def event(self, kind: str, **fields: Any) -> None:
        if self._file:  # one whole line per flush (contracts.job_dir: the events' format)
            self._file.write(event_line(kind, **fields))
            self._file.flush()
        if self._display and kind == "state" and isinstance(fields.get("state"), str):
            phase = fields["state"].lower().replace("_", " ")  # LOADING_DATA: "loading data"
            self._display.line(phase + (f": {fields['error']}" if fields.get("error") else ""))

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
        if self._display:
            self._display.progress(step, steps, epoch, epochs, images_per_s, eta)

    def line(self, text: str) -> None:
        """A human-readable line: above the bar on a terminal, a plain line elsewhere."""
        if self._display:
            self._display.line(text)

    def close(self) -> None:
        if self._display:
            self._display.close()
        if self._file:
            self._file.close()
            self._file = None
