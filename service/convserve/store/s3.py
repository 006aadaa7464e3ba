"""The model store on S3 or an S3-compatible server: no lock server, only conditional writes.

Layout under s3://bucket/prefix/::

    models/<N>/claim        the number N taken (If-None-Match: *): one publisher per number
    models/<N>/model.onnx   the model, uploaded before the card
    models/<N>/card.json    the card (with the model's sha256); written last, so version N is
                            visible (listed, served) exactly when its card exists
    models/PROMOTED         the pointer: the latest history entry and its sequence number,
                            replaced by compare-and-set (If-Match on the ETag that was read)
    models/history/<seq>    one object per promotion, seq = 000000000001, 000000000002, ...
    jobs/<id>/...           a job's checkpoints and TensorBoard event files

How each guarantee of `convserve.store.base` holds:
* A version appears whole or not at all: a PUT is atomic (a killed upload leaves no object, and
  a multipart upload is invisible until completed), and the card comes last.
* Numbers are never taken twice: a publisher claims N with If-None-Match; the loser of a race takes
  the next number. A publisher that dies after its claim leaves a gap, never a reused number.
* The pointer moves by compare-and-set. Each pointer carries a new sequence number, so no two
  writes have the same content (an ETag is the content's MD5: equal content, equal ETag).
  A publisher whose compare-and-set fails withdraws its version (card first) and decides again
  against the champion that won, so a candidate never replaces a champion it was not compared with.
* History: the pointer holds the entry it made current, so a writer that died between moving the
  pointer and writing `history/<seq>` loses nothing: readers add the pointer's entry, and the next
  promotion writes it (If-None-Match: whoever comes first).
"""

from __future__ import annotations

