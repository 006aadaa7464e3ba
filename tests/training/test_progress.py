"""Progress estimates and machine-readable events."""

import io
import json
import time
from pathlib import Path

from convserve.contracts.job_dir import read_events
from convserve.progress_bar import render_bar
from convserve.training.progress import ProgressReporter, enumerate_with_estimate


def test_estimate_starts_after_the_first_item_and_counts_down() -> None:
    estimates = []
    for index, item, estimate in enumerate_with_estimate(iter("abcde"), total=5):
        assert item == "abcde"[index]
        estimates.append(estimate)
        time.sleep(0.01)
    # The first item (compile, warm-up) is not timed, so there is nothing to estimate from
    # until a second one has finished.
    assert estimates[:2] == [None, None]
    assert [e.done for e in estimates[2:]] == [2, 3, 4]
    assert all(0 < e.rate < 150 for e in estimates[2:])  # at most one item per 10 ms sleep
    assert estimates[-1].eta_s < estimates[2].eta_s


def test_reporter_writes_json_lines_and_rate_limits_progress(tmp_path: Path) -> None:
    path = tmp_path / "events.jsonl"
    reporter = ProgressReporter(path, terminal=io.StringIO(), min_interval_s=60)
    reporter.event("state", state="TRAINING")
    for step in range(1, 4):
        reporter.progress(epoch=1, epochs=2, step=step, steps=3, images_per_s=100.0, eta_s=5.0)
    reporter.progress(epoch=1, epochs=2, step=3, steps=3, images_per_s=100.0,
                      eta_s=float("inf"), force=True)
    reporter.close()
    events = read_events(path)
    assert [e["type"] for e in events] == ["state", "progress", "progress"]
    assert events[1]["step"] == 1 and events[1]["eta_s"] == 5.0
    assert events[2]["eta_s"] is None  # an unknown ETA is null, never Infinity (invalid JSON)
    for line in path.read_text().splitlines():
        json.loads(line)


def test_a_line_still_being_written_is_not_read(tmp_path: Path) -> None:
    path = tmp_path / "events.jsonl"
    path.write_text('{"type": "state"}\n{"type": "prog')
    assert read_events(path) == [{"type": "state"}]
    path.write_text('{"type": "state"}\n{"type": "pro\n{"type": "epoch"}\n')  # a torn line
    assert read_events(path) == [{"type": "state"}, {"type": "epoch"}]


def test_progress_bar() -> None:
    bar = render_bar(step=5, steps=10, epoch=2, epochs=3, images_per_s=1234.5, eta_s=75,
                     width=10)
    assert bar == "[#####.....] epoch 2/3 step 5/10 1,234 img/s ETA 01:15"
