"""A replica serving from the S3 store (a real SeaweedFS server, tests/s3.py): a model object
damaged after publication, and a replica whose local work dir starts empty. Real `convserve serve`
processes (tests/servers.py); the objects are read and written with a plain S3 client."""

from __future__ import annotations

import hashlib
import shutil
from collections.abc import Callable
from pathlib import Path

import grpc
import pytest

from convserve.client import Client, ClientError
from convserve.contracts.errors import IntegrityError
from convserve.store.base import HistoryEntry
from convserve.store.location import location_of, open_store
from convserve.store.s3 import S3Store
from tests.s3 import S3Place
from tests.servers import ServerProcess, images, publish, running_server
from tests.waits import wait_until


def _store(place: S3Place, work: Path) -> S3Store:
    """The test's own handle on the store, with a local work dir of its own (not a replica's)."""
    store = open_store(location_of(place.url, s3_endpoint_url=place.endpoint_url, work_dir=work))
    assert isinstance(store, S3Store)
    return store


def _replica_flags(place: S3Place, work: Path) -> tuple[str, ...]:
    return ("--s3-endpoint-url", place.endpoint_url, "--work-dir", str(work), "--role", "serve")


def _key(place: S3Place, name: str) -> str:
    return f"{place.prefix}/{name}"


def _refusal(call: Callable[[], object]) -> ClientError:
    with pytest.raises(ClientError) as caught:
        call()
    return caught.value


def test_a_truncated_model_object_is_data_loss_and_never_replaces_the_live_model(
        s3_url: S3Place, datasets: Path, onnx_models, tmp_path: Path) -> None:
    store = _store(s3_url, tmp_path / "test-work")
    assert publish(store, onnx_models["good"]) == 1
    assert publish(store, onnx_models["bad"], accuracy=0.1) == 2
    store.promote(1, reason="version 1 back", actor="test")
    assert store.promoted_version() == 1

    client_s3 = s3_url.client()
    with running_server(s3_url.url, datasets, *_replica_flags(s3_url, tmp_path / "replica")) \
            as replica, Client(replica.address, retries=0) as client:
        assert client.predict(images(2)).version == 1

        key = _key(s3_url, "models/2/model.onnx")
        whole = client_s3.get_object(Bucket=s3_url.bucket, Key=key)["Body"].read()
        client_s3.put_object(Bucket=s3_url.bucket, Key=key, Body=whole[:len(whole) // 2])

        error = _refusal(lambda: client.predict(images(2), version=2))
        assert error.code == grpc.StatusCode.DATA_LOSS, error
        assert "version 2" in error.details, error.details
        # Asked again, it is downloaded and refused again: a damaged copy is never kept.
        assert _refusal(lambda: client.predict(images(1), version=2)).code == \
            grpc.StatusCode.DATA_LOSS
        assert client.predict(images(3)).version == 1
        assert client.predict(images(1), version=1).version == 1
        assert sorted(p.name.split("-")[0] for p in (tmp_path / "replica" / "cache").glob(
            "*.onnx")) == ["1"]

        # promote() checks the object in the bucket and refuses it ...
        with pytest.raises(IntegrityError, match="version 2"):
            store.promote(2, reason="the damaged one", actor="test")
        # ... but a pointer can still come to name it (the object damaged after its promotion):
        # the replica tries it, fails, keeps version 1.
        pointer = store._pointer(None)  # type: ignore[attr-defined]
        assert store._move_pointer(pointer, HistoryEntry(  # type: ignore[attr-defined]
            2, 1, "damaged after its promotion", "2026-01-01T00:00:00+00:00", "test"))
        wait_until(lambda: any("promoted version 2 cannot be loaded" in line
                               for line in replica.stderr_lines),
                   "the replica to try version 2 and refuse it")
        assert client.health() == "SERVING"
        assert client.predict(images(2)).version == 1
        assert replica.metric("convserve_model_version") == 1
        assert client.model().version == 1
        # Not a log line per poll: the failure is reported once until it changes.
        wait_until(lambda: replica.metric("convserve_store_up") == 1, "a pointer poll")
        assert sum("promoted version 2 cannot be loaded" in line
                   for line in replica.stderr_lines) == 1
        assert replica.stop() == 0, replica.stderr_lines[-10:]


def test_a_replica_with_an_empty_work_dir_serves_from_object_storage_alone(
        s3_url: S3Place, datasets: Path, onnx_models, tmp_path: Path) -> None:
    store = _store(s3_url, tmp_path / "test-work")
    publish(store, onnx_models["bad"], accuracy=0.1)
    promoted = publish(store, onnx_models["good"])  # version 2: the promoted one
    assert (promoted, store.promoted_version()) == (2, 2)
    sha256 = store.card(promoted)["sha256"]
    work = tmp_path / "replica"
    flags = _replica_flags(s3_url, work)

    with running_server(s3_url.url, datasets, *flags) as first, \
            Client(first.address, retries=0) as client:
        assert client.predict(images(2)).version == promoted
        assert first.stop() == 0, first.stderr_lines[-10:]
    assert (work / "cache").is_dir()  # it did use this work dir

    # Its disk is gone (a new pod, a wiped node): it starts over from the bucket alone.
    shutil.rmtree(work)
    replica = ServerProcess(s3_url.url, datasets, *flags)
    try:
        with Client(replica.address, retries=0) as client:
            prediction = client.predict(images(4))
            assert prediction.version == promoted
            assert client.health() == "SERVING"
        cached = sorted((work / "cache").iterdir())
        assert [p.name for p in cached] == [f"{promoted}-{sha256}.onnx"], cached
        assert hashlib.sha256(cached[0].read_bytes()).hexdigest() == sha256
        assert cached[0].read_bytes() == onnx_models["good"].read_bytes()
        assert replica.stop() == 0, replica.stderr_lines[-10:]
    finally:
        replica.stop()
