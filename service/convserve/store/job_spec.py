"""spec.json: everything a job's training process needs, written by the job runner into the job
directory and read by `python -m convserve.training --job DIR`. Replaces a command line of flags
that the runner built and the child parsed back. Standard library only."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from convserve.contracts.errors import ConfigError
from convserve.contracts.gate_policy import GatePolicy
from convserve.contracts.spec import TrainConfig
from convserve.store.durable_files import replace_file
from convserve.store.location import StoreLocation

SPEC_FILE = "spec.json"  # in the job's directory (convserve.store.job_dir)
FORMAT = 1


@dataclass(frozen=True)
class JobSpec:
    job_id: str
    config: TrainConfig
    gate: GatePolicy
    store: StoreLocation              # the model store the gate publishes to
    progress_interval_s: float = 1.0  # at most one progress event per interval
    attempt: int = 0                  # the claim it runs under (0: unfenced), job_dir.check_claim

    def write(self, job_dir: Path) -> None:
        """Atomically: a child started after a crash never reads half a file."""
        body = {"format": FORMAT, "job_id": self.job_id, "config": self.config.to_dict(),
                "gate": self.gate.to_dict(), "store": self.store.url,
                "s3_endpoint_url": self.store.s3_endpoint_url, "work_dir": self.store.work_dir,
                "progress_interval_s": self.progress_interval_s, "attempt": self.attempt}
        replace_file(job_dir / SPEC_FILE, json.dumps(body, indent=2, sort_keys=True) + "\n")


def read_job_spec(job_dir: Path) -> JobSpec:
    path = job_dir / SPEC_FILE
    try:
        body: dict[str, Any] = json.loads(path.read_text(encoding="utf-8"))
        if body.get("format") != FORMAT:
            raise ConfigError(f"{path}: format {body.get('format')!r}, expected {FORMAT}")
        return JobSpec(job_id=str(body["job_id"]), config=TrainConfig.from_dict(body["config"]),
                       gate=GatePolicy(**body["gate"]),
                       store=StoreLocation(str(body["store"]), str(body.get("s3_endpoint_url", "")),
                                           str(body.get("work_dir", ""))),
                       progress_interval_s=float(body["progress_interval_s"]),
                       attempt=int(body.get("attempt", 0)))
    except (OSError, ValueError, KeyError, TypeError) as error:
        if isinstance(error, ConfigError):
            raise
        raise ConfigError(f"cannot read the job spec {path}: {error}") from None
