"""`convserve serve --workers N`: real worker processes sharing one port (SO_REUSEPORT), and the
refusal of a port that another process holds."""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Callable
from pathlib import Path
from urllib.request import urlopen

import grpc
import pytest

from convserve.cli.launch import serve_command
from convserve.pb.convserve.v1 import convserve_pb2 as pb
from convserve.pb.convserve.v1 import convserve_pb2_grpc as pb_grpc
from convserve.server.config import ServerConfig
from convserve.store.directory import DirectoryStore
from tests.conftest import REPO_ROOT, python_env
from tests.servers import ServerProcess, predict_request, running_server, scraped
from tests.waits import wait_until

pytestmark = pytest.mark.slow


def _calls(metrics_url: str, method: str) -> float:
    return scraped(metrics_url, "convserve_request_seconds_count", method=method, code="OK") or 0.0


def _connections_per_worker(server: ServerProcess) -> dict[int, grpc.Channel]:
    """One channel (its own TCP connection) landing on each worker, found by asking which
    worker's metrics counted a GetModel sent over it."""
    found: dict[int, grpc.Channel] = {}
    for _ in range(64):
        channel = grpc.insecure_channel(server.address,
                                        options=[("grpc.use_local_subchannel_pool", 1)])
        before = [_calls(url, "GetModel") for url in server.metrics_urls]
        pb_grpc.InferenceStub(channel).GetModel(pb.GetModelRequest(), timeout=30)
        after = [_calls(url, "GetModel") for url in server.metrics_urls]
        (worker,) = [i for i, (b, a) in enumerate(zip(before, after, strict=True)) if a > b]
        if worker in found:
            channel.close()
        else:
            found[worker] = channel
        if len(found) == len(server.metrics_urls):
            return found
    raise AssertionError(f"64 connections reached only workers {sorted(found)}")


def _child_pids(pid: int) -> set[int]:
    return {int(c) for task in Path(f"/proc/{pid}/task").glob("*/children")
            for c in task.read_text().split()}


def test_two_workers_on_one_port_both_answer_predict(store_with_model) -> None:
    store, datasets = store_with_model
    with running_server(store, datasets, "--workers", "2", "--http-port", "0") as server:
        assert len(server.metrics_urls) == 2 and len(_child_pids(server.process.pid)) == 2
        # Each worker's Open Inference HTTP port (port 0: one each) answers too.
        assert len(server.http_urls) == 2
        for url in server.http_urls:
            assert urlopen(f"{url}/v2/health/ready", timeout=10).status == 200
        channels = _connections_per_worker(server)
        for worker, channel in channels.items():
            before = _calls(server.metrics_urls[worker], "Predict")
            reply = pb_grpc.InferenceStub(channel).Predict(predict_request(3), timeout=30)
            assert reply.model_version == 1 and list(reply.shape) == [3, 10]
            assert _calls(server.metrics_urls[worker], "Predict") == before + 1
            channel.close()


def test_a_train_sent_to_either_worker_runs_once_on_worker_zero(store_with_model) -> None:
    store, datasets = store_with_model
    with running_server(store, datasets, "--workers", "2") as server:
        channels = _connections_per_worker(server)
        w0, w1 = (pb_grpc.TrainingStub(channels[i]) for i in (0, 1))
        gate = pb.GateOverrides(min_accuracy=0.0)
        request = pb.TrainRequest(dataset="synthetic:200", epochs=1, gate=gate)
        keyed = pb.TrainRequest(dataset="synthetic:200", epochs=1, gate=gate,
                                idempotency_key="same-key")
        first = w1.Train(keyed, timeout=30)
        assert w0.Train(keyed, timeout=30).id == first.id  # the retry on the other worker
        second = w0.Train(request, timeout=30)
        third = w1.Train(request, timeout=30)
        # One queue, in the store: every worker answers for every job.
        assert w1.GetJob(pb.GetJobRequest(id=third.id), timeout=30).queue_position >= 1
        cancelled = w1.CancelJob(pb.CancelJobRequest(id=third.id), timeout=30)
        assert cancelled.state == pb.CANCELLED
        wait_until(lambda: all(w1.GetJob(pb.GetJobRequest(id=j.id), timeout=30).state
                               in (pb.PROMOTED, pb.REJECTED) for j in (first, second)),
                   "both jobs to finish", timeout=300, interval=0.5)
        workers = _child_pids(server.process.pid)
        records = {}
        for job in (first, second, third):
            job_dir = DirectoryStore(store).work.job_dir(job.id)
            records[job.id] = json.loads((job_dir / "job.json").read_text())
            starts = [e for e in map(json.loads, (job_dir / "events.jsonl").read_text()
                                     .splitlines())
                      if e.get("type") == "state" and e.get("state") == "RUNNING"]
            assert len(starts) == (0 if job is third else 1), (job.id, starts)
        trainers = {records[j.id]["trainer"] for j in (first, second)}
        assert len(trainers) == 1 and int(trainers.pop().rpartition(":")[2]) in workers
        assert records[third.id]["trainer"] == ""  # cancelled while queued: never claimed
        assert {records[j.id]["replica"] for j in (first, third)} != {records[second.id]["replica"]}
        # One job at a time: the second started after the first had finished.
        assert records[second.id]["started_at"] >= records[first.id]["finished_at"]


