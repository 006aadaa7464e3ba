"""Telling a job's training process by its command line, as the runner starts it."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from convserve.jobs.process_group import is_training_process
from tests.waits import started


def test_a_training_process_is_known_by_the_job_directory_it_names(tmp_path: Path) -> None:
    job_dir = tmp_path / "store" / "jobs" / "abc123"
    # The runner's command line: `python -m convserve.training --job <store>/jobs/<id>`.
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)",
                              "convserve.training", "--job", str(job_dir)])
    try:
        started(child.pid)
        assert is_training_process(child.pid, "abc123")
        assert not is_training_process(child.pid, "abc12")  # another job, a prefix of its id
        assert not is_training_process(child.pid, "jobs")
    finally:
        child.kill()
        child.wait()
    assert not is_training_process(child.pid, "abc123")  # gone
