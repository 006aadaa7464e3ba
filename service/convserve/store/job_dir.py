"""A job's directory, its states and its events: the one owner of that format.

    jobs/<id>/                 in the model store (convserve.store.directory.ModelStore.job_dir)
        job.json               the record (convserve.jobs); replaced atomically
        spec.json              what the training process runs: training spec, gate policy, store
                               (convserve.store.job_spec); written before each start
        events.jsonl           what happened, one JSON object per line: the runner's state changes
                               and the training process's own events (progress, epochs, gate);
                               every writer appends whole lines in O_APPEND mode
        cancel.requested       marker: some replica was asked to cancel the job
        claim                  "<attempt> <trainer>": the attempt that holds the job now, written
                               by the trainer that claimed it; a training process of an older
                               attempt must not publish (convserve.training.pipeline checks)
        .lock                  flock(2) lock: every change of job.json is made under it
        stdout.log, stderr.log the training process's output
        card.json, model.onnx, tensorboard/, checkpoints/last.pt
                               the training run's (`python -m convserve.training --out DIR` writes
                               the same run layout without a job)

Standard library only: the server, the SDK and the training process all import it.
"""

from __future__ import annotations

import contextlib
import json
import os
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from convserve.contracts.errors import ClaimLost
from convserve.store.durable_files import replace_file

RECORD_FILE = "job.json"
EVENTS_FILE = "events.jsonl"
CANCEL_MARKER = "cancel.requested"
CLAIM_FILE = "claim"
LOCK_FILE = ".lock"
STDOUT_FILE = "stdout.log"
STDERR_FILE = "stderr.log"
CARD_FILE = "card.json"
MODEL_FILE = "model.onnx"
TENSORBOARD_DIR = "tensorboard"
CHECKPOINT_FILE = Path("checkpoints") / "last.pt"


def checkpoint_path(run_dir: Path) -> Path:
    return run_dir / CHECKPOINT_FILE


def job_artifacts(run_dir: Path) -> list[Path]:
    """What a job's next attempt resumes from, on whichever trainer: the last checkpoint and the
    TensorBoard event files (convserve.store.base.ModelStore.save_job_files)."""
    board = run_dir / TENSORBOARD_DIR
    found = [checkpoint_path(run_dir)] if checkpoint_path(run_dir).is_file() else []
    return found + sorted(p for p in board.rglob("*") if p.is_file()) if board.is_dir() else found


def write_claim(job_dir: Path, attempt: int, trainer: str) -> None:
    replace_file(job_dir / CLAIM_FILE, f"{attempt} {trainer}\n")


def check_claim(job_dir: Path, attempt: int) -> None:
    """Raise ClaimLost unless attempt `attempt` still holds the job (the fencing token a training
    process checks under the store's lock before it publishes)."""
    try:
        holder = (job_dir / CLAIM_FILE).read_text(encoding="utf-8").strip()
    except OSError:
        holder = ""
    if holder.split(" ", 1)[0] != str(attempt):
        raise ClaimLost(f"attempt {attempt} of job {job_dir.name} no longer holds it (now: "
                        f"{holder or 'nobody'}): its trainer was declared dead and the job went "
                        "back to the queue; this attempt does not publish")


def timestamp() -> str:
    return datetime.now(UTC).isoformat(timespec="microseconds")  # orders jobs made back to back


def event_line(kind: str, **fields: Any) -> bytes:
    """One event as its line: time and type first, then the fields (arrays as lists)."""
    record = {"time": timestamp(), "type": kind, **fields}
    return json.dumps(record, allow_nan=False, default=_plain).encode() + b"\n"


def append_event(path: Path, kind: str, **fields: Any) -> None:
    """Append one event with one write(2) in O_APPEND mode: never interleaved with another
    writer's line. After a writer killed mid-line, the new line starts on a line of its own."""
    line = event_line(kind, **fields)
    fd = os.open(path, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        size = os.fstat(fd).st_size
        if size and os.pread(fd, 1, size - 1) != b"\n":
            line = b"\n" + line
        os.write(fd, line)
    finally:
        os.close(fd)


def read_events(path: Path) -> list[dict[str, Any]]:
    """All complete events in a file. A line still being written is skipped, and so is a line
    torn by a process killed mid-write (the next writer starts on a fresh line)."""
    return [event for _, event in EventTail(path).read() if event is not None]


class EventTail:
    """Follows an events file: complete lines only, numbered from 1 (None: unreadable)."""

    def __init__(self, path: Path, *, from_end: bool = False) -> None:
        """`from_end`: only lines appended from now on."""
        self.path = path
        self._offset = 0
        if from_end:
            with contextlib.suppress(FileNotFoundError):
                self._offset = path.stat().st_size
        self._sequence = 0
        self._partial = b""

    def read(self) -> list[tuple[int, dict[str, Any] | None]]:
        try:
            with self.path.open("rb") as handle:
                handle.seek(self._offset)
                chunk = handle.read()
        except FileNotFoundError:
            return []
        self._offset += len(chunk)
        lines = (self._partial + chunk).split(b"\n")
        self._partial = lines.pop()  # an unfinished line waits for its newline
        found = []
        for line in lines:
            self._sequence += 1
            found.append((self._sequence, _parse(line)))
        return found


def last_state(path: Path) -> str | None:
    """The state of the last "state" event: a JobState name or a Phase name."""
    states = [e.get("state") for e in read_events(path) if e.get("type") == "state"]
    return str(states[-1]) if states else None


def _parse(line: bytes) -> dict[str, Any] | None:
    with contextlib.suppress(ValueError):
        event = json.loads(line)
        if isinstance(event, dict):
            return event
    return None


def _plain(value: Any) -> Any:
    if hasattr(value, "tolist"):  # numpy arrays and scalars
        return value.tolist()
    raise TypeError(f"not JSON-serialisable: {type(value).__name__}")
