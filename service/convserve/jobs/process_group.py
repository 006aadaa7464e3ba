"""Signals to a job's process group, and telling a job's training process by its command line."""

from __future__ import annotations

import contextlib
import os
import signal
from pathlib import Path


def signal_group(pid: int, sig: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, sig)


def is_training_process(pid: int, job_id: str) -> bool:
    """A live (not zombie) process running this job's training, by its command line."""
    try:
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    zombie = stat.rsplit(")", 1)[-1].split()[:1] == ["Z"]
    # A job's child names its job directory (`--job <store>/jobs/<id>`), whose last part is the id.
    names = {os.path.basename(arg.rstrip(b"/")) for arg in argv}
    return not zombie and b"convserve.training" in argv and job_id.encode() in names

