"""One check of what progress events promise, for the training run in-process and over WatchJob."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any


def assert_rates_and_a_countdown(progress: Sequence[Mapping[str, Any]], batch_size: int) -> None:
    """Every event has images/s and an ETA, and the ETA is the work left at the event's own rate:
    ETA x steps per second is the steps still to run (this one included), so it counts down
    step by step to the end of the last epoch. A rate that wobbles on a shared machine moves the
    ETA in seconds but not this count, which is what is checked."""
    assert progress, "no progress events"
    for event in progress:
        assert event["images_per_s"] > 0 and event["eta_s"] is not None, event
        steps_per_s = event["images_per_s"] / batch_size
        left = (event["steps"] - event["step"] + 1) + (event["epochs"] - event["epoch"]) * \
            event["steps"]
        # The event rounds eta_s to 0.1 s: up to 0.05 s of steps either way.
        assert abs(event["eta_s"] * steps_per_s - left) <= 0.05 * steps_per_s + 0.01 * left + 0.5, \
            (event, left)
    lefts = [(e["epochs"] - e["epoch"], e["steps"] - e["step"]) for e in progress]
    assert lefts == sorted(lefts, reverse=True) and len(set(lefts)) == len(lefts), lefts
    assert lefts[-1] == (0, 0), "the last step of the last epoch reports progress too"
