"""The local working directory of a replica or a training process: job directories (records,
events, logs, the training run) and the files job store's queue.

With the directory store it is the store's own directory (one shared volume, as before); with
object storage it is local to each replica (`--work-dir`), and what another machine must see (the
model, checkpoints, TensorBoard event files) goes to the store. Standard library only.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from convserve.contracts.errors import InvalidJobId

_JOB_ID_RE = re.compile(r"[A-Za-z0-9_-]{1,64}")


def check_job_id(job_id: object) -> str:
    if not isinstance(job_id, str) or not _JOB_ID_RE.fullmatch(job_id):
        raise InvalidJobId(f"job id must match [A-Za-z0-9_-]{{1,64}}, got {job_id!r}")
    return job_id


class WorkDir:
    """`jobs/<id>/` and `queue/` under `root` (created if missing)."""

    def __init__(self, root: Path | str) -> None:
        self.root = Path(root)
        self.jobs_dir = self.root / "jobs"
        self.queue_dir = self.root / "queue"
        for folder in (self.jobs_dir, self.queue_dir):
            folder.mkdir(parents=True, exist_ok=True)

    def job_dir(self, job_id: str, *, create: bool = False) -> Path:
        path = self.jobs_dir / check_job_id(job_id)
        if create:
            path.mkdir(parents=True, exist_ok=True)
        return path

    def job_ids(self) -> list[str]:
        return sorted(e.name for e in os.scandir(self.jobs_dir)
                      if _JOB_ID_RE.fullmatch(e.name) and e.is_dir())
