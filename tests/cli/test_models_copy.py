"""`convserve models copy SRC DST` and the models commands on an s3:// store (a real SeaweedFS,
tests/s3.py): a directory store to object storage and back keeps versions, cards, history and
the pointer."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from convserve.cli.main import main
from convserve.store.base import ModelStore
from convserve.store.directory import DirectoryStore
from convserve.store.location import location_of, open_store
from tests.store.test_directory import publish


def contents(store: ModelStore) -> tuple:
    models = {v: (store.card(v), store.open_version(v).path.read_bytes()) for v in store.versions()}
    return models, store.history(), store.promoted_version()


@pytest.fixture
def source(tmp_path: Path) -> DirectoryStore:
    store = DirectoryStore(tmp_path / "source")
    for accuracy in (0.5, 0.6, 0.7):
        model = tmp_path / f"m{accuracy}.onnx"
        model.write_bytes(os.urandom(30_000))
        publish(store, model, accuracy)
    store.promote(2, reason="rollback", actor="operator:me")
    return store


def test_a_store_goes_to_object_storage_and_back_unchanged(source: DirectoryStore, s3_url,
                                                           tmp_path: Path, capsys) -> None:
    assert main(["models", "copy", str(source.root), s3_url.url]) == 0
    assert capsys.readouterr().out.startswith(
        f"copied 3 versions and 4 history entries from {source.root} to {s3_url.url}")
    on_s3 = open_store(location_of(s3_url.url, work_dir=tmp_path / "work"))
    assert contents(on_s3) == contents(source)

    back = tmp_path / "back"
    assert main(["models", "copy", s3_url.url, str(back)]) == 0
    assert contents(DirectoryStore(back)) == contents(source)

    capsys.readouterr()
    assert main(["models", "list", "--store", s3_url.url]) == 0
    rows = [row.split() for row in capsys.readouterr().out.splitlines()[1:]]
    assert [row[0] for row in rows] == ["1", "2", "3"]
    assert [row[0] for row in rows if row[1] == "*"] == ["2"]  # the promoted one, from S3
    assert main(["models", "history", "--store", s3_url.url]) == 0
    assert "rollback" in capsys.readouterr().out


def test_copy_refuses_a_store_that_is_not_empty(source: DirectoryStore, s3_url, capsys) -> None:
    assert main(["models", "copy", str(source.root), s3_url.url]) == 0
    capsys.readouterr()
    assert main(["models", "copy", str(source.root), s3_url.url]) == 1
    assert "is not empty" in capsys.readouterr().err


def test_show_on_s3_reports_a_corrupted_object(source: DirectoryStore, s3_url, capsys) -> None:
    assert main(["models", "copy", str(source.root), s3_url.url]) == 0
    s3_url.client().put_object(Bucket=s3_url.bucket, Key=f"{s3_url.prefix}/models/1/model.onnx",
                               Body=b"truncated")
    assert main(["models", "show", "1", "--store", s3_url.url]) == 1
    err = capsys.readouterr().err
    assert "version 1" in err and "sha256" in err and err.count("\n") == 1


def test_a_missing_bucket_is_one_line_and_exit_1(s3_url, capsys) -> None:
    assert main(["models", "list", "--store", f"s3://missing-{os.getpid()}/x"]) == 1
    err = capsys.readouterr().err
    assert "no bucket" in err and err.count("\n") == 1
