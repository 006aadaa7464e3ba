"""Progress estimates and machine-readable events."""

import io
import json
import os
import pty
import select
import time
from pathlib import Path

from convserve.progress_bar import ProgressDisplay
from convserve.store.job_dir import read_events
from convserve.training.progress import ProgressReporter, enumerate_with_estimate
from tests.terminal import screen_of


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
    shown = io.StringIO()  # not a terminal: lines, no bar
    reporter = ProgressReporter(path, ProgressDisplay(lines=shown, bar=shown), min_interval_s=60)
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
    assert shown.getvalue() == "training\n"  # the phase as a line; no bar in a pipe


def test_a_line_still_being_written_is_not_read(tmp_path: Path) -> None:
    path = tmp_path / "events.jsonl"
    path.write_text('{"type": "state"}\n{"type": "prog')
    assert read_events(path) == [{"type": "state"}]
    path.write_text('{"type": "state"}\n{"type": "pro\n{"type": "epoch"}\n')  # a torn line
    assert read_events(path) == [{"type": "state"}, {"type": "epoch"}]


def test_the_bar_redraws_in_place_on_a_terminal_and_lines_go_above_it() -> None:
    """A real pseudo-terminal: each redraw covers the last one entirely (a shorter ETA leaves no
    digits behind), an event line is printed whole above the bar, and closing clears the bar."""
    leader, follower = pty.openpty()
    terminal = os.fdopen(follower, "w")
    display = ProgressDisplay(lines=terminal, bar=terminal)
    assert display.draws_a_bar
    display.progress(1, 4, 1, 2, 1234.5, 3605.0)   # ETA 1:00:05
    display.progress(2, 4, 1, 2, 1234.5, 5.0)      # ETA 00:05: shorter than the last
    after_redraw = screen_of(_drain(leader))
    display.line("epoch 1/2 val accuracy 0.5000")
    display.progress(1, 4, 2, 2, 99.0, None)
    display.close()
    terminal.flush()
    final = screen_of(_drain(leader))
    os.close(leader)
    assert after_redraw[-1] == ("epoch 1/2 [###############...............] step 2/4, "
                                "1,234 img/s ETA 00:05")
    assert final[0] == "epoch 1/2 val accuracy 0.5000"  # whole, no bar left on its line
    assert final[1:] == [""]  # the closed bar leaves nothing behind


def test_no_bar_in_a_pipe_only_lines() -> None:
    piped = io.StringIO()
    display = ProgressDisplay(lines=piped, bar=piped)
    display.progress(1, 4, 1, 2, 1234.5, 5.0)
    display.line("epoch 1/2 val accuracy 0.5000")
    display.close()
    assert not display.draws_a_bar and piped.getvalue() == "epoch 1/2 val accuracy 0.5000\n"


def _drain(fd: int) -> str:
    chunks = []
    while select.select([fd], [], [], 0.2)[0]:
        chunks.append(os.read(fd, 65536))
    return b"".join(chunks).decode()
