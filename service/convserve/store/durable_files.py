"""Small files written so that a crash at any instant leaves either the old content or the new,
and that survive a power cut once written: fsync'd files, fsync'd directory entries, atomic
replacement, and append-only logs whose torn last line is discarded. Standard library only."""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import os
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

CHUNK_SIZE = 64 * 1024


def fsync_dir(path: Path) -> None:
    # A create/rename is only durable once the directory entry itself reaches the disk.
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    except OSError as exc:
        # Some network/FUSE filesystems reject fsync on directories; the rename is still atomic.
        if exc.errno != errno.EINVAL:
            raise
    finally:
        os.close(fd)


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK_SIZE):
            digest.update(chunk)
    return digest.hexdigest()


def write_read_only(path: Path, text: str) -> None:
    """Create `path` (it must not exist) with `text`, mode 0o444, fsync'd."""
    with open(path, "x", encoding="utf-8") as f:
        f.write(text)
        os.fchmod(f.fileno(), 0o444)
        f.flush()
        os.fsync(f.fileno())


def touch(path: Path) -> None:
    """Create an empty file if missing (a marker; its existence is what counts)."""
    os.close(os.open(path, os.O_WRONLY | os.O_CREAT, 0o644))


def replace_file(path: Path, text: str) -> None:
    """Replace `path` atomically: readers see the old content or the new, never a mix. The
    temporary name is unique, so writers in other processes never share one."""
    replace_with(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def replace_with(path: Path, write: Callable[[Path], object]) -> None:
    """Replace `path` atomically with the file `write` makes at the path it is given: a temporary
    name beside `path`, unique to this call (for writers that take a path: `torch.save`,
    `onnx.save_model`). The file is fsync'd, renamed over `path`, and the directory fsync'd, so
    readers see the old content or the new, and the new survives a power cut once this returns.
    If `write` raises, `path` keeps its old content (or stays absent) and no temporary file is
    left behind."""
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    try:
        write(tmp)
        fsync_file(tmp)
        os.replace(tmp, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
    fsync_dir(path.parent)


def fsync_file(path: Path) -> None:
    """Flush `path`'s data to the disk (a read-only descriptor is enough on Linux)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def locked(path: Path) -> Iterator[None]:
    """Hold an exclusive flock(2) on `path` (created if missing). flock is per open file
    description, so this serialises threads of one process as well as processes and hosts (on
    NFSv4, CephFS and other shared filesystems with POSIX locks); the kernel drops it if the
    holder dies. Not re-entrant: a thread that takes it twice waits for itself."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # releases the lock


def append_line(path: Path, line: str) -> None:
    """Append one newline-terminated line, durably, after dropping a torn last line."""
    created = not path.exists()
    fd = os.open(path, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        _truncate_torn_tail(fd)
        view = memoryview(line.encode("utf-8"))
        while view:
            view = view[os.write(fd, view):]
        os.fsync(fd)
    finally:
        os.close(fd)
    if created:
        fsync_dir(path.parent)


def _truncate_torn_tail(fd: int) -> None:
    # A crash mid-append can leave a line without its newline; it was never committed, and
    # appending after it would corrupt the next record too.
    size = os.fstat(fd).st_size
    if size == 0 or os.pread(fd, 1, size - 1) == b"\n":
        return
    data = os.pread(fd, size, 0)
    os.ftruncate(fd, data.rfind(b"\n") + 1)
