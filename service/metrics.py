"""Minimal Prometheus-style metrics: cumulative histograms rendered in the text exposition format.

Updated only from the event loop's thread, so no locks; `render` gives the text a /metrics
endpoint serves.
"""

from __future__ import annotations

import bisect
from collections.abc import Sequence


class Histogram:
    def __init__(self, name: str, help_text: str, buckets: Sequence[float]) -> None:
        if list(buckets) != sorted(buckets) or not buckets:
            raise ValueError(f"{name}: buckets must be ascending and non-empty, got {buckets}")
        self.name = name
        self.help = help_text
        self.buckets = tuple(buckets)
        self._counts = [0] * (len(self.buckets) + 1)  # the last one is +Inf
        self.count = 0
        self.sum = 0.0

    def observe(self, value: float) -> None:
        self._counts[bisect.bisect_left(self.buckets, value)] += 1
        self.count += 1
        self.sum += value

    def cumulative(self) -> list[tuple[str, int]]:
        """(upper bound, observations <= it), Prometheus' `le` buckets, ending with +Inf."""
        total, rows = 0, []
        for bound, count in zip((*map(_number, self.buckets), "+Inf"), self._counts, strict=True):
            total += count
            rows.append((bound, total))
        return rows

    def render(self) -> str:
        lines = [f"# HELP {self.name} {self.help}", f"# TYPE {self.name} histogram"]
        lines += [f'{self.name}_bucket{{le="{bound}"}} {count}'
                  for bound, count in self.cumulative()]
        lines += [f"{self.name}_sum {_number(self.sum)}", f"{self.name}_count {self.count}"]
        return "\n".join(lines) + "\n"


def _number(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else repr(float(value))