def test_sigterm_drains_every_worker_and_exits_zero(store_with_model) -> None:
    store, datasets = store_with_model
    server = ServerProcess(store, datasets, "--workers", "2")
    try:
        workers = _child_pids(server.process.pid)
        channels = _connections_per_worker(server)
        outcomes: dict[int, list[str]] = {worker: [] for worker in channels}
        failed_at: list[float] = []  # time.monotonic() of each call that did not succeed
        stop = threading.Event()
        details: list[str] = []
        request = predict_request(1)

        def load(worker: int) -> None:  # calls in flight on each worker when SIGTERM lands
            stub = pb_grpc.InferenceStub(channels[worker])
            while not stop.is_set():
                try:
                    stub.Predict(request, timeout=30)
                    outcomes[worker].append("OK")
                except grpc.RpcError as error:
                    outcomes[worker].append(error.code().name)
                    failed_at.append(time.monotonic())
                    details.append(f"{worker} {error.code().name} {error.details()}")
                    if error.code() == grpc.StatusCode.UNAVAILABLE:
                        return  # draining or gone: new calls are refused

        threads = [threading.Thread(target=load, args=(w,)) for w in channels]
        for thread in threads:
            thread.start()
        while min(len(o) for o in outcomes.values()) < 20:
            time.sleep(0.01)
        signalled_at = time.monotonic()
        server.process.send_signal(signal.SIGTERM)
        assert server.process.wait(timeout=60) == 0
        stop.set()
        for thread in threads:
            thread.join(timeout=60)
        for worker, seen in outcomes.items():
            # Every call completed or was refused as the worker drained. gRPC's core answers
            # CANCELLED to a call that reached it once its shutdown had begun, before any
            # handler took it (a caller retrying at once can meet that more than once).
            assert set(seen) <= {"OK", "UNAVAILABLE", "CANCELLED"}, (worker, details)
            assert seen.count("OK") >= 20
        assert all(at >= signalled_at for at in failed_at), details  # none before the drain
        assert all(not Path(f"/proc/{pid}").exists() for pid in workers)
        assert not any("Traceback" in line for line in server.stderr_lines)
    finally:
        server.stop()


def _serve_beside_a_listener(store: Path, datasets: Path, flags: Callable[[int], list[str]]
                             ) -> tuple[int, subprocess.CompletedProcess[str]]:
    """`convserve serve` with `flags(port)` while another socket listens on `port`."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = subprocess.run(
            serve_command("--store", str(store), "--datasets-root", str(datasets), *flags(port)),
            cwd=REPO_ROOT, env=python_env(),
            capture_output=True, text=True, timeout=60)
    return port, result


@pytest.mark.parametrize("extra", [[], ["--workers", "2"]], ids=["one process", "two workers"])
def test_a_busy_port_is_refused_with_one_line_and_exit_2(store_with_model, extra) -> None:
    port, result = _serve_beside_a_listener(
        *store_with_model, lambda port: ["--port", str(port), "--metrics-port", "-1", *extra])
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        f"convserve serve: error: gRPC port {port} on 127.0.0.1 is already in use (Address "
        "already in use); stop the other server or choose another port"]
    assert result.stdout == ""


def test_a_busy_metrics_port_is_refused_with_one_line_naming_it(store_with_model) -> None:
    port, result = _serve_beside_a_listener(
        *store_with_model,
        lambda port: ["--port", "0", "--metrics-port", str(port), "--log-level", "WARNING"])
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        f"convserve serve: error: metrics port {port} on 127.0.0.1 is not available (Address "
        "already in use); choose another --metrics-port, or -1 to turn metrics off"]


def test_a_busy_http_port_is_refused_with_one_line_naming_it(store_with_model) -> None:
    port, result = _serve_beside_a_listener(
        *store_with_model, lambda port: ["--port", "0", "--metrics-port", "-1", "--http-port",
                                         str(port), "--log-level", "WARNING"])
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        f"convserve serve: error: HTTP port {port} on 127.0.0.1 is not available (Address "
        "already in use); choose another --http-port, or -1 to turn it off"]


def test_the_configuration_reaches_a_worker_unchanged(tmp_path: Path) -> None:
    token = tmp_path / "token"
    token.write_text("secret\n")
    config = ServerConfig(store=tmp_path / "s", port=123, workers=3, auth_token_file=str(token),
                          allow_spinning=True, batch_timeout_s=0.25)
    assert ServerConfig.from_json(config.to_json()) == config
