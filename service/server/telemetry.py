"""What one replica exposes on its metrics port, and the one place requests are counted.

    convserve_requests_total{service,method,code}  counter: every call, streams and unknown
                                                   methods (service="unknown") included
    convserve_request_seconds{method,code}         histogram: unary calls' latency
    convserve_stream_seconds{method,code}          histogram: streams' whole duration (WatchJob)
    convserve_batch_size                           histogram: images per ONNX Runtime call
    convserve_queue_seconds                        histogram: a request's wait for its batch
    convserve_compute_seconds                      histogram: one ONNX Runtime call
    convserve_images_total{version}                counter: images served, by model version
    convserve_model_load_seconds{phase}            histogram: opening a version, warming it up
    convserve_model_swaps_total                    counter: live-model swaps
    convserve_queue_images                         gauge: images waiting for a batch
    convserve_model_version                        gauge: the live version (0: none)
    convserve_replaced_models_unreleased           gauge: replaced models whose memory is held
    convserve_jobs{state}                          gauge: this replica's QUEUED and RUNNING jobs
    convserve_training_images_per_second           gauge: this replica's running job (0: none)
    process_*, python_*                            prometheus-client's own collectors

Per replica, so that a sum over replicas counts each thing once (jobs in the shared store are
not counted by every replica), and a scrape costs the same whatever the store holds.
"""

from __future__ import annotations

from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram

from convserve.jobs import JobRunner
from convserve.metrics import ReadAtScrape, new_registry
from convserve.serving.batcher import DynamicBatcher
from convserve.serving.manager import ModelManager
from convserve.serving.predictor import Predictor

LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
                   5.0, 10.0, 30.0)
STREAM_BUCKETS = (0.1, 1.0, 10.0, 60.0, 300.0, 1800.0, 3600.0, 4 * 3600.0)
UNKNOWN = "unknown"


class RequestMetrics:
    """Calls by service, method and code; the servicers' `rpc` wrappers, the guard and the HTTP
    routes observe every call through `observe`."""

    def __init__(self) -> None:
        self.calls = Counter("convserve_requests", "API calls by service, method and status "
                             "code (unknown methods: service and method 'unknown')",
                             ("service", "method", "code"), registry=None)
        self.latency = Histogram("convserve_request_seconds",
                                 "Unary API calls: latency in seconds, by method and status code",
                                 ("method", "code"), buckets=LATENCY_BUCKETS, registry=None)
        self.streams = Histogram("convserve_stream_seconds",
                                 "Streaming calls (WatchJob): whole duration in seconds",
                                 ("method", "code"), buckets=STREAM_BUCKETS, registry=None)
        # Each label set's children, looked up once: `labels()` per call costs a lock and a
        # tuple on every request (the set of keys is bounded: methods x status codes).
        self._children: dict[tuple[str, str, str, bool], tuple[Any, Any]] = {}

    def observe(self, method: str, code: str, seconds: float, *, service: str = UNKNOWN,
                stream: bool = False) -> None:
        key = (service, method, code, stream)
        children = self._children.get(key)
        if children is None:
            children = self._children[key] = (
                self.calls.labels(service, method, code),
                (self.streams if stream else self.latency).labels(method, code))
        children[0].inc()
        children[1].observe(seconds)


def replica_registry(requests: RequestMetrics, batcher: DynamicBatcher, manager: ModelManager,
                     runner: JobRunner, predictor: Predictor) -> CollectorRegistry:
    registry = new_registry()
    for metric in (requests.calls, requests.latency, requests.streams,
                   *batcher.metrics.all(), predictor.images, *manager.metrics.all()):
        registry.register(metric)
    gauges = ReadAtScrape()
    gauges.add("convserve_queue_images", "Images waiting for a batch",
               lambda: batcher.queued_images)
    gauges.add("convserve_model_version", "The version serving Predict (0: none)",
               lambda: manager.live_version or 0)
    gauges.add("convserve_replaced_models_unreleased",
               "Replaced models whose memory is not yet handed back to the system",
               lambda: manager.replaced_unreleased)
    gauges.add("convserve_jobs", "This replica's training jobs, by state (QUEUED, RUNNING)",
               lambda: {(state,): count for state, count in runner.own_jobs().items()},
               ("state",))
    gauges.add("convserve_training_images_per_second",
               "Training throughput of the job this replica runs (0: none)",
               lambda: runner.training_images_per_s)
    registry.register(gauges)
    return registry
