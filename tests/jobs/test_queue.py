"""The files store's queue folder (convserve.jobs.queue.JobQueue): one file per waiting job,
FIFO by queued-at, bounded under its lock."""

from __future__ import annotations

import threading
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from convserve.contracts.errors import LimitExceeded
from convserve.jobs.queue import LOCK_FILE, JobQueue
from tests.waits import wait_until

T0 = datetime(2026, 3, 1, 12, 0, 0, tzinfo=UTC)


def _at(seconds: float) -> str:
    return (T0 + timedelta(seconds=seconds)).isoformat(timespec="microseconds")


@pytest.fixture
def queue(tmp_path: Path) -> JobQueue:
    (tmp_path / "queue").mkdir()
    return JobQueue(tmp_path / "queue")


def test_jobs_come_out_in_queued_at_order_not_insertion_order(queue: JobQueue) -> None:
    queue.add("late", _at(10))
    queue.add("early", _at(0.000001))
    queue.add("middle", _at(5))
    queue.add("earliest", _at(0))
    assert queue.job_ids() == ["earliest", "early", "middle", "late"]
    assert queue.positions() == {"earliest": 1, "early": 2, "middle": 3, "late": 4}


def test_a_job_with_two_files_is_listed_once_at_its_older_place(queue: JobQueue) -> None:
    queue.add("a", _at(1))
    queue.add("b", _at(2))
    queue.add("a", _at(3))  # a crash between requeue steps left a second file for "a"
    assert len(list(queue.folder.iterdir())) == 3
    assert queue.job_ids() == ["a", "b"]
    queue.remove("a")       # removes every file of the job
    assert queue.job_ids() == ["b"] and len(list(queue.folder.iterdir())) == 1


def test_the_lock_and_stray_names_are_not_jobs(queue: JobQueue) -> None:
    queue.add("a", _at(1))
    (queue.folder / LOCK_FILE).touch()
    (queue.folder / ".20260301T120000000000.tmp").touch()  # hidden: a temporary
    (queue.folder / "nodot").touch()
    (queue.folder / "20260301T120000000000.").touch()     # no job id
    assert queue.job_ids() == ["a"]


def test_remove_of_a_job_not_queued_is_a_no_op(queue: JobQueue) -> None:
    queue.add("a", _at(1))
    queue.remove("zzz")
    queue.remove("a")
    queue.remove("a")
    assert queue.job_ids() == [] and queue.positions() == {}


def test_bounded_admits_below_the_limit_and_refuses_at_it(queue: JobQueue) -> None:
    for n in range(2):
        with queue.bounded(2):
            queue.add(f"job{n}", _at(n))
    with pytest.raises(LimitExceeded, match=r"training queue is full \(2 jobs waiting\)"), \
            queue.bounded(2):
        queue.add("job2", _at(2))
    assert queue.job_ids() == ["job0", "job1"]  # the refused job was never added
    queue.remove("job0")
    with queue.bounded(2):  # room again
        queue.add("job2", _at(2))
    assert queue.job_ids() == ["job1", "job2"]


def test_bounded_holds_the_queue_lock_while_a_job_is_added(queue: JobQueue) -> None:
    """A second replica's bounded() waits until the first one's add is done, so it counts it."""
    outcome: list[str] = []

    def second() -> None:
        try:
            with queue.bounded(1):
                outcome.append("admitted")
        except LimitExceeded:
            outcome.append("refused")

    with queue.bounded(1):
        thread = threading.Thread(target=second)
        thread.start()
        wait_until(lambda: _waiting_on(queue.folder / LOCK_FILE), "the second bounded() to block")
        assert outcome == []
        queue.add("first", _at(0))
    thread.join(30)
    assert outcome == ["refused"]


def _waiting_on(path: Path) -> bool:
    """Someone is blocked on flock(2) of `path` (a "->" line of /proc/locks names its inode)."""
    inode = path.stat().st_ino
    return any(line.split()[1] == "->" and line.split()[6].endswith(f":{inode}")
               for line in Path("/proc/locks").read_text().splitlines())