import contextlib
import json
import logging
import re
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from convserve.contracts.errors import IntegrityError, StoreError, VersionNotFound
from convserve.contracts.model_card import ModelCard
from convserve.store import base
from convserve.store.base import (
    CARD_FILE,
    MODEL_FILE,
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
from convserve.store.cache import HashingWriter, VersionCache
from convserve.store.durable_files import sha256_file
from convserve.store.location import StoreLocation
from convserve.store.s3_objects import NotModified, Objects, PreconditionFailed
from convserve.store.work_dir import WorkDir, check_job_id

log = logging.getLogger("convserve.store")

POINTER = "models/PROMOTED"
HISTORY = "models/history/"
CLAIM = "claim"
MAX_RACES = 8  # compare-and-set retries of one publish or promote before it reports the conflict
_NUMBERED = re.compile(r"models/([1-9][0-9]*)/(.+)")


@dataclass(frozen=True)
class Pointer:
    seq: int                      # 0: nothing promoted yet
    entry: HistoryEntry | None
    etag: str | None              # None: the object does not exist yet


class S3Store:
    def __init__(self, location: StoreLocation, *, cache_entries: int = 4) -> None:
        self.location = location
        self.url = location.url
        self.objects = Objects(location)
        self.work = WorkDir(location.local_work_dir())
        self.cache = VersionCache(self.work.root / "cache", max_entries=cache_entries)
        self._polled: Pointer | None = None  # the pointer as last read, for conditional GETs
        self._poll_lock = threading.Lock()

    def check(self) -> None:
        self.objects.check()

    # ----------------------------------------------------------------------------- reading

    def versions(self) -> list[int]:
        return sorted(int(m[1]) for name in self.objects.names("models/")
                      if (m := _NUMBERED.fullmatch(name)) and m[2] == CARD_FILE)

    def promoted_version(self) -> int | None:
        """One conditional GET: while the pointer keeps its ETag the server answers 304."""
        with self._poll_lock:
            self._polled = self._pointer(self._polled)
            entry = self._polled.entry
        return entry.version if entry else None

    def card(self, version: int) -> dict:
        name = f"models/{check_version(version)}/{CARD_FILE}"
        blob = self.objects.get(name)
        if blob is None:
            raise VersionNotFound(f"version {version} not found (have {self.versions()})")
        return parse_card(blob.body, version, f"{self.url}/{name}")

    def model_card(self, version: int) -> ModelCard:
        return ModelCard.from_dict(self.card(version))

    def open_version(self, version: int) -> OpenedVersion:
        """Download into the local cache (once per version), checked against the card's sha256."""
        card = self.card(version)
        sha256 = card.get("sha256")
        if not isinstance(sha256, str) or not re.fullmatch(r"[0-9a-f]{64}", sha256):
            raise IntegrityError(f"version {version}: the card has no sha256 to check the model "
                                 f"against (found {sha256!r})")
        name = f"models/{version}/{MODEL_FILE}"
        path = self.cache.get(version, sha256, lambda into: self.objects.download(name, into))
        return OpenedVersion(version, path, ModelCard.from_dict(card))

    def history(self) -> list[HistoryEntry]:
        entries = [(int(name[len(HISTORY):]), self._history_entry(name))
                   for name in self.objects.names(HISTORY) if name[len(HISTORY):].isdigit()]
        pointer = self._pointer(None)
        if pointer.entry is not None and (not entries or entries[-1][0] < pointer.seq):
            entries.append((pointer.seq, pointer.entry))  # its writer died before writing it
        return [entry for _, entry in entries]

    # ----------------------------------------------------------------------------- writing

    def publish(self, model_file: Path, card: dict, decide: Decide, *, actor: str,
                job_id: str | None = None) -> PublishResult:
        model_file = Path(model_file)
        check_publish_args(model_file, card, actor)
        if job_id is not None:
            check_job_id(job_id)
        sha256 = sha256_file(model_file)
        version: int | None = None  # claimed and uploaded once, on the first promoting decision
        for _ in range(MAX_RACES):
            pointer = self._pointer(None)
            self._write_history(pointer)  # a writer before us may have died before doing it
            champion = pointer.entry.version if pointer.entry else None
            decision = check_decision(decide(champion))
            if not decision.promoted:
                if version is not None:
                    self.objects.delete(f"models/{version}/{MODEL_FILE}")
                return PublishResult(False, None, champion, decision)
            if version is None:
                version = self._claim_number()
                self.objects.upload(f"models/{version}/{MODEL_FILE}", model_file)
                base.crash_point("upload")
            self._put_card(version, full_card(card, version, decision, job_id, sha256))
            base.crash_point("before_pointer")
            entry = HistoryEntry(version, champion, decision.reason, utc_now(), actor)
            if self._move_pointer(pointer, entry):
                return PublishResult(True, version, champion, decision)
            # Another promotion moved the pointer first: hide this version again (its card
            # names a decision against a champion that is gone) and decide against the new one.
            log.info("the pointer moved during publish; deciding version %d again", version)
            self.objects.delete(f"models/{version}/{CARD_FILE}")
        raise StoreError(f"gave up publishing to {self.url}: the pointer moved under each of "
                         f"{MAX_RACES} attempts (too many promotions at once); try again")

    def promote(self, version: int, *, reason: str, actor: str) -> HistoryEntry:
        require_text(reason, "reason")
        require_text(actor, "actor")
        self._check_object(version)  # exists and intact in the bucket, not just in our cache
        for _ in range(MAX_RACES):
            pointer = self._pointer(None)
            self._write_history(pointer)
            previous = pointer.entry.version if pointer.entry else None
            entry = HistoryEntry(version, previous, reason, utc_now(), actor)
            if self._move_pointer(pointer, entry):
                return entry
        raise StoreError(f"gave up promoting version {version} in {self.url}: the pointer moved "
                         f"under each of {MAX_RACES} attempts; try again")

    def import_version(self, version: int, model_file: Path, card: dict) -> None:
        text = check_import(version, model_file, card, sha256_file(model_file))
        try:
            self.objects.put(f"models/{version}/{CLAIM}", b"", create_only=True)
        except PreconditionFailed:
            raise StoreError(f"version {version} exists already in {self.url}") from None
        self.objects.upload(f"models/{version}/{MODEL_FILE}", model_file)
        self._put_card(version, text)

    def import_history(self, entries: Sequence[HistoryEntry]) -> None:
        if self._pointer(None).etag is not None or any(self.objects.names(HISTORY)):
            raise StoreError(f"{self.url} has a promotion history already")
        for seq, entry in enumerate(entries, 1):
            self._write_history(Pointer(seq, entry, None))
        if entries:
            body = {"seq": len(entries), "entry": entries[-1].to_dict()}
            try:
                self.objects.put(POINTER, json.dumps(body).encode(), create_only=True)
            except PreconditionFailed:
                raise StoreError(f"{self.url}: a promotion happened during the copy") from None

    # ----------------------------------------------------------------------------- jobs

    def save_job_files(self, job_id: str, run_dir: Path, paths: Sequence[Path]) -> None:
        for path in paths:
            relative = Path(path).resolve().relative_to(run_dir.resolve()).as_posix()
            self.objects.upload(f"jobs/{check_job_id(job_id)}/{relative}", Path(path))

    def restore_job_files(self, job_id: str, run_dir: Path) -> None:
        under = f"jobs/{check_job_id(job_id)}/"
        for name in list(self.objects.names(under)):
            target = run_dir / name[len(under):]
            if not target.resolve().is_relative_to(run_dir.resolve()):
                continue  # a key with ".." in it: never written by us, never followed
            target.parent.mkdir(parents=True, exist_ok=True)
            tmp = target.with_name(f".{target.name}.part")
            with open(tmp, "wb") as handle:
                self.objects.download(name, handle)
            tmp.replace(target)

    # ----------------------------------------------------------------------------- internals

    def _pointer(self, known: Pointer | None) -> Pointer:
        try:
            blob = self.objects.get(POINTER, if_none_match=known.etag if known else None)
        except NotModified:
            assert known is not None
            return known
        if blob is None:
            return Pointer(0, None, None)
        try:
            body = json.loads(blob.body)
            seq = body["seq"]
            if not isinstance(seq, int) or seq < 1:
                raise ValueError(f"seq {seq!r}")
            entry = parse_history_entry(json.dumps(body["entry"]), f"{self.url}/{POINTER}")
        except (ValueError, KeyError, TypeError) as error:
            raise IntegrityError(f"{self.url}/{POINTER}: expected {{\"seq\": N, \"entry\": "
                                 f"{{...}}}}, found {blob.body[:80]!r} ({error})") from None
        return Pointer(seq, entry, blob.etag)

    def _move_pointer(self, pointer: Pointer, entry: HistoryEntry) -> bool:
        """Compare-and-set from `pointer`; False when another writer moved it first."""
        moved = Pointer(pointer.seq + 1, entry, None)
        body = json.dumps({"seq": moved.seq, "entry": entry.to_dict()}).encode()
        try:
            if pointer.etag is None:
                self.objects.put(POINTER, body, create_only=True)
            else:
                self.objects.put(POINTER, body, if_match=pointer.etag)
        except PreconditionFailed:
            # Lost, unless the write was ours: its reply lost, and boto3 retried it.
            now = self._pointer(None)
            if (now.seq, now.entry) != (moved.seq, entry):
                return False
        base.crash_point("before_history")
        self._write_history(moved)
        return True

    def _write_history(self, pointer: Pointer) -> None:
        if pointer.entry is None:
            return
        with contextlib.suppress(PreconditionFailed):  # written already, by whoever came first
            self.objects.put(f"{HISTORY}{pointer.seq:012d}",
                             json.dumps(pointer.entry.to_dict()).encode(), create_only=True)

    def _history_entry(self, name: str) -> HistoryEntry:
        blob = self.objects.get(name)
        if blob is None:
            raise IntegrityError(f"{self.url}/{name} was listed but cannot be read")
        return parse_history_entry(blob.body, f"{self.url}/{name}")

    def _claim_number(self) -> int:
        # Every number handed out keeps its claim object (a withdrawn or deleted version too),
        # so the listing alone knows them all; no need to read each history object.
        taken = [int(m[1]) for name in self.objects.names("models/")
                 if (m := _NUMBERED.fullmatch(name))]
        number = max(taken, default=0) + 1
        while True:
            try:
                self.objects.put(f"models/{number}/{CLAIM}", b"", create_only=True)
                return number
            except PreconditionFailed:
                number += 1  # another publisher took it a moment ago

    def _check_object(self, version: int) -> None:
        """Hash the model object as the bucket holds it now (a replica's download is what
        matters, whatever copy this process has cached)."""
        sha256 = self.card(version).get("sha256")
        hashed = HashingWriter(None)
        self.objects.download(f"models/{version}/{MODEL_FILE}", hashed)  # type: ignore[arg-type]
        if hashed.digest.hexdigest() != sha256:
            raise IntegrityError(f"version {version}: the card's sha256 is {sha256!r} but the "
                                 f"model object hashes to {hashed.digest.hexdigest()!r}")

    def _put_card(self, version: int, text: str) -> None:
        # We hold the number's claim: only our own write, retried by boto3, can have made it.
        with contextlib.suppress(PreconditionFailed):
            self.objects.put(f"models/{version}/{CARD_FILE}", text.encode(), create_only=True)
