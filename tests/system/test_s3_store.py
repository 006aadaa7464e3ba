"""The model store on S3-compatible object storage (a real SeaweedFS server, tests/s3.py): replicas
that share no disk (jobs on PostgreSQL, models and checkpoints in a bucket, each replica with a
local work dir of its own), the object store going down under a serving replica, and a replica
refused by the store at start. Real `convserve serve` processes (tests/servers.py)."""

from __future__ import annotations

import hashlib
import os
import subprocess
import threading
import time
import uuid
from collections.abc import Sequence
from datetime import datetime
from pathlib import Path

import pytest

from convserve.cli.launch import serve_command
from convserve.client import Client
from convserve.store.location import location_of, open_store
from convserve.store.s3 import S3Store
from tests.conftest import REPO_ROOT, SMALL_SYNTHETIC, python_env
from tests.s3 import S3Place, SeaweedServer
from tests.servers import ServerProcess, images, publish, running_server
from tests.waits import wait_until

pytestmark = pytest.mark.slow
TRAINING_S = 300  # a bound for 2 shared cores, never a measurement
POLL_S = 0.2  # ServerProcess's --poll-interval-s
# Between the pointer moving and a caller's first answer from the new version, beyond the
# replica's two poll intervals and its own measured load time (download, open, warm-up): the
# pointer's GET, handing the answer back, the next Predict (callers pause 20 ms) and the
# scheduling of five processes on two cores.
SLACK_S = 0.5
ACCEPT_ANY = ("--min-improvement", "-1")  # the operator's gate: any candidate passes
OUTAGE_S = 10.0
OUTAGE_LOG = "cannot read the promoted version"
BACK_LOG = "the model store answers again"


class Load:
    """`callers` threads per address calling Predict (no retries) until stop(); every answer is
    kept as (wall-clock time, version), every failure as its repr."""

    def __init__(self, addresses: Sequence[str], callers: int = 3) -> None:
        self.answers: dict[str, list[tuple[float, int]]] = {a: [] for a in addresses}
        self.failures: list[str] = []
        self._done = threading.Event()
        self._threads = [threading.Thread(target=self._call, args=(a, n), daemon=True)
                         for a in addresses for n in range(callers)]
        for thread in self._threads:
            thread.start()

    def _call(self, address: str, seed: int) -> None:
        with Client(address, retries=0, timeout=30) as client:
            while not self._done.is_set():
                try:
                    version = client.predict(images(2, seed)).version
                    self.answers[address].append((time.time(), version))
                except Exception as error:  # each one is reported at the end
                    self.failures.append(f"{address}: {error!r}")
                self._done.wait(0.02)  # steady traffic that leaves the cores to the rest

    def count(self, address: str) -> int:
        return len(self.answers[address])

    def first_answer(self, address: str, version: int) -> float | None:
        return next((at for at, v in list(self.answers[address]) if v == version), None)

    def stop(self) -> None:
        self._done.set()
        for thread in self._threads:
            thread.join(timeout=60)


def _store(url: str, endpoint_url: str, work: Path) -> S3Store:
    """The test's own handle on the store, with a work dir of its own (no replica's)."""
    store = open_store(location_of(url, s3_endpoint_url=endpoint_url, work_dir=work))
    assert isinstance(store, S3Store)
    return store


def _load_seconds(replica: ServerProcess) -> float:
    """What the replica spent loading versions so far (download, open, check, warm-up)."""
    return sum(replica.metric("convserve_model_load_seconds_sum", phase=phase)
               for phase in ("open", "warmup"))


def _log_count(replica: ServerProcess, text: str) -> int:
    return sum(text in line for line in list(replica.stderr_lines))


def _keys(place: S3Place, under: str) -> list[str]:
    """Every key under `under` in the store's prefix, relative to the prefix."""
    root = f"{place.prefix}/"
    pages = place.client().get_paginator("list_objects_v2").paginate(
        Bucket=place.bucket, Prefix=root + under)
    return [item["Key"][len(root):] for page in pages for item in page.get("Contents", ())]


