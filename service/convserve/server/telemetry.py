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
    convserve_jobs_running                         gauge: jobs this replica runs now (0 or 1)
    convserve_jobs_queued                          gauge: jobs waiting in the job store's queue
    convserve_training_images_per_second           gauge: this replica's running job (0: none)
    process_*, python_*                            prometheus-client's own collectors

Per replica, so that a sum over replicas counts each thing once, except convserve_jobs_queued:
the one shared queue, which every replica reports alike (aggregate it with max). A scrape costs
the same whatever the store holds (the queue folder lists the waiting jobs only). A replica with
the train role has no serving metrics.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.registry import Collector

from convserve.jobs import JobRunner
from convserve.metrics import ReadAtScrape, new_registry

if TYPE_CHECKING:
    from convserve.server.server import Serving

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


def replica_registry(requests: RequestMetrics, runner: JobRunner, serving: Serving | None
                     ) -> CollectorRegistry:
    registry = new_registry()
    collectors: list[Collector] = [requests.calls, requests.latency, requests.streams]
    gauges = ReadAtScrape()
    if serving is not None:
        batcher, manager = serving.batcher, serving.manager
        collectors += [*batcher.metrics.all(), serving.predictor.images, *manager.metrics.all()]
        gauges.add("convserve_queue_images", "Images waiting for a batch",
                   lambda: batcher.queued_images)
        gauges.add("convserve_model_version", "The version serving Predict (0: none)",
                   lambda: manager.live_version or 0)
        gauges.add("convserve_replaced_models_unreleased",
                   "Replaced models whose memory is not yet handed back to the system",
                   lambda: manager.replaced_unreleased)
    gauges.add("convserve_jobs_running", "Training jobs this replica runs now (0 or 1)",
               runner.running_here)
    gauges.add("convserve_jobs_queued", "Jobs waiting in the job store's queue: the same on every "
               "replica (aggregate with max, not sum)", runner.queued)
    gauges.add("convserve_training_images_per_second",
               "Training throughput of the job this replica runs (0: none)",
               lambda: runner.training_images_per_s)
    for collector in (*collectors, gauges):
        registry.register(collector)
    return registry
