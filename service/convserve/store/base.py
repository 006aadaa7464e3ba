"""The model store's interface and the values it hands out, shared by both backends.

A store holds immutable versions (N = 1, 2, ...), each a model file with its card; one promoted
pointer; an append-only promotion history; and each job's artifacts (checkpoints, TensorBoard
event files) where another trainer can resume from them. What both backends guarantee, and
tests/store/test_contract.py checks on each:

* A version appears whole or not at all, and one number is never handed out twice.
* Only a promoted candidate is published: a rejected one leaves no version behind.
* The pointer always names a complete version, and moves only from the champion that the
  candidate was compared with (`publish` re-decides when another promotion got there first).
* History ends at the promoted version, even after a writer died between the two.

Standard library only.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

from convserve.contracts.errors import IntegrityError, StoreError, VersionNotFound
from convserve.contracts.model_card import GateDecision, ModelCard
from convserve.store.work_dir import WorkDir

if TYPE_CHECKING:
    from convserve.store.location import StoreLocation

MODEL_FILE = "model.onnx"
CARD_FILE = "card.json"
RECOVERY_ACTOR = "store:recovery"
HISTORY_KEYS = ("version", "previous", "reason", "time", "actor")
# What `publish` calls its caller back with: the champion it must beat (None: there is none).
Decide = Callable[[int | None], GateDecision]


@dataclass(frozen=True)
class HistoryEntry:
    version: int
    previous: int | None
    reason: str
    time: str
    actor: str

    def to_dict(self) -> dict[str, object]:
        return {key: getattr(self, key) for key in HISTORY_KEYS}


@dataclass(frozen=True)
class PublishResult:
    promoted: bool
    version: int | None  # set only when promoted
    previous: int | None  # champion at decision time
    decision: GateDecision


@dataclass(frozen=True)
class OpenedVersion:
    """A version as a local file whose sha256 matched its card, read together once."""

    version: int
    path: Path
    card: ModelCard


class ModelStore(Protocol):
    url: str                  # what messages name: a directory, or s3://bucket/prefix
    location: StoreLocation   # how a training process opens the same store
    work: WorkDir             # local job directories and the files job queue

    def check(self) -> None:
        """Raise StoreError (wrong credentials, no such bucket) or Unavailable (unreachable)."""

    def versions(self) -> list[int]:
        """Complete versions, ascending."""

    def promoted_version(self) -> int | None:
        """The promoted version, or None before the first promotion. Cheap: polled by replicas."""

    def card(self, version: int) -> dict:
        """The card as JSON (VersionNotFound, IntegrityError)."""

    def model_card(self, version: int) -> ModelCard:
        """The card as typed fields (the whole JSON object in `.raw`)."""

    def open_version(self, version: int) -> OpenedVersion:
        """The version's model as a local file checked against its card's sha256."""

    def history(self) -> list[HistoryEntry]:
        """Every promotion, oldest first."""

    def publish(self, model_file: Path, card: dict, decide: Decide, *, actor: str,
                job_id: str | None = None) -> PublishResult:
        """Ask `decide(champion)`; if it promotes, store the model as a new version and point at
        it, unless the pointer moved meanwhile, in which case ask again with the new champion."""

    def promote(self, version: int, *, reason: str, actor: str) -> HistoryEntry:
        """Point at an existing, intact version (an operator's rollback or pin)."""

    def import_version(self, version: int, model_file: Path, card: dict) -> None:
        """Add version `version` exactly as given (a copy from another store); StoreError when
        the number is taken or the file does not hash to the card's sha256."""

    def import_history(self, entries: Sequence[HistoryEntry]) -> None:
        """Write a copied history into a store that has none, and point at its last version."""

    def save_job_files(self, job_id: str, run_dir: Path, paths: Sequence[Path]) -> None:
        """Make these files of a job's run (checkpoints, TensorBoard events) durable where another
        trainer resumes from them."""

    def restore_job_files(self, job_id: str, run_dir: Path) -> None:
        """Bring a job's saved files into `run_dir` (a trainer resuming on another machine)."""


def crash_point(name: str) -> None:
    """A named point inside `publish` ("copy", "before_rename", "before_pointer",
    "before_history", "upload"). Nothing happens here; the crash-safety tests' worker process
    (tests/store_worker.py --crash-at) replaces it to die there by SIGKILL."""


def utc_now() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds")


def require_text(value: object, what: str) -> str:
    if not isinstance(value, str) or not value.strip():
        raise StoreError(f"{what} must be a non-empty string, got {value!r}")
    return value


def check_decision(decision: object) -> GateDecision:
    if not isinstance(decision, GateDecision):
        raise StoreError(f"decide() must return a GateDecision, got {type(decision).__name__}")
    return decision


def check_publish_args(model_file: Path, card: object, actor: object) -> None:
    if not model_file.is_file():
        raise StoreError(f"expected a model file to publish, found nothing at {model_file}")
    if not isinstance(card, dict):
        raise StoreError(f"card must be a dict, got {type(card).__name__}")
    require_text(actor, "actor")


def check_version(version: object) -> int:
    if not isinstance(version, int) or isinstance(version, bool) or version < 1:
        raise VersionNotFound(f"expected a positive integer version, got {version!r}")
    return version


def card_text(card: dict) -> str:
    try:
        return json.dumps(card, indent=2, sort_keys=True) + "\n"
    except (TypeError, ValueError) as exc:
        raise StoreError(f"expected a JSON-serialisable card: {exc}") from None


def check_import(version: int, model_file: Path, card: dict, sha256: str) -> str:
    """The card's text for an imported version, once the file matched the card's sha256."""
    check_version(version)
    if card.get("sha256") != sha256 or card.get("version") != version:
        raise IntegrityError(f"version {version}: the card (version {card.get('version')!r}, "
                             f"sha256 {card.get('sha256')!r}) does not match {model_file} "
                             f"(sha256 {sha256!r})")
    return card_text(card)


def full_card(card: dict, version: int, decision: GateDecision, job_id: str | None,
              sha256: str) -> str:
    """The card as stored: the caller's fields plus what the store knows, as JSON text."""
    return card_text({**card, "version": version, "created_at": utc_now(), "job_id": job_id,
                      "gate": decision.to_dict(), "sha256": sha256})


def parse_card(text: str | bytes, version: int, where: str) -> dict:
    try:
        card = json.loads(text)
    except ValueError as exc:
        raise IntegrityError(f"version {version}: expected a JSON card at {where}: {exc}") from None
    if not isinstance(card, dict):
        raise IntegrityError(f"version {version}: expected a JSON object in {where}, got {card!r}")
    return card


def parse_history_entry(text: str | bytes, where: str) -> HistoryEntry:
    try:
        raw = json.loads(text)
        fields = {key: raw[key] for key in HISTORY_KEYS}
    except (ValueError, KeyError, TypeError) as exc:
        raise IntegrityError(
            f"{where}: expected a JSON object with keys {HISTORY_KEYS}, got {str(text)[:80]!r} "
            f"({exc})") from None
    return HistoryEntry(**fields)
