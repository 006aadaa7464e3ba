"""`durable_files.replace_with`: the one write-then-rename (text, checkpoints, the exported
model): the old content or the new, fsync'd, and no temporary file left behind either way."""

from __future__ import annotations

from pathlib import Path

import pytest

from convserve.store import durable_files
from convserve.store.durable_files import replace_file, replace_with


def leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.endswith(".tmp"))


@pytest.fixture
def synced(monkeypatch) -> list[tuple[str, Path]]:
    """What reached fsync, in order: ("file", path) and ("dir", path)."""
    calls: list[tuple[str, Path]] = []
    real_file, real_dir = durable_files.fsync_file, durable_files.fsync_dir

    def fsync_file(path: Path) -> None:
        calls.append(("file", path))
        real_file(path)

    def fsync_dir(path: Path) -> None:
        calls.append(("dir", path))
        real_dir(path)

    monkeypatch.setattr(durable_files, "fsync_file", fsync_file)
    monkeypatch.setattr(durable_files, "fsync_dir", fsync_dir)
    return calls


def test_replace_with_writes_beside_the_target_fsyncs_and_renames(tmp_path, synced) -> None:
    target = tmp_path / "last.pt"
    target.write_bytes(b"old")
    given: list[Path] = []

    def write(partial: Path) -> None:
        given.append(partial)
        assert partial.parent == tmp_path and partial.name.startswith(".last.pt.")
        assert target.read_bytes() == (b"old", b"new")[len(given) - 1]  # nothing shows before the rename
        partial.write_bytes(b"new")

    replace_with(target, write)
    assert target.read_bytes() == b"new" and leftovers(tmp_path) == []
    assert synced == [("file", given[0]), ("dir", tmp_path)]
    replace_with(target, write)
    assert given[0] != given[1]  # a unique temporary name per call: writers never share one


@pytest.mark.parametrize("old", [b"old", None])
def test_replace_with_keeps_the_old_content_when_the_write_fails(tmp_path, synced, old) -> None:
    target = tmp_path / "card.json"
    if old is not None:
        target.write_bytes(old)

    def write(partial: Path) -> None:
        partial.write_bytes(b"half")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        replace_with(target, write)
    assert (target.read_bytes() if target.exists() else None) == old
    assert leftovers(tmp_path) == [] and synced == []


def test_a_write_that_makes_no_file_replaces_nothing(tmp_path) -> None:
    target = tmp_path / "model.onnx"
    target.write_bytes(b"old")
    with pytest.raises(FileNotFoundError):
        replace_with(target, lambda partial: None)
    assert target.read_bytes() == b"old" and leftovers(tmp_path) == []


def test_replace_file_is_replace_with_for_text(tmp_path, synced) -> None:
    target = tmp_path / "state"
    replace_file(target, "RUNNING\n")
    assert target.read_text(encoding="utf-8") == "RUNNING\n" and leftovers(tmp_path) == []
    assert [kind for kind, _ in synced] == ["file", "dir"]
