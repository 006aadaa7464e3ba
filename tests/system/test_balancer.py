"""Two replicas sharing one store behind a real nginx (deploy/nginx/convserve.conf, ports filled
in): Train and WatchJob through the balancer, Predict served by both replicas with the promoted
version, and one replica killed under load without a lost request (the SDK retries UNAVAILABLE).

nginx is Debian's package; `.ci/run` installs it when missing. It runs in the foreground as this
test's child and is stopped by its PID.
"""

from __future__ import annotations

import shutil
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import grpc
import pytest

from convserve.client import Client, ClientError
from convserve.store.directory import DirectoryStore
from tests.conftest import REPO_ROOT
from tests.servers import ServerProcess, images
from tests.waits import wait_until

pytestmark = pytest.mark.slow
# gRPC allows at most 5 attempts: backoffs of 0.5, 1, 2 and 4 s (with jitter) span the seconds
# nginx takes to stop sending calls to the killed replica (max_fails=1, its in-flight calls 502).
BACKOFF_S = 0.5
NGINX = shutil.which("nginx") or next((p for p in ("/usr/sbin/nginx",) if Path(p).exists()), None)
# Every test that starts nginx carries this: without it they skip, with the reason printed.
needs_nginx = pytest.mark.skipif(NGINX is None, reason="nginx is not installed (.ci/run installs Debian's "
                                                       "nginx; locally: apt-get install nginx)")


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@contextmanager
def nginx_in_front_of(replicas: Sequence[Any], prefix: Path, *,
                      access_log: bool = False) -> Iterator[str]:
    """The documented nginx config with this test's replica ports (anything with an `address`);
    yields its address. `access_log`: nginx logs each request to prefix/access.log."""
    port = _free_port()
    config = (REPO_ROOT / "deploy" / "nginx" / "convserve.conf").read_text()
    if access_log:
        config = config.replace("access_log off;", "access_log access.log;")
    for documented, replica in zip(("127.0.0.1:50051", "127.0.0.1:50052"), replicas, strict=True):
        config = config.replace(documented, replica.address)
    config = config.replace("127.0.0.1:8080", f"127.0.0.1:{port}")
    prefix.mkdir(parents=True, exist_ok=True)
    (prefix / "nginx.conf").write_text(config)
    assert NGINX is not None, "a test that starts nginx lacks @needs_nginx"
    process = subprocess.Popen([NGINX, "-c", str(prefix / "nginx.conf"), "-p", str(prefix),
                                "-g", "daemon off;"], stderr=subprocess.PIPE, text=True)
    try:
        def listening() -> bool:
            assert process.poll() is None, f"nginx exited: {process.stderr.read()}"
            with socket.socket() as probe:
                return probe.connect_ex(("127.0.0.1", port)) == 0

        wait_until(listening, "nginx to listen")
        yield f"127.0.0.1:{port}"
    finally:
        process.send_signal(signal.SIGQUIT)  # graceful stop, by its PID
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def _predict_count(replica: ServerProcess) -> float:
    return replica.metric("convserve_request_seconds_count", method="Predict", code="OK")


@needs_nginx
def test_two_replicas_behind_nginx(tmp_path: Path, store_with_model) -> None:
    store_dir, datasets = store_with_model
    store = DirectoryStore(store_dir)
    replicas = [ServerProcess(store_dir, datasets), ServerProcess(store_dir, datasets)]
    try:
        with nginx_in_front_of(replicas, tmp_path / "nginx") as balancer, \
                Client(balancer, timeout=30, retries=6, backoff_s=BACKOFF_S) as client:
            # Train and WatchJob through the balancer (either replica may answer each call).
            job = client.train("synthetic:200", epochs=1, min_accuracy=0.0)
            final = client.wait(job.id, timeout=300)
            assert final.state in ("PROMOTED", "REJECTED"), final
            promoted = store.promoted_version()

            # Predict through the balancer: both replicas serve, all with the promoted version.
            wait_until(lambda: client.predict(images(1)).version == promoted,
                       "the replicas to converge on the promotion", interval=0)
            before = [_predict_count(r) for r in replicas]
            versions = {client.predict(images(2, seed=i)).version for i in range(40)}
            assert versions == {promoted}
            served = [_predict_count(r) - b for r, b in zip(replicas, before, strict=True)]
            assert all(count > 0 for count in served), served

            # Kill one replica under load: no request the SDK retries is lost.
            failures: list[BaseException] = []
            answered = [0]
            stop = threading.Event()

            def load() -> None:
                with Client(balancer, timeout=30, retries=6, backoff_s=BACKOFF_S) as caller:
                    while not stop.is_set():
                        try:
                            assert caller.predict(images(1)).version == promoted
                            answered[0] += 1
                        except BaseException as error:  # counted, not hidden
                            failures.append(error)

            threads = [threading.Thread(target=load) for _ in range(4)]
            for thread in threads:
                thread.start()
            time.sleep(1.0)
            replicas[0].process.send_signal(signal.SIGKILL)
            time.sleep(2.0)
            stop.set()
            for thread in threads:
                thread.join(timeout=60)
            assert not failures, failures[:3]
            assert answered[0] > 20
    finally:
        for replica in replicas:
            replica.stop()


@needs_nginx
def test_a_proxy_502_for_a_dead_replica_is_retried_by_grpcs_policy(tmp_path: Path) -> None:
    """nginx answers for replicas it cannot reach with a gRPC UNAVAILABLE of its own (the
    documented config's error_page): gRPC's retry policy (the SDK's service config) resends the
    calls that may be resent, `retries` + 1 attempts in all, and sends the others once."""
    dead = [SimpleNamespace(address=f"127.0.0.1:{_free_port()}") for _ in range(2)]
    with nginx_in_front_of(dead, tmp_path / "nginx", access_log=True) as balancer:
        with Client(balancer, timeout=10, retries=2, backoff_s=0.05) as client:
            with pytest.raises(ClientError) as refused:
                client.predict(images(1))
            assert refused.value.code == grpc.StatusCode.UNAVAILABLE
            assert refused.value.details == "no convserve replica answered (nginx)"
            with pytest.raises(ClientError):
                client.promote(1, "not resent: Promote is not idempotent")
        log = (tmp_path / "nginx" / "access.log").read_text()
    assert log.count("/convserve.v1.Inference/Predict") == 3  # retries + 1
    assert log.count("/convserve.v1.Models/Promote") == 1