def test_replicas_sharing_no_disk_follow_a_promotion_made_by_a_trainer_elsewhere(
        s3_url: S3Place, postgres_url: str, datasets: Path, onnx_models, tmp_path: Path) -> None:
    store = _store(s3_url.url, s3_url.endpoint_url, tmp_path / "test-work")
    assert publish(store, onnx_models["bad"], accuracy=0.1) == 1
    work = {name: tmp_path / f"work-{name}" for name in ("a", "b", "trainer")}

    def flags(name: str, role: str) -> tuple[str, ...]:
        return ("--role", role, "--jobs-url", postgres_url, "--s3-endpoint-url",
                s3_url.endpoint_url, "--work-dir", str(work[name]), *ACCEPT_ANY)

    with running_server(s3_url.url, datasets, *flags("a", "serve")) as serve_a, \
            running_server(s3_url.url, datasets, *flags("b", "serve")) as serve_b, \
            running_server(s3_url.url, datasets, *flags("trainer", "train")) as trainer, \
            Client(serve_a.address) as client:
        serving = {"A": serve_a, "B": serve_b}
        load = Load([serve_a.address, serve_b.address])
        try:
            for replica in serving.values():
                wait_until(lambda r=replica: load.count(r.address) > 0, "a first Predict")
            assert {load.answers[r.address][0][1] for r in serving.values()} == {1}
            loaded_before = {name: _load_seconds(r) for name, r in serving.items()}

            job = client.train(SMALL_SYNTHETIC, epochs=1, min_accuracy=0.0)
            final = client.wait(job.id, timeout=TRAINING_S)
            assert final.state == "PROMOTED", (final.error, final.gate_reason)
            assert final.model_version == 2
            entry = store.history()[-1]
            assert (entry.version, entry.previous) == (2, 1)
            # Stamped just before the pointer's write: the latencies below are upper bounds.
            moved_at = datetime.fromisoformat(entry.time).timestamp()

            latency, bound = {}, {}
            for name, replica in serving.items():
                first = wait_until(lambda r=replica: load.first_answer(r.address, 2),
                                   f"replica {name} to serve version 2")
                latency[name] = first - moved_at
                load_s = _load_seconds(replica) - loaded_before[name]
                assert load_s > 0  # it loaded version 2 itself, from the bucket
                bound[name] = 2 * POLL_S + load_s + SLACK_S
            assert all(latency[n] <= bound[n] for n in serving), (latency, bound)

            # The trainer kept the job's files in the bucket, where another trainer resumes.
            names = _keys(s3_url, f"jobs/{job.id}/")
            assert f"jobs/{job.id}/checkpoints/last.pt" in names, names
            assert any(n.startswith(f"jobs/{job.id}/tensorboard/") and "tfevents" in n
                       for n in names), names
            # Each serving replica downloaded the version into its own work dir's cache.
            sha256 = store.card(2)["sha256"]
            for name in ("a", "b"):
                cached = work[name] / "cache" / f"2-{sha256}.onnx"
                assert cached.is_file(), sorted((work[name] / "cache").iterdir())
                assert hashlib.sha256(cached.read_bytes()).hexdigest() == sha256
            assert not (work["trainer"] / "cache" / f"2-{sha256}.onnx").exists()
            # Nothing of the job on the serving replicas' disks: its record is in PostgreSQL,
            # its files on the trainer's disk and in the bucket.
            assert (work["trainer"] / "jobs" / job.id / "checkpoints" / "last.pt").is_file()
            for name in ("a", "b"):
                kept = {p.relative_to(work[name]).parts[0] for p in work[name].rglob("*")
                        if p.is_file()}
                assert kept == {"cache"}, (name, kept)
            assert [r.metric("convserve_model_version") for r in serving.values()] == [2, 2]
        finally:
            load.stop()
        codes = [serve_a.stop(), serve_b.stop(), trainer.stop()]
        assert codes == [0, 0, 0], (codes, trainer.stderr_lines[-20:])
    print(f"pointer to first version-2 answer: {latency} (bounds {bound})")
    assert all(load.count(r.address) > 0 for r in serving.values())
    assert load.failures == [], load.failures[:5]


