"""What one replica exposes on its metrics port, and the one place requests are counted.

    convserve_request_seconds{method,code}   histogram: every API call's latency and status code
    convserve_batch_size                     histogram: images per ONNX Runtime call
    convserve_queue_images                   gauge: images waiting for a batch
    convserve_model_version                  gauge: the live version (0: none)
    convserve_replaced_models_unreleased     gauge: replaced models whose memory is not yet freed
    convserve_jobs{state}                    gauge: jobs in the shared store by state
    convserve_training_images_per_second     gauge: this replica's running job (0: none)
"""

from __future__ import annotations

from convserve.contracts.job_dir import JobState
from convserve.jobs import JobRunner
from convserve.metrics import Gauge, Histogram, Registry
from convserve.serving.batcher import DynamicBatcher
from convserve.serving.manager import ModelManager

LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
                   5.0, 10.0, 30.0)


class RequestMetrics:
    """Latency and status code per API method; the servicers' `rpc` wrapper observes every call."""

    def __init__(self) -> None:
        self.latency = Histogram("convserve_request_seconds",
                                 "gRPC calls: latency in seconds, by method and status code",
                                 LATENCY_BUCKETS, label_names=("method", "code"))

    def observe(self, method: str, code: str, seconds: float) -> None:
        self.latency.observe(seconds, method=method, code=code)


def replica_registry(requests: RequestMetrics, batcher: DynamicBatcher, manager: ModelManager,
                     runner: JobRunner) -> Registry:
    registry = Registry()
    registry.add(requests.latency)
    registry.add(batcher.batch_sizes)
    registry.add(Gauge("convserve_queue_images", "Images waiting for a batch",
                       lambda: batcher.queued_images))
    registry.add(Gauge("convserve_model_version", "The version serving Predict (0: none)",
                       lambda: manager.live_version or 0))
    registry.add(Gauge("convserve_replaced_models_unreleased",
                       "Replaced models whose memory is not yet handed back to the system",
                       lambda: manager.replaced_unreleased))
    registry.add(Gauge("convserve_jobs", "Training jobs in the shared store, by state",
                       lambda: _jobs_by_state(runner), label_names=("state",)))
    registry.add(Gauge("convserve_training_images_per_second",
                       "Training throughput of the job this replica runs (0: none)",
                       lambda: runner.training_images_per_s))
    return registry


def _jobs_by_state(runner: JobRunner) -> dict[tuple[str, ...], float]:
    counts: dict[tuple[str, ...], float] = {(state.name,): 0.0 for state in JobState}
    for record in runner.list():
        counts[(record.state.name,)] += 1
    return counts
