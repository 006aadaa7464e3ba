"""A replica's bounded local copy of the model versions it downloaded from object storage.

ONNX Runtime opens a file, so a version is downloaded once into `<work dir>/cache/`, hashed while
it is written, and kept under a name that carries its sha256: a file is only ever renamed into
place after its hash matched the card's, so what the cache holds is what the card promised.
At most `max_entries` versions stay; the least recently used go first (a session already open
keeps its copy in memory, so removing the file never breaks a live model). Standard library only.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO

from convserve.contracts.errors import IntegrityError
from convserve.store.durable_files import sha256_file

_ENTRY_RE = re.compile(r"([1-9][0-9]*)-([0-9a-f]{64})\.onnx")
DEFAULT_MAX_ENTRIES = 4


class HashingWriter:
    """A file object that hashes what passes through it (boto3's download_fileobj writes here),
    into `handle`, or nowhere when it is None (only the hash is wanted)."""

    def __init__(self, handle: BinaryIO | None) -> None:
        self._handle = handle
        self.digest = hashlib.sha256()

    def write(self, data: bytes) -> int:
        self.digest.update(data)
        return self._handle.write(data) if self._handle is not None else len(data)


class VersionCache:
    def __init__(self, folder: Path, *, max_entries: int = DEFAULT_MAX_ENTRIES) -> None:
        if max_entries < 1:
            raise ValueError(f"max_entries: expected >= 1, got {max_entries}")
        self.folder = folder
        self.max_entries = max_entries
        folder.mkdir(parents=True, exist_ok=True)

    def path(self, version: int, sha256: str) -> Path:
        return self.folder / f"{version}-{sha256}.onnx"

    def get(self, version: int, sha256: str, download: Callable[[BinaryIO], None]) -> Path:
        """The cached file of (version, sha256), downloading it with `download(file)` first when
        it is not here. IntegrityError when what arrived does not hash to `sha256`."""
        path = self.path(version, sha256)
        if path.is_file() and sha256_file(path) == sha256:  # a disk error since is caught here
            os.utime(path)  # most recently used
            return path
        tmp = self.folder / f".{uuid.uuid4().hex}.part"
        try:
            with open(tmp, "wb") as handle:
                writer = HashingWriter(handle)
                download(writer)  # type: ignore[arg-type]  # a write()-only file object
            actual = writer.digest.hexdigest()
            if actual != sha256:
                raise IntegrityError(f"version {version}: the card's sha256 is {sha256!r} but the "
                                     f"model object hashes to {actual!r} (truncated or replaced)")
            os.replace(tmp, path)
        finally:
            with contextlib.suppress(FileNotFoundError):
                tmp.unlink()
        self._evict(keep=path)
        return path

    def entries(self) -> list[Path]:
        """Cached versions, least recently used first."""
        found = [Path(e.path) for e in os.scandir(self.folder) if _ENTRY_RE.fullmatch(e.name)]
        return sorted(found, key=lambda p: p.stat().st_mtime_ns)

    def _evict(self, keep: Path) -> None:
        entries = [p for p in self.entries() if p != keep]
        for stale in entries[:max(0, len(entries) + 1 - self.max_entries)]:
            with contextlib.suppress(FileNotFoundError):
                stale.unlink()

