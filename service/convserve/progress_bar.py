"""What a person sees of a training run, drawn by the training CLI and by `convserve train --watch`:
on a terminal, one tqdm bar per epoch redrawn in place, with event lines printed above it; in a
log or a pipe, the lines only (each phase and each epoch), never a bar.

tqdm rather than a hand-written `\\r` bar: it pads each redraw over the last one (a shorter line
no longer leaves "ETA 00:375" behind), clears the bar before a line is written above it, and
adapts to the terminal's width. It is small and pure Python, so the bare SDK install carries it.
"""

from __future__ import annotations

import os
import sys
from typing import TextIO

from tqdm import tqdm

BAR_FORMAT = "{desc} [{bar:30}] step {n}/{total}{postfix}"  # postfix: ", 1,234 img/s ETA 00:42"


class ProgressDisplay:
    """`lines`: where event lines go (default stdout); `bar`: the stream the bar is drawn on when
    it is a terminal (default stderr; none otherwise)."""

    def __init__(self, lines: TextIO | None = None, bar: TextIO | None = None) -> None:
        self._lines = lines if lines is not None else sys.stdout
        stream = bar if bar is not None else sys.stderr
        self._bar_stream = stream if stream.isatty() else None
        self._bar: tqdm | None = None
        self._epoch = 0

    @property
    def draws_a_bar(self) -> bool:
        return self._bar_stream is not None

    def progress(self, step: int, steps: int, epoch: int, epochs: int, images_per_s: float,
                 eta_s: float | None) -> None:
        if self._bar_stream is None:
            return
        if self._bar is None or epoch != self._epoch or self._bar.total != steps:
            self._close_bar()
            self._bar = tqdm(total=steps, desc=f"epoch {epoch}/{epochs}", file=self._bar_stream,
                             bar_format=BAR_FORMAT, ascii=".#", leave=False, mininterval=0,
                             **_size(self._bar_stream))
            self._epoch = epoch
        self._bar.n = step
        eta = "--:--" if eta_s is None else clock(eta_s)
        self._bar.set_postfix_str(f"{images_per_s:,.0f} img/s ETA {eta}", refresh=False)
        self._bar.refresh()

    def line(self, text: str) -> None:
        """A line above the bar (the bar is cleared first and redrawn after)."""
        if self._bar is not None:
            tqdm.write(text, file=self._lines)
        else:
            print(text, file=self._lines, flush=True)

    def close(self) -> None:
        self._close_bar()

    def _close_bar(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None


def _size(stream: TextIO) -> dict[str, int]:
    """The terminal's size for tqdm; 100 x 24 where it reports none. A fresh pseudo-terminal
    says 0 x 0, and tqdm hides a bar whose row is beyond the screen's last."""
    try:
        size = os.get_terminal_size(stream.fileno())
    except (OSError, ValueError):
        return {"ncols": 100, "nrows": 24}
    return {"ncols": size.columns or 100, "nrows": size.lines or 24}


def clock(seconds: float) -> str:
    minutes, secs = divmod(int(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes:02d}:{secs:02d}"
