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

from convserve.client import Client
from convserve.metrics import Gauge, Histogram, Registry, serve_http
from convserve.pb.convserve.v1 import convserve_pb2 as pb
from convserve.pb.convserve.v1 import convserve_pb2_grpc as pb_grpc
from tests.servers import images, running_server
from tests.waits import wait_until


def test_a_labelled_histogram_renders_one_series_per_label_set() -> None:
    latency = Histogram("rpc_seconds", "latency", (0.01, 0.1), label_names=("method", "code"))
    for seconds in (0.005, 0.05, 1.0):
        latency.observe(seconds, method="Predict", code="OK")
    latency.observe(0.002, method="Predict", code="INVALID_ARGUMENT")
    text = latency.render()
    assert 'rpc_seconds_bucket{method="Predict",code="OK",le="0.01"} 1' in text
    assert 'rpc_seconds_bucket{method="Predict",code="OK",le="+Inf"} 3' in text
    assert 'rpc_seconds_count{method="Predict",code="INVALID_ARGUMENT"} 1' in text
    assert latency.count == 4
    with pytest.raises(ValueError, match="expected labels"):
        latency.observe(1.0, method="Predict")


def test_gauges_read_at_render_time_and_label_values_are_escaped() -> None:
    values = {"now": 1.0}
    plain = Gauge("g", "a gauge", lambda: values["now"])
    values["now"] = 2.5
    assert plain.render().endswith("g 2.5\n")
    labelled = Gauge("jobs", "jobs by state", lambda: {('say "hi"\n',): 3},
                     label_names=("state",))
    assert 'jobs{state="say \\"hi\\"\\n"} 3' in labelled.render()


def test_a_failing_metric_is_left_out_not_the_whole_page() -> None:
    registry = Registry()
    registry.add(Gauge("good", "fine", lambda: 1))
    registry.add(Gauge("bad", "raises", lambda: 1 / 0))
    assert "good 1" in registry.render() and "bad" not in registry.render()
    with pytest.raises(ValueError, match="registered twice"):
        registry.add(Gauge("good", "again", lambda: 2))


def test_the_http_endpoint_serves_metrics_and_404_elsewhere() -> None:
    registry = Registry()
    registry.add(Gauge("up_gauge", "one", lambda: 1))
    server = serve_http(registry, "127.0.0.1", 0)
    try:
        base = f"http://127.0.0.1:{server.server_address[1]}"
        with urllib.request.urlopen(f"{base}/metrics", timeout=10) as reply:
            assert reply.headers["Content-Type"].startswith("text/plain; version=0.0.4")
            assert "up_gauge 1" in reply.read().decode()
        with pytest.raises(urllib.error.HTTPError) as missing:
            urllib.request.urlopen(f"{base}/other", timeout=10)
        assert missing.value.code == 404
    finally:
        server.shutdown()
        server.server_close()


def scrape(url: str) -> dict[str, float]:
    with urllib.request.urlopen(url, timeout=10) as reply:
        text = reply.read().decode()
    samples = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            samples[name] = float(value)
    return samples


@pytest.mark.slow
def test_a_replica_reports_requests_batches_model_and_jobs(store_with_model) -> None:
    store_dir, datasets = store_with_model
    with running_server(store_dir, datasets) as server:
        assert server.metrics_url and re.fullmatch(r"http://127\.0\.0\.1:\d+/metrics",
                                                   server.metrics_url)
        with Client(server.address) as client:
            for count in (1, 3, 2):
                client.predict(images(count, seed=count))
            client.model()
        with grpc.insecure_channel(server.address) as channel, pytest.raises(grpc.RpcError):
            pb_grpc.InferenceStub(channel).Predict(pb.PredictRequest(), timeout=10)
        samples = scrape(server.metrics_url)
    assert samples['convserve_request_seconds_count{method="Predict",code="OK"}'] == 3
    assert samples['convserve_request_seconds_count{method="Predict",code="INVALID_ARGUMENT"}'] == 1
    assert samples['convserve_request_seconds_count{method="GetModel",code="OK"}'] == 1
    assert samples["convserve_batch_size_sum"] == 6  # every image went through a batch
    assert samples["convserve_model_version"] == 1
    assert samples["convserve_queue_images"] == 0
    assert samples['convserve_jobs{state="QUEUED"}'] == 0
    assert samples["convserve_training_images_per_second"] == 0


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
                            == 1 and _query(web, 'up{job="convserve"}') == 1)
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
