"""Real server replicas for integration tests: `convserve serve` in a child process on
127.0.0.1 with a free port, stopped with SIGTERM (the production drain path)."""

from __future__ import annotations

import contextlib
import json
import re
import signal
import socket
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path
from urllib.request import urlopen

import numpy as np

from convserve.cli.launch import ServerStartError, launch, serve_command
from convserve.contracts.model_card import GateDecision
from convserve.pb.convserve.v1 import convserve_pb2 as pb
from convserve.store.base import ModelStore
from tests.conftest import REPO_ROOT, python_env


class ServerProcess:
    def __init__(self, store: Path, datasets: Path, *extra: str) -> None:
        command = serve_command("--store", str(store), "--datasets-root", str(datasets),
                                "--port", "0", "--poll-interval-s", "0.2",
                                "--job-heartbeat-s", "0.5", "--grace-period-s", "5",
                                "--metrics-port", "0", *extra)
        try:
            launched = launch(command, cwd=REPO_ROOT, env=python_env(), stderr=subprocess.PIPE)
        except ServerStartError as error:
            assert error.process.stderr is not None
            raise RuntimeError(f"{error}: {error.process.stderr.read()[-3000:]}") from None
        self.process = launched.process
        self.address = launched.address
        self.metrics_urls = launched.metrics_urls
        self.http_urls = launched.http_urls  # with --http-port: the Open Inference Protocol
        self.metrics_url = self.metrics_urls[0] if self.metrics_urls else None  # worker 0's
        self.stderr_lines: list[str] = []
        # Drain stderr so a chatty server never blocks on a full pipe.
        threading.Thread(target=self._drain, daemon=True).start()

    @property
    def replica_id(self) -> str:
        """The id its job runner claims jobs under (host:pid), as job records name trainers."""
        return f"{socket.gethostname()}:{self.process.pid}"

    def metric(self, name: str, **labels: str) -> float:
        """One sample's value on worker 0's /metrics (0 if absent)."""
        assert self.metrics_url, "the server was started without a metrics port"
        return scraped(self.metrics_url, name, **labels) or 0.0

    def _drain(self) -> None:
        for line in self.process.stderr:
            self.stderr_lines.append(line)

    def stop(self) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        return self.process.returncode


@contextlib.contextmanager
def running_server(store: Path, datasets: Path, *extra: str) -> Iterator[ServerProcess]:
    server = ServerProcess(store, datasets, *extra)
    try:
        yield server
    finally:
        server.stop()


def publish(store: ModelStore, model: Path, accuracy: float = 0.5) -> int:
    """Put a model into the store as a job would (always promoted: the gate is tested elsewhere)."""
    card = json.loads((model.parent / "card.json").read_text()) \
        if (model.parent / "card.json").exists() else {}
    card.setdefault("metrics", {})["onnx_val_accuracy"] = accuracy
    result = store.publish(model, card, lambda _champion: GateDecision(True, ("test",)),
                           actor="test")
    assert result.version is not None
    return result.version


def images(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, 32, 32, 3), dtype=np.uint8)


def predict_request(n: int, seed: int = 0) -> pb.PredictRequest:
    """A Predict of `n` random uint8 NHWC images, for tests that use the raw gRPC stubs."""
    return pb.PredictRequest(raw=pb.RawImages(data=images(n, seed).tobytes(), dtype=pb.UINT8,
                                              layout=pb.NHWC, shape=[n, 32, 32, 3]))


def scraped(metrics_url: str, name: str, **labels: str) -> float | None:
    return sample(urlopen(metrics_url, timeout=10).read().decode(), name, **labels)


def sample(page: str, name: str, **labels: str) -> float | None:
    """One sample of a Prometheus text page: `name` with exactly `labels`, in any order (the
    exposition sorts label names); None if absent."""
    for line in page.splitlines():
        found = re.fullmatch(rf"{re.escape(name)}(?:{{(.*)}})? (\S+)", line)
        if found and dict(re.findall(r'(\w+)="((?:[^"\\]|\\.)*)"', found.group(1) or "")) == labels:
            return float(found.group(2))
    return None
