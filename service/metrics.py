"""Prometheus metrics in the text exposition format, served over HTTP (`--metrics-port`).

Dependency-free on purpose: histograms (optionally labelled), gauges read at scrape time, a
registry, and a small threaded HTTP server for GET /metrics. Histograms are updated from the
event loop and read by the HTTP thread, so each one takes a lock around both.
"""

from __future__ import annotations

import bisect
import logging
import threading
from collections.abc import Callable, Mapping, Sequence
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

log = logging.getLogger("convserve.metrics")

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
Labels = tuple[str, ...]


class Histogram:
    """Cumulative `le` buckets per label set; `observe(value, **labels)`."""

    def __init__(self, name: str, help_text: str, buckets: Sequence[float],
                 label_names: Sequence[str] = ()) -> None:
        if list(buckets) != sorted(buckets) or not buckets:
            raise ValueError(f"{name}: buckets must be ascending and non-empty, got {buckets}")
        self.name, self.help = name, help_text
        self.buckets = tuple(buckets)
        self.label_names = tuple(label_names)
        self._series: dict[Labels, list[float]] = {}  # per bucket (+Inf last), then sum, count
        self._lock = threading.Lock()

    def observe(self, value: float, **labels: str) -> None:
        key = self._key(labels)
        with self._lock:
            series = self._series.setdefault(key, [0] * (len(self.buckets) + 3))
            series[bisect.bisect_left(self.buckets, value)] += 1
            series[-2] += value
            series[-1] += 1

    @property
    def count(self) -> int:
        with self._lock:
            return int(sum(series[-1] for series in self._series.values()))

    @property
    def sum(self) -> float:
        with self._lock:
            return sum(series[-2] for series in self._series.values())

    def render(self) -> str:
        lines = [f"# HELP {self.name} {self.help}", f"# TYPE {self.name} histogram"]
        with self._lock:
            snapshot = {key: list(series) for key, series in self._series.items()}
        for key in sorted(snapshot):
            series = snapshot[key]
            labels = dict(zip(self.label_names, key, strict=True))
            total = 0
            for bound, count in zip((*map(_number, self.buckets), "+Inf"), series, strict=False):
                total += int(count)
                lines.append(f"{self.name}_bucket{_labels(labels | {'le': bound})} {total}")
            lines.append(f"{self.name}_sum{_labels(labels)} {_number(series[-2])}")
            lines.append(f"{self.name}_count{_labels(labels)} {int(series[-1])}")
        return "\n".join(lines) + "\n"

    def _key(self, labels: Mapping[str, str]) -> Labels:
        if set(labels) != set(self.label_names):
            raise ValueError(f"{self.name}: expected labels {list(self.label_names)}, "
                             f"got {sorted(labels)}")
        return tuple(str(labels[name]) for name in self.label_names)


class Gauge:
    """A value read when scraped: `read()` returns a number, or {label values: number}."""

    def __init__(self, name: str, help_text: str,
                 read: Callable[[], float | Mapping[Labels, float]],
                 label_names: Sequence[str] = ()) -> None:
        self.name, self.help, self._read = name, help_text, read
        self.label_names = tuple(label_names)

    def render(self) -> str:
        lines = [f"# HELP {self.name} {self.help}", f"# TYPE {self.name} gauge"]
        value = self._read()
        if isinstance(value, Mapping):
            for key in sorted(value):
                labels = dict(zip(self.label_names, key, strict=True))
                lines.append(f"{self.name}{_labels(labels)} {_number(value[key])}")
        else:
            lines.append(f"{self.name} {_number(value)}")
        return "\n".join(lines) + "\n"


class Registry:
    def __init__(self) -> None:
        self._metrics: list[Histogram | Gauge] = []

    def add(self, metric: Histogram | Gauge) -> Histogram | Gauge:
        if any(m.name == metric.name for m in self._metrics):
            raise ValueError(f"metric {metric.name} is registered twice")
        self._metrics.append(metric)
        return metric

    def render(self) -> str:
        """Every metric; one that fails to read is left out (and logged), never the whole page."""
        parts = []
        for metric in self._metrics:
            try:
                parts.append(metric.render())
            except Exception:
                log.exception("metric %s could not be read", metric.name)
        return "".join(parts)


def serve_http(registry: Registry, host: str, port: int) -> ThreadingHTTPServer:
    """Start GET /metrics on host:port (0: any free port) in a daemon thread; `shutdown()` stops
    it. The bound port is `server.server_address[1]`."""

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            if self.path.split("?", 1)[0] != "/metrics":
                self.send_error(404, "only /metrics is served here")
                return
            body = registry.render().encode()
            self.send_response(200)
            self.send_header("Content-Type", CONTENT_TYPE)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: object) -> None:
            pass  # a scrape every few seconds is not news

    server = ThreadingHTTPServer((host, port), Handler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, name="metrics-http", daemon=True).start()
    return server


def _labels(labels: Mapping[str, str]) -> str:
    if not labels:
        return ""
    return "{" + ",".join(f'{k}="{_escape(str(v))}"' for k, v in labels.items()) + "}"


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _number(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else repr(float(value))