def test_object_storage_down_under_a_serving_replica(
        own_s3_server: SeaweedServer, datasets: Path, onnx_models, tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    # The replica (and this test's store handle) reach the dedicated server by the environment.
    for name in [name for name in os.environ if name.startswith("AWS_")]:
        monkeypatch.delenv(name)
    for name, value in own_s3_server.env().items():
        monkeypatch.setenv(name, value)
    own_s3_server.create_bucket("models")
    url, endpoint = "s3://models/store", own_s3_server.endpoint_url
    store = _store(url, endpoint, tmp_path / "test-work")
    assert publish(store, onnx_models["bad"], accuracy=0.1) == 1

    with running_server(url, datasets, "--role", "serve", "--s3-endpoint-url", endpoint,
                        "--work-dir", str(tmp_path / "work")) as replica, \
            Client(replica.address, retries=0) as client:
        load = Load([replica.address])
        try:
            wait_until(lambda: load.count(replica.address) > 0, "a first Predict")
            assert replica.metric("convserve_store_up") == 1
            assert replica.metric("convserve_store_poll_errors_total") == 0

            own_s3_server.stop()
            down_since = time.monotonic()
            wait_until(lambda: replica.metric("convserve_store_up") == 0, "the outage noticed")
            wait_until(lambda: _log_count(replica, OUTAGE_LOG), "the outage logged")
            answered = load.count(replica.address)
            while time.monotonic() - down_since < OUTAGE_S:  # the outage's length, not an order
                assert client.health() == "SERVING"
                assert replica.metric("convserve_store_up") == 0
                assert client.predict(images(1)).version == 1
                time.sleep(0.25)
            assert load.count(replica.address) > answered + 20  # served all along
            assert replica.metric("convserve_store_poll_errors_total") >= 2  # polled on
            assert _log_count(replica, OUTAGE_LOG) == 1  # once, not per poll

            own_s3_server.start()
            wait_until(lambda: replica.metric("convserve_store_up") == 1, "the store back")
            wait_until(lambda: _log_count(replica, BACK_LOG), "the recovery logged")
            loaded_before = _load_seconds(replica)
            assert publish(store, onnx_models["good"]) == 2
            moved_at = datetime.fromisoformat(store.history()[-1].time).timestamp()
            first = wait_until(lambda: load.first_answer(replica.address, 2),
                               "version 2 served")
            latency = first - moved_at
            bound = 2 * POLL_S + (_load_seconds(replica) - loaded_before) + SLACK_S
            assert latency <= bound, (latency, bound)
            print(f"pointer to first version-2 answer after the outage: {latency:.3f} s "
                  f"(bound {bound:.3f} s)")
            assert client.predict(images(1)).version == 2
            assert replica.metric("convserve_store_up") == 1
            assert (_log_count(replica, OUTAGE_LOG), _log_count(replica, BACK_LOG)) == (1, 1)
            assert client.health() == "SERVING"
        finally:
            load.stop()
        assert replica.stop() == 0, replica.stderr_lines[-10:]
    assert load.failures == [], load.failures[:5]


def _refused_start(place: S3Place, store_url: str, tmp_path: Path, **env: str
                   ) -> subprocess.CompletedProcess[str]:
    """`convserve serve` on `store_url`, which must refuse to start; WARNING level, so that
    stderr holds what it prints besides its log."""
    command = serve_command("--store", store_url, "--s3-endpoint-url", place.endpoint_url,
                            "--work-dir", str(tmp_path / "work"), "--datasets-root",
                            str(tmp_path), "--port", "0", "--metrics-port", "-1",
                            "--log-level", "WARNING")
    return subprocess.run(command, cwd=REPO_ROOT, env=python_env() | env, capture_output=True,
                          text=True, stdin=subprocess.DEVNULL, timeout=60, check=False)


def test_wrong_credentials_or_a_missing_bucket_stop_the_start_with_one_line(
        s3_url: S3Place, tmp_path: Path) -> None:
    denied = _refused_start(s3_url, s3_url.url, tmp_path, AWS_SECRET_ACCESS_KEY="not-the-key")
    assert denied.returncode == 2, denied.stderr
    assert denied.stdout == ""  # never said it listens
    lines = denied.stderr.splitlines()
    assert len(lines) == 1, lines
    assert lines[0].startswith("convserve serve: error: model store: access denied"), lines
    assert s3_url.url in lines[0] and "credentials" in lines[0], lines

    missing = f"t-missing-{uuid.uuid4().hex[:12]}"
    gone = _refused_start(s3_url, f"s3://{missing}/store", tmp_path)
    assert gone.returncode == 2, gone.stderr
    lines = gone.stderr.splitlines()
    assert len(lines) == 1, lines
    assert lines[0].startswith(f"convserve serve: error: model store: no bucket '{missing}'"), \
        lines
