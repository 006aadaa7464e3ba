"""The S3 store's own behaviour on a real S3-compatible server (SeaweedFS, tests/s3.py): its object
layout, how it reads a pointer whose writer died, its local cache, its errors for wrong
credentials, a missing bucket and an unreachable server. The contract both backends keep is
test_contract.py's."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from convserve.contracts.errors import ConfigError, IntegrityError, StoreError, Unavailable
from convserve.contracts.model_card import GateDecision
from convserve.store.base import HistoryEntry
from convserve.store.cache import VersionCache
from convserve.store.location import location_of, open_reachable, open_store
from convserve.store.s3 import S3Store
from tests.store.test_directory import publish


@pytest.fixture
def model(tmp_path: Path) -> Path:
    path = tmp_path / "model.onnx"
    path.write_bytes(os.urandom(50_000))
    return path


def s3_store(s3_url, work: Path) -> S3Store:
    store = open_store(location_of(s3_url.url, work_dir=work))
    assert isinstance(store, S3Store)
    return store


def keys(s3_url) -> list[str]:
    listed = s3_url.client().list_objects_v2(Bucket=s3_url.bucket, Prefix=f"{s3_url.prefix}/")
    return sorted(item["Key"][len(s3_url.prefix) + 1:] for item in listed.get("Contents", ()))


def test_the_object_layout(s3_url, tmp_path: Path, model: Path) -> None:
    store = s3_store(s3_url, tmp_path / "work")
    publish(store, model, 0.5)
    publish(store, model, 0.6)
    assert keys(s3_url) == ["models/1/card.json", "models/1/claim", "models/1/model.onnx",
                            "models/2/card.json", "models/2/claim", "models/2/model.onnx",
                            "models/PROMOTED", "models/history/000000000001",
                            "models/history/000000000002"]
    pointer = json.loads(s3_url.client().get_object(
        Bucket=s3_url.bucket, Key=f"{s3_url.prefix}/models/PROMOTED")["Body"].read())
    assert pointer["seq"] == 2 and pointer["entry"]["version"] == 2
    assert pointer["entry"]["previous"] == 1


def test_a_pointer_ahead_of_history_is_read_and_then_written(s3_url, tmp_path: Path,
                                                             model: Path) -> None:
    """A promoter that died between the pointer and its history object loses nothing."""
    store = s3_store(s3_url, tmp_path / "work")
    publish(store, model, 0.5)
    publish(store, model, 0.6)
    s3_url.client().delete_object(Bucket=s3_url.bucket,
                                  Key=f"{s3_url.prefix}/models/history/000000000002")
    assert [(e.version, e.previous) for e in store.history()] == [(1, None), (2, 1)]
    store.promote(1, reason="rollback", actor="operator:me")
    assert "models/history/000000000002" in keys(s3_url)  # written by the next promoter
    assert [e.version for e in store.history()] == [1, 2, 1]


def test_polls_are_conditional_and_see_every_move(s3_url, tmp_path: Path, model: Path) -> None:
    replica, publisher = s3_store(s3_url, tmp_path / "a"), s3_store(s3_url, tmp_path / "b")
    assert replica.promoted_version() is None
    publish(publisher, model, 0.5)
    assert replica.promoted_version() == 1
    etag = replica._polled.etag  # type: ignore[union-attr]
    assert replica.promoted_version() == 1 and replica._polled.etag == etag  # a 304
    publish(publisher, model, 0.6)
    publisher.promote(1, reason="back", actor="operator:me")  # the same version, a new write
    assert replica.promoted_version() == 1 and replica._polled.etag != etag


def test_the_cache_keeps_a_bounded_number_of_checked_versions(s3_url, tmp_path: Path,
                                                              model: Path) -> None:
    store = S3Store(location_of(s3_url.url, work_dir=tmp_path / "work"), cache_entries=2)
    for accuracy in (0.1, 0.2, 0.3):
        model.write_bytes(os.urandom(20_000))
        publish(store, model, accuracy)
    paths = [store.open_version(v).path for v in (1, 2, 3)]
    assert [p.exists() for p in paths] == [False, True, True]
    assert store.open_version(1).path.read_bytes() != paths[2].read_bytes()
    assert len(store.cache.entries()) == 2
    paths[2].write_bytes(b"rotten")  # a local disk error is caught and downloaded again
    assert store.open_version(3).card.sha256 == store.card(3)["sha256"]
    assert paths[2].read_bytes() != b"rotten"


def test_a_download_that_does_not_match_its_card_leaves_nothing(tmp_path: Path) -> None:
    cache = VersionCache(tmp_path / "cache")
    with pytest.raises(IntegrityError, match="truncated or replaced"):
        cache.get(1, "0" * 64, lambda into: into.write(b"not the model"))
    assert os.listdir(tmp_path / "cache") == []


def test_a_jobs_files_come_back_under_its_run_directory(s3_url, tmp_path: Path) -> None:
    # (A key with "..", which AWS allows, is skipped by restore_job_files; SeaweedFS refuses to
    # store one, so that guard is not exercised here.)
    store = s3_store(s3_url, tmp_path / "work")
    s3_url.client().put_object(Bucket=s3_url.bucket,
                               Key=f"{s3_url.prefix}/jobs/j1/checkpoints/last.pt", Body=b"ckpt")
    run_dir = tmp_path / "run"
    store.restore_job_files("j1", run_dir)
    assert (run_dir / "checkpoints" / "last.pt").read_bytes() == b"ckpt"
    assert [p.name for p in run_dir.rglob("*") if p.is_file()] == ["last.pt"]


def test_import_refuses_a_taken_number_and_a_card_that_does_not_match(s3_url, tmp_path: Path,
                                                                       model: Path) -> None:
    store = s3_store(s3_url, tmp_path / "work")
    publish(store, model, 0.5)
    card = store.card(1)
    with pytest.raises(StoreError, match="version 1 exists"):
        store.import_version(1, model, card)
    with pytest.raises(IntegrityError, match="does not match"):
        store.import_version(2, model, card)  # the card says version 1
    with pytest.raises(StoreError, match="history already"):
        store.import_history([HistoryEntry(1, None, "x", "t", "a")])


# ----------------------------------------------------------------------------- failures


def test_wrong_credentials_and_a_missing_bucket_are_one_clear_error(s3_url, tmp_path: Path,
                                                                    monkeypatch) -> None:
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "wrong")
    with pytest.raises(ConfigError, match="access denied .*check the AWS credentials"):
        open_reachable(location_of(s3_url.url, work_dir=tmp_path))
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", s3_url.server.secret_key)
    missing = f"s3://no-such-bucket-{os.getpid()}/store"
    with pytest.raises(ConfigError, match="no bucket 'no-such-bucket-"):
        open_reachable(location_of(missing, work_dir=tmp_path))


def test_an_unreachable_server_is_unavailable_not_fatal(own_s3_server, tmp_path: Path,
                                                        monkeypatch, model: Path) -> None:
    for name, value in own_s3_server.env().items():
        monkeypatch.setenv(name, value)
    client = own_s3_server.client()
    client.create_bucket(Bucket="outage")
    store = open_reachable(location_of("s3://outage/p", work_dir=tmp_path / "w"))
    publish(store, model, 0.5)
    own_s3_server.stop()
    with pytest.raises(Unavailable, match="unreachable"):
        store.promoted_version()
    assert open_reachable(location_of("s3://outage/p", work_dir=tmp_path / "w")) is not None
    own_s3_server.start()
    assert store.promoted_version() == 1


@pytest.mark.parametrize("url", ["s3://", "s3://b:9000/x", "s3://key:secret@bucket/x",
                                 "s3://bucket/x?versionId=1", "http://bucket/x", " "])
def test_a_malformed_store_url_is_a_config_error(url: str) -> None:
    with pytest.raises(ConfigError):
        location_of(url)


def test_decide_must_return_a_decision(s3_url, tmp_path: Path, model: Path) -> None:
    store = s3_store(s3_url, tmp_path / "work")
    with pytest.raises(StoreError, match="must return a GateDecision"):
        store.publish(model, {}, lambda champion: True, actor="x")  # type: ignore[arg-type,return-value]
    assert keys(s3_url) == []
    assert store.publish(model, {}, lambda c: GateDecision(True, ("ok",)), actor="x").version == 1
