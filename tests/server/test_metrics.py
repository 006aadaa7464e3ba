"""Prometheus metrics: the text format, labels, gauges, and a live replica's /metrics page."""

from __future__ import annotations

import json
import re
import shutil
import socket
import subprocess
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

import grpc
import pytest
from prometheus_client import CollectorRegistry, generate_latest

from convserve.client import Client
from convserve.jobs import JobRunner, RunnerConfig, TrainParams
from convserve.metrics import ReadAtScrape, new_registry, serve_http
from convserve.pb.convserve.v1 import convserve_pb2 as pb
from convserve.pb.convserve.v1 import convserve_pb2_grpc as pb_grpc
from convserve.server.telemetry import RequestMetrics
from convserve.store.directory import DirectoryStore
from tests.servers import images, running_server, sample
from tests.waits import wait_until


def _page(registry: CollectorRegistry) -> str:
    return generate_latest(registry).decode()


def test_requests_are_counted_by_service_and_code_and_streams_apart_from_unary_calls() -> None:
    requests, registry = RequestMetrics(), CollectorRegistry()
    for metric in (requests.calls, requests.latency, requests.streams):
        registry.register(metric)
    requests.observe("Predict", "OK", 0.002, service="convserve.v1.Inference")
    requests.observe("WatchJob", "OK", 42.0, service="convserve.v1.Training", stream=True)
    requests.observe("unknown", "UNIMPLEMENTED", 0.0)
    page = _page(registry)
    assert sample(page, "convserve_requests_total", service="convserve.v1.Inference",
                   method="Predict", code="OK") == 1
    assert sample(page, "convserve_requests_total", service="unknown", method="unknown",
                   code="UNIMPLEMENTED") == 1
    assert sample(page, "convserve_request_seconds_count", method="Predict", code="OK") == 1
    assert sample(page, "convserve_request_seconds_count", method="WatchJob", code="OK") is None
    assert sample(page, "convserve_stream_seconds_count", method="WatchJob", code="OK") == 1
    assert "_created" not in page


def test_gauges_are_read_at_scrape_time_and_a_failing_one_is_left_out() -> None:
    values = {"now": 1.0}
    gauges = ReadAtScrape()
    gauges.add("plain_gauge", "a gauge", lambda: values["now"])
    gauges.add("jobs_gauge", "by state", lambda: {('say "hi"\n',): 3}, ("state",))
    gauges.add("broken_gauge", "raises", lambda: 1 / 0)
    registry = CollectorRegistry()
    registry.register(gauges)
    values["now"] = 2.5
    page = _page(registry)
    assert "plain_gauge 2.5" in page and "broken_gauge" not in page
    assert 'jobs_gauge{state="say \\"hi\\"\\n"} 3.0' in page


def test_the_http_endpoint_serves_the_process_and_runtime_collectors() -> None:
    server = serve_http(new_registry(), "127.0.0.1", 0)
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}/metrics"
        with urllib.request.urlopen(url, timeout=10) as reply:
            assert reply.headers["Content-Type"].startswith("text/plain; version=0.0.4")
            page = reply.read().decode()
    finally:
        server.shutdown()
        server.server_close()
    assert (sample(page, "process_resident_memory_bytes") or 0) > 10e6
    assert sample(page, "process_cpu_seconds_total") is not None
    assert 'python_info{' in page and "python_gc_collections_total" in page


