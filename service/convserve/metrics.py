"""Prometheus metrics through prometheus-client: one registry per replica (an in-process test
server has its own), the client's process, platform and GC collectors, gauges read at scrape
time, and GET /metrics on `--metrics-port`.

prometheus-client rather than a hand-written exposition: it is the reference implementation of
the format, it brings `process_resident_memory_bytes`, `process_cpu_seconds_total` and the
runtime's own metrics for free, and its metric objects are thread-safe (observed on the event
loop and in worker threads, read by the HTTP thread).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator, Mapping, Sequence
from wsgiref.simple_server import WSGIServer

from prometheus_client import (
    CollectorRegistry,
    GCCollector,
    PlatformCollector,
    ProcessCollector,
    disable_created_metrics,
    start_http_server,
)
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

log = logging.getLogger("convserve.metrics")
# `*_created` series (one per labelled child) would double the page and tell a scraper nothing.
disable_created_metrics()

Labels = tuple[str, ...]
Reading = float | Mapping[Labels, float]


def new_registry() -> CollectorRegistry:
    """A registry with the process (memory, CPU, fds), platform (Python) and GC collectors."""
    registry = CollectorRegistry(auto_describe=True)
    ProcessCollector(registry=registry)
    PlatformCollector(registry=registry)
    GCCollector(registry=registry)
    return registry


class ReadAtScrape(Collector):
    """Gauges whose values are read when scraped: `read()` returns a number, or a mapping from
    label values to numbers. One that fails to read is left out (and logged), never the page."""

    def __init__(self) -> None:
        self._gauges: list[tuple[str, str, Callable[[], Reading], Sequence[str]]] = []

    def add(self, name: str, help_text: str, read: Callable[[], Reading],
            label_names: Sequence[str] = ()) -> None:
        self._gauges.append((name, help_text, read, tuple(label_names)))

    def describe(self) -> Iterator[Metric]:
        return iter(())  # names are checked when the page is made, not at registration

    def collect(self) -> Iterator[Metric]:
        for name, help_text, read, label_names in self._gauges:
            try:
                value = read()
            except Exception:
                log.exception("metric %s could not be read", name)
                continue
            family = GaugeMetricFamily(name, help_text, labels=label_names or None)
            if isinstance(value, Mapping):
                for labels, number in sorted(value.items()):
                    family.add_metric(list(labels), float(number))
            else:
                family.add_metric([], float(value))
            yield family


def serve_http(registry: CollectorRegistry, host: str, port: int) -> WSGIServer:
    """GET /metrics on host:port (0: any free port) in a daemon thread; `shutdown()` stops it.
    The bound port is `server.server_address[1]`."""
    server, _ = start_http_server(port, addr=host, registry=registry)
    return server
