"""Versioned model store shared by every server replica and the training process.

Standard library only: the torch-free server and the training child both import this module,
so it must never pull in torch, numpy or onnxruntime.

Layout under ``root``::

    models/<N>/model.onnx   immutable version N (N = 1, 2, ...), read-only (0o444) once written
    models/<N>/card.json    model card: the caller's fields plus version, sha256 (of model.onnx),
                            created_at (UTC ISO-8601), job_id and gate (the promotion decision)
    models/PROMOTED         the promoted version number; replaced atomically
    models/history.jsonl    append-only promotion history, one JSON object per line:
                            {"version", "previous", "reason", "time", "actor"}
    models/.lock            flock(2) lock file serialising promotions across processes/replicas
    models/.tmp-*           in-progress version directories (never listed as versions)
    jobs/<id>/              job directories (records, events, logs, checkpoints, candidates)
    queue/                  the jobs waiting for a trainer, one empty file each (convserve.jobs.queue)

Guarantees:

* A version appears completely or not at all: it is assembled in ``models/.tmp-*``, fsynced and
  renamed into place. Stale temp dirs left by a killed process are ignored by readers and removed
  by the next publish.
* Only promoted versions are written: a rejected candidate leaves ``models/`` untouched.
* ``PROMOTED`` always names a complete version (it is replaced only after the version is durable).
* Promotion decisions are serialised: ``publish`` calls the caller's ``decide`` under the
  exclusive lock with the champion read under that same lock, so two concurrent jobs can never
  both beat a stale champion.
* Version numbers are never reused: the next number is above every numbered entry in
  ``models/`` and every version the history has recorded.
* If a process dies between moving the pointer and appending history, the next promotion under
  the lock appends a recovery entry, so history always ends at the promoted version.

Readers (``versions``, ``promoted_version``, ``card``, ``verify``, ``history``) take no lock: every
write they could observe is an atomic rename or an append of one newline-terminated line.
``decide`` runs under the lock and must not call ``publish`` or ``promote`` (it would deadlock).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import tempfile
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager
from pathlib import Path

from convserve.contracts.errors import IntegrityError, StoreError, VersionNotFound
from convserve.contracts.model_card import ModelCard
from convserve.store import base
from convserve.store.base import (
    CARD_FILE,
    MODEL_FILE,
    RECOVERY_ACTOR,
    Decide,
    HistoryEntry,
    OpenedVersion,
    PublishResult,
    check_decision,
    check_import,
    check_publish_args,
    check_version,
    full_card,
    parse_card,
    parse_history_entry,
    require_text,
    utc_now,
)
from convserve.store.durable_files import (
    CHUNK_SIZE,
    append_line,
    fsync_dir,
    locked,
    replace_file,
    sha256_file,
    write_read_only,
)
from convserve.store.location import StoreLocation
from convserve.store.work_dir import WorkDir, check_job_id

POINTER_FILE = "PROMOTED"
HISTORY_FILE = "history.jsonl"
LOCK_FILE = ".lock"
TMP_PREFIX = ".tmp-"
_VERSION_RE = re.compile(r"[1-9][0-9]*")


class DirectoryStore:
    """A directory of immutable model versions with an atomically replaced promotion pointer."""

    def __init__(self, root: Path | str, *, work_dir: Path | str | None = None) -> None:
        self.root = Path(root)
        self.url = str(self.root)
        self.location = StoreLocation(self.url, work_dir=str(work_dir or ""))
        self.models_dir = self.root / "models"
        self.models_dir.mkdir(parents=True, exist_ok=True)
        # By default one shared directory: job directories and the queue live beside models/.
        self.work = WorkDir(work_dir or self.root)

    def check(self) -> None:
        """Nothing to reach: the directory exists (it was created above)."""

    # ----------------------------------------------------------------------------- reading

    def versions(self) -> list[int]:
        """Complete versions, ascending (temp dirs and other entries are skipped)."""
        found = []
        for entry in os.scandir(self.models_dir):
            if _VERSION_RE.fullmatch(entry.name) and entry.is_dir():
                found.append(int(entry.name))
        return sorted(found)

    def promoted_version(self) -> int | None:
        """The promoted version, or None before the first promotion. Cheap: polled by replicas."""
        version = self._read_pointer()
        if version is not None and not self._version_dir(version).is_dir():
            raise IntegrityError(
                f"PROMOTED names version {version} but {self._version_dir(version)} does not exist"
            )
        return version

    def card(self, version: int) -> dict:
        path = self._existing_version_dir(version) / CARD_FILE
        try:
            text = path.read_text(encoding="utf-8")
        except OSError as exc:
            raise IntegrityError(f"version {version}: expected a readable card at {path}: {exc}"
                                 ) from None
        return parse_card(text, version, str(path))

    def model_card(self, version: int) -> ModelCard:
        """The card as typed fields (the whole JSON object in `.raw`)."""
        return ModelCard.from_dict(self.card(version))

    def model_path(self, version: int) -> Path:
        """Where version's model.onnx lies (unchecked: open_version checks it)."""
        return self._existing_version_dir(version) / MODEL_FILE

    def open_version(self, version: int) -> OpenedVersion:
        """model.onnx checked against the card's sha256, with that card (read once)."""
        card = self.card(version)
        path = self.model_path(version)
        try:
            actual = sha256_file(path)
        except OSError as exc:
            raise IntegrityError(f"version {version}: expected a readable {path}: {exc}") from None
        if actual != card.get("sha256"):
            raise IntegrityError(
                f"version {version}: card sha256 {card.get('sha256')!r} but model.onnx hashes to "
                f"{actual!r}"
            )
        return OpenedVersion(version, path, ModelCard.from_dict(card))

    def history(self) -> list[HistoryEntry]:
        try:
            text = (self.models_dir / HISTORY_FILE).read_text(encoding="utf-8")
        except FileNotFoundError:
            return []
        lines = text.split("\n")
        # The last piece has no newline: either "" or a line torn by a crash mid-append, which
        # was never committed (the next append truncates it).
        return [parse_history_entry(line, f"history line {n}")
                for n, line in enumerate(lines[:-1], 1) if line]

    # ----------------------------------------------------------------------------- writing

    def publish(self, model_file: Path, card: dict, decide: Decide, *, actor: str,
                job_id: str | None = None) -> PublishResult:
        """Ask ``decide(champion)`` under the lock; if it promotes, store and promote the model."""
        model_file = Path(model_file)
        check_publish_args(model_file, card, actor)
        if job_id is not None:
            check_job_id(job_id)
        with self._locked():
            self._remove_stale_tmp()
            self._reconcile_history()
            champion = self.promoted_version()
            decision = check_decision(decide(champion))
            if not decision.promoted:
                return PublishResult(False, None, champion, decision)
            version = self._next_version()
            self._write_version(version, model_file,
                                lambda sha256: full_card(card, version, decision, job_id, sha256))
            base.crash_point("before_pointer")
            self._write_pointer(version)
            base.crash_point("before_history")
            self._append_history(
                HistoryEntry(version, champion, decision.reason, utc_now(), actor)
            )
        return PublishResult(True, version, champion, decision)

    def promote(self, version: int, *, reason: str, actor: str) -> HistoryEntry:
        """Point PROMOTED at an existing, intact version (operator rollback or pin)."""
        require_text(reason, "reason")
        require_text(actor, "actor")
        with self._locked():
            self._reconcile_history()
            self.open_version(version)
            # Raw pointer, not promoted_version(): an operator must be able to repair a pointer
            # that names a missing version.
            entry = HistoryEntry(version, self._read_pointer(), reason, utc_now(), actor)
            self._write_pointer(version)
            self._append_history(entry)
        return entry

    def import_version(self, version: int, model_file: Path, card: dict) -> None:
        text = check_import(version, model_file, card, sha256_file(model_file))
        with self._locked():
            if os.path.lexists(self._version_dir(version)):
                raise StoreError(f"version {version} exists already in {self.url}")
            self._write_version(version, model_file, lambda _: text)

    def import_history(self, entries: Sequence[HistoryEntry]) -> None:
        with self._locked():
            if self.history() or self._read_pointer() is not None:
                raise StoreError(f"{self.url} has a promotion history already")
            for entry in entries:
                self._append_history(entry)
            if entries:
                self._write_pointer(entries[-1].version)

    # ----------------------------------------------------------------------------- jobs

    def save_job_files(self, job_id: str, run_dir: Path, paths: Sequence[Path]) -> None:
        """Nothing to copy: a job's run directory is in this store's directory already."""

    def restore_job_files(self, job_id: str, run_dir: Path) -> None:
        """Nothing to fetch: every trainer reads the same directory."""

    # ----------------------------------------------------------------------------- internals

    def _version_dir(self, version: int) -> Path:
        return self.models_dir / str(version)

    def _existing_version_dir(self, version: int) -> Path:
        path = self._version_dir(check_version(version))
        if not path.is_dir():
            raise VersionNotFound(f"version {version} not found (have {self.versions()})")
        return path

    def _read_pointer(self) -> int | None:
        path = self.models_dir / POINTER_FILE
        try:
            text = path.read_text(encoding="ascii").strip()
        except FileNotFoundError:
            return None
        except (OSError, UnicodeDecodeError) as exc:
            raise IntegrityError(f"expected a readable version number in {path}: {exc}") from None
        if not _VERSION_RE.fullmatch(text):
            raise IntegrityError(f"expected a version number in {path}, found {text[:40]!r}")
        return int(text)

    def _locked(self) -> AbstractContextManager[None]:
        return locked(self.models_dir / LOCK_FILE)

    def _remove_stale_tmp(self) -> None:
        # Only called under the lock, and every publish in progress holds it: any temp dir seen
        # here belongs to a process that died. Best effort: a leftover is harmless to readers.
        for entry in os.scandir(self.models_dir):
            if entry.name.startswith(TMP_PREFIX) and entry.is_dir(follow_symlinks=False):
                shutil.rmtree(entry.path, ignore_errors=True)

    def _next_version(self) -> int:
        # Count every numbered entry (even a stray file) and every recorded version, so a number
        # is never handed out twice, even after an operator deletes a version directory.
        numbered = [int(n) for n in os.listdir(self.models_dir) if _VERSION_RE.fullmatch(n)]
        recorded = [e.version for e in self.history()]
        return max(numbered + recorded, default=0) + 1

    def _write_version(self, version: int, model_file: Path,
                       card_text: Callable[[str], str]) -> None:
        tmp = Path(tempfile.mkdtemp(prefix=TMP_PREFIX, dir=self.models_dir))
        try:
            # mkdtemp makes the dir 0o700; other replicas (maybe other users) must read it.
            tmp.chmod(0o755)
            text = card_text(self._copy_model(model_file, tmp / MODEL_FILE))
            write_read_only(tmp / CARD_FILE, text)
            fsync_dir(tmp)
            base.crash_point("before_rename")
            # Atomic publication: readers see either no models/<N> or a complete one.
            os.rename(tmp, self._version_dir(version))
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        fsync_dir(self.models_dir)

    @staticmethod
    def _copy_model(src: Path, dst: Path) -> str:
        """Chunked copy that hashes what it writes; returns the sha256 hex digest."""
        digest = hashlib.sha256()
        with open(src, "rb") as fin, open(dst, "xb") as fout:
            first = True
            while chunk := fin.read(CHUNK_SIZE):
                fout.write(chunk)
                digest.update(chunk)
                if first:
                    fout.flush()
                    base.crash_point("copy")
                    first = False
            os.fchmod(fout.fileno(), 0o444)
            fout.flush()
            os.fsync(fout.fileno())
        return digest.hexdigest()

    def _write_pointer(self, version: int) -> None:
        # Atomic: pollers read either the old or the new number, never a mix.
        replace_file(self.models_dir / POINTER_FILE, f"{version}\n")

    def _append_history(self, entry: HistoryEntry) -> None:
        line = json.dumps(entry.to_dict()) + "\n"
        append_line(self.models_dir / HISTORY_FILE, line)

    def _reconcile_history(self) -> None:
        # Under the lock the pointer only moves right before a history append, so a mismatch
        # means a process died in between (or someone edited PROMOTED by hand): record it.
        pointer = self._read_pointer()
        entries = self.history()
        last = entries[-1].version if entries else None
        if pointer is not None and pointer != last:
            reason = f"recovered: PROMOTED names {pointer} but history ended at {last}"
            self._append_history(HistoryEntry(pointer, last, reason, utc_now(), RECOVERY_ACTOR))
