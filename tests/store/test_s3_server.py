"""The S3-compatible server the S3 store's tests run against (tests/s3.py, SeaweedFS): its fixtures,
and the conditional writes the store relies on, each refused or let through as on AWS S3."""

from __future__ import annotations

import os
import threading
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from tests.s3 import GRPC_OFFSET, S3Place, SeaweedServer, fresh_bucket
from tests.waits import wait_until

RACERS = 16


def error_of(call: Callable[[], Any]) -> tuple[str, int]:
    """(error code, HTTP status) of a call that must fail with a ClientError."""
    from botocore.exceptions import ClientError

    with pytest.raises(ClientError) as raised:
        call()
    response = raised.value.response
    return response["Error"]["Code"], response["ResponseMetadata"]["HTTPStatusCode"]


def race(attempt: Callable[[int], Any]) -> tuple[dict[int, Any], dict[int, tuple[str, int]]]:
    """Run attempt(0..RACERS-1) in as many threads, let go together; returns the results of those
    that succeeded and the (code, status) of those refused, by racer."""
    from botocore.exceptions import ClientError

    start = threading.Barrier(RACERS)
    won: dict[int, Any] = {}
    refused: dict[int, tuple[str, int]] = {}
    failed: list[BaseException] = []

    def racer(number: int) -> None:
        try:
            start.wait(timeout=30)
            won[number] = attempt(number)
        except ClientError as error:
            response = error.response
            refused[number] = (response["Error"]["Code"],
                               response["ResponseMetadata"]["HTTPStatusCode"])
        except BaseException as error:  # reported below, in the test's thread
            failed.append(error)

    threads = [threading.Thread(target=racer, args=(n,)) for n in range(RACERS)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert not any(thread.is_alive() for thread in threads), "a racer hung"
    assert not failed, failed
    return won, refused


def body_of(client: Any, bucket: str, key: str) -> bytes:
    return client.get_object(Bucket=bucket, Key=key)["Body"].read()


def test_s3_url_is_a_fresh_bucket_that_boto3s_standard_environment_reaches(s3_url: S3Place) -> None:
    import boto3

    assert s3_url.url == f"s3://{s3_url.bucket}/store" == str(s3_url)
    assert s3_url.bucket.startswith("t-") and s3_url.endpoint_url.startswith("http://127.0.0.1:")
    assert os.environ["AWS_ENDPOINT_URL"] == s3_url.endpoint_url
    assert os.environ["AWS_EC2_METADATA_DISABLED"] == "true"
    # What the code under test does: no argument, the environment only (virtual-host addressing
    # by default, which botocore turns to path style for an IP address).
    client = boto3.session.Session().client("s3")
    assert client.list_objects_v2(Bucket=s3_url.bucket)["KeyCount"] == 0
    client.put_object(Bucket=s3_url.bucket, Key="store/a", Body=b"hello")
    assert body_of(s3_url.client(), s3_url.bucket, "store/a") == b"hello"


def test_s3_url_environment_is_restored_and_its_bucket_deleted(s3_server: SeaweedServer,
                                                               monkeypatch) -> None:
    monkeypatch.setenv("AWS_PROFILE", "someone-elses")
    monkeypatch.delenv("AWS_ENDPOINT_URL", raising=False)
    with fresh_bucket(s3_server) as place:  # what s3_url yields from
        assert "AWS_PROFILE" not in os.environ  # would send boto3 to a profile that is not there
        assert os.environ["AWS_ENDPOINT_URL"] == place.endpoint_url
        place.client().put_object(Bucket=place.bucket, Key="store/left-behind", Body=b"x")
    assert os.environ["AWS_PROFILE"] == "someone-elses"
    assert "AWS_ENDPOINT_URL" not in os.environ
    assert error_of(lambda: s3_server.client().head_bucket(Bucket=place.bucket)) == ("404", 404)


def test_if_none_match_refuses_to_overwrite_an_existing_key(s3_url: S3Place) -> None:
    client = s3_url.client()
    client.put_object(Bucket=s3_url.bucket, Key="k", Body=b"first", IfNoneMatch="*")
    code = error_of(lambda: client.put_object(Bucket=s3_url.bucket, Key="k", Body=b"second",
                                              IfNoneMatch="*"))
    assert code == ("PreconditionFailed", 412)
    assert body_of(client, s3_url.bucket, "k") == b"first"


def test_of_racing_creators_of_one_key_exactly_one_wins(s3_url: S3Place) -> None:
    # No racer waits for a connection; expect_continue=False: seconds faster (tests/s3.py).
    client = s3_url.client(max_pool_connections=RACERS * 2, expect_continue=False)
    # The bucket's first write allocates its volume: before the race, not 16 times during it.
    client.put_object(Bucket=s3_url.bucket, Key="other", Body=b"x")
    won, refused = race(lambda n: client.put_object(Bucket=s3_url.bucket, Key="k",
                                                    Body=f"racer {n}".encode(), IfNoneMatch="*"))
    assert len(won) == 1, f"{len(won)} creators won: {sorted(won)}"
    assert set(refused.values()) == {("PreconditionFailed", 412)}
    (winner,) = won
    assert body_of(client, s3_url.bucket, "k") == f"racer {winner}".encode()


def test_if_match_writes_over_the_version_read_and_refuses_a_stale_one(s3_url: S3Place) -> None:
    client = s3_url.client()
    client.put_object(Bucket=s3_url.bucket, Key="k", Body=b"v1")
    read = client.head_object(Bucket=s3_url.bucket, Key="k")["ETag"]
    written = client.put_object(Bucket=s3_url.bucket, Key="k", Body=b"v2", IfMatch=read)["ETag"]
    assert written != read
    code = error_of(lambda: client.put_object(Bucket=s3_url.bucket, Key="k", Body=b"v3",
                                              IfMatch=read))
    assert code == ("PreconditionFailed", 412)
    assert body_of(client, s3_url.bucket, "k") == b"v2"
    assert client.head_object(Bucket=s3_url.bucket, Key="k")["ETag"] == written
    # If-Match on a key that does not exist: nothing to match, so no write either.
    assert error_of(lambda: client.put_object(Bucket=s3_url.bucket, Key="absent", Body=b"x",
                                              IfMatch=read))[1] in (404, 412)


def test_of_racing_compare_and_swap_writers_exactly_one_wins(s3_url: S3Place) -> None:
    client = s3_url.client(max_pool_connections=RACERS * 2, expect_continue=False)
    client.put_object(Bucket=s3_url.bucket, Key="k", Body=b"v1")
    read = client.head_object(Bucket=s3_url.bucket, Key="k")["ETag"]
    # Distinct bodies: an ETag is the MD5 of the content, so equal bodies would all match it after.
    won, refused = race(lambda n: client.put_object(Bucket=s3_url.bucket, Key="k",
                                                    Body=f"writer {n}".encode(), IfMatch=read))
    assert len(won) == 1, f"{len(won)} writers won: {sorted(won)}"
    assert set(refused.values()) == {("PreconditionFailed", 412)}
    ((winner, result),) = won.items()
    assert body_of(client, s3_url.bucket, "k") == f"writer {winner}".encode()
    assert client.head_object(Bucket=s3_url.bucket, Key="k")["ETag"] == result["ETag"]


def test_a_get_with_the_current_etag_is_not_modified(s3_url: S3Place) -> None:
    client = s3_url.client()
    etag = client.put_object(Bucket=s3_url.bucket, Key="k", Body=b"v1")["ETag"]
    assert error_of(lambda: client.get_object(Bucket=s3_url.bucket, Key="k",
                                              IfNoneMatch=etag)) == ("304", 304)
    client.put_object(Bucket=s3_url.bucket, Key="k", Body=b"v2")
    changed = client.get_object(Bucket=s3_url.bucket, Key="k", IfNoneMatch=etag)
    assert changed["Body"].read() == b"v2" and changed["ETag"] != etag


def test_a_wrong_secret_is_forbidden_and_a_missing_bucket_not_found(s3_url: S3Place) -> None:
    wrong = s3_url.server.client(secret_key="not-the-secret", retries={"max_attempts": 1})
    assert error_of(lambda: wrong.head_bucket(Bucket=s3_url.bucket)) == ("403", 403)
    client = s3_url.client()
    client.head_bucket(Bucket=s3_url.bucket)  # the same request, signed right
    missing = f"t-{uuid.uuid4().hex}"
    assert error_of(lambda: client.head_bucket(Bucket=missing)) == ("404", 404)
    # As on AWS, a write does not create the bucket (-s3.autoCreateBucket=false).
    assert error_of(lambda: client.put_object(Bucket=missing, Key="k", Body=b"x")) \
        == ("NoSuchBucket", 404)
    assert error_of(lambda: client.head_bucket(Bucket=missing)) == ("404", 404)


def test_own_server_keeps_its_objects_across_stop_start_and_kill(own_s3_server: SeaweedServer
                                                                ) -> None:
    from botocore.exceptions import EndpointConnectionError

    server = own_s3_server
    endpoint = server.endpoint_url
    server.create_bucket("outage")
    server.client().put_object(Bucket="outage", Key="before-stop", Body=b"kept")
    server.stop()
    assert not server.running
    down = server.client(retries={"max_attempts": 1}, connect_timeout=2)
    with pytest.raises(EndpointConnectionError):
        down.list_buckets()
    server.start()
    assert server.endpoint_url == endpoint
    client = server.client()
    assert body_of(client, "outage", "before-stop") == b"kept"
    client.put_object(Bucket="outage", Key="before-kill", Body=b"kept too")
    server.kill()
    assert not server.running
    server.start()
    assert body_of(server.client(), "outage", "before-kill") == b"kept too"
    assert body_of(server.client(), "outage", "before-stop") == b"kept"


def test_servers_listen_on_loopback_only_on_their_own_ports(s3_server: SeaweedServer,
                                                            own_s3_server: SeaweedServer) -> None:
    """Two at once, and each binds nothing but 127.0.0.1 and the ports it was given: never a
    SeaweedFS default port nor `make demo`'s."""
    expected = {}
    for server in (s3_server, own_s3_server):
        assert server.process is not None
        ports = {port + offset for port in server.ports.values() for offset in (0, GRPC_OFFSET)}
        expected[server.process.pid] = {("127.0.0.1", port) for port in ports}
    assert not set.intersection(*expected.values())
    for pid, addresses in expected.items():
        # The admin server binds last, after the S3 gateway answers.
        wait_until(lambda pid=pid, addresses=addresses: listening(pid) >= addresses,
                   "every port bound", timeout=30)
        assert listening(pid) == addresses


def listening(pid: int) -> set[tuple[str, int]]:
    """(address, port) of every TCP socket `pid` listens on, IPv4 and IPv6, from /proc."""
    inodes = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            target = os.readlink(fd)
        except OSError:
            continue  # closed while listed
        if target.startswith("socket:["):
            inodes.add(target[len("socket:["):-1])
    found = set()
    for table in ("tcp", "tcp6"):
        for line in Path(f"/proc/{pid}/net/{table}").read_text().splitlines()[1:]:
            fields = line.split()
            local, state, inode = fields[1], fields[3], fields[9]
            if state == "0A" and inode in inodes:  # TCP_LISTEN
                address, port = local.split(":")
                found.add((_address(address), int(port, 16)))
    return found


def _address(hexed: str) -> str:
    raw = bytes.fromhex(hexed)
    if len(raw) == 4:  # /proc/net/tcp: one little-endian word
        return ".".join(str(b) for b in reversed(raw))
    return f"ipv6:{hexed}"  # never expected: reported as is