@pytest.mark.slow
def test_a_replica_reports_requests_batches_model_and_jobs(store_with_model) -> None:
    store_dir, datasets = store_with_model
    # 40 jobs another replica queued in the shared store: this serving replica (it runs none)
    # reports the one queue, from its folder, without reading anyone's records.
    other = JobRunner(DirectoryStore(store_dir), RunnerConfig(datasets_root=datasets, max_queue=40,
                                                          replica_id="other"))
    for _ in range(40):
        other.submit(TrainParams.of(dataset="synthetic:64"))
    with running_server(store_dir, datasets, "--role", "serve") as server:
        assert server.metrics_url and re.fullmatch(r"http://127\.0\.0\.1:\d+/metrics",
                                                   server.metrics_url)
        with Client(server.address) as client:
            for count in (1, 3, 2):
                client.predict(images(count, seed=count))
            client.model()
        with grpc.insecure_channel(server.address) as channel:
            with pytest.raises(grpc.RpcError):
                pb_grpc.InferenceStub(channel).Predict(pb.PredictRequest(), timeout=10)
            with pytest.raises(grpc.RpcError):
                next(iter(pb_grpc.TrainingStub(channel).WatchJob(pb.WatchJobRequest(id="nope"),
                                                                 timeout=10)))
            with pytest.raises(grpc.RpcError):
                channel.unary_unary("/no.Such/Method")(b"", timeout=10)
        page = urllib.request.urlopen(server.metrics_url, timeout=10).read().decode()
    assert sample(page, "convserve_requests_total", service="convserve.v1.Inference",
                   method="Predict", code="OK") == 3
    assert sample(page, "convserve_request_seconds_count", method="Predict", code="OK") == 3
    assert sample(page, "convserve_request_seconds_count", method="Predict",
                   code="INVALID_ARGUMENT") == 1
    assert sample(page, "convserve_request_seconds_count", method="GetModel", code="OK") == 1
    assert sample(page, "convserve_stream_seconds_count", method="WatchJob", code="NOT_FOUND") == 1
    assert sample(page, "convserve_requests_total", service="unknown", method="unknown",
                   code="UNIMPLEMENTED") == 1
    assert sample(page, "convserve_batch_size_sum") == 6  # every image went through a batch
    assert sample(page, "convserve_queue_seconds_count") == 3  # one wait per request
    assert (sample(page, "convserve_compute_seconds_count") or 0) >= 1
    assert sample(page, "convserve_images_total", version="1") == 6
    assert sample(page, "convserve_model_swaps_total") == 1
    assert (sample(page, "convserve_model_load_seconds_sum", phase="warmup") or 0) > 0
    assert sample(page, "convserve_model_version") == 1
    assert sample(page, "convserve_queue_images") == 0
    assert sample(page, "convserve_jobs_queued") == 40
    assert sample(page, "convserve_jobs_running") == 0
    assert sample(page, "convserve_training_images_per_second") == 0
    assert (sample(page, "process_resident_memory_bytes") or 0) > 50e6


PROMETHEUS = shutil.which("prometheus")


@pytest.mark.slow
@pytest.mark.skipif(PROMETHEUS is None, reason="prometheus is not installed (.ci/run installs "
                                               "Debian's prometheus; locally: apt-get install "
                                               "prometheus)")
def test_a_real_prometheus_scrapes_a_replica(tmp_path: Path, store_with_model) -> None:
    store_dir, datasets = store_with_model
    with running_server(store_dir, datasets) as server:
        with Client(server.address) as client:
            client.predict(images(3))
        target = server.metrics_url.removeprefix("http://").removesuffix("/metrics")
        (tmp_path / "prometheus.yml").write_text(
            "global: {scrape_interval: 1s}\n"
            "scrape_configs:\n"
            f"  - job_name: convserve\n    static_configs: [{{targets: ['{target}']}}]\n")
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            web = f"127.0.0.1:{probe.getsockname()[1]}"
        prometheus = subprocess.Popen(
            [PROMETHEUS, f"--config.file={tmp_path / 'prometheus.yml'}",
             f"--storage.tsdb.path={tmp_path / 'tsdb'}", f"--web.listen-address={web}"],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        try:
            def scraped() -> bool:
                assert prometheus.poll() is None, prometheus.stderr.read()[-2000:]
                try:
                    return (_query(web, "convserve_model_version") == 1
                            and _query(web, 'convserve_request_seconds_count{method="Predict"}')
                            == 1 and _query(web, 'up{job="convserve"}') == 1
                            and (_query(web, 'process_resident_memory_bytes{job="convserve"}')
                                 or 0) > 50e6)
                except OSError:
                    return False

            wait_until(scraped, "prometheus to scrape the replica", interval=0.5)
        finally:
            prometheus.terminate()
            prometheus.wait(timeout=30)


def _query(web: str, expression: str) -> float | None:
    url = f"http://{web}/api/v1/query?" + urllib.parse.urlencode({"query": expression})
    with urllib.request.urlopen(url, timeout=5) as reply:
        result = json.loads(reply.read())["data"]["result"]
    return float(result[0]["value"][1]) if result else None
