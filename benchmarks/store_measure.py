"""benchmarks/store.py's measurements, one round of one backend each: the pointer poll, a model
download into a fresh cache, a promotion until every replica serves it, and idle CPU."""

from __future__ import annotations

import random
import shutil
import threading
import time
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

from serve_servers import cpu_seconds
from store_backends import Backend, Replica

from convserve.contracts.model_card import GateDecision
from convserve.store import base
from convserve.store.base import ModelStore

WATCH_EVERY_S = 0.02   # how often each replica's gauge is read while a promotion spreads
SPREAD_TIMEOUT_S = 120.0
_MOVED: list[float] = []  # monotonic times at which a publish had just moved the pointer


def _pointer_moved(name: str) -> None:
    """Both stores call crash_point("before_history") right after the pointer moved (the hook
    the crash-safety tests replace); the promotion's clock starts there."""
    if name == "before_history":
        _MOVED.append(time.monotonic())


def install_pointer_hook() -> None:
    base.crash_point = _pointer_moved


# ------------------------------------------------------------------------------ pointer poll

@dataclass
class PollRound:
    seconds: list[float]   # wall time of each call
    cpu_s: float           # this process's CPU time over all of them


def poll_round(store: ModelStore, calls: int) -> PollRound:
    """`calls` back-to-back `promoted_version()` with the pointer unchanged, as a replica makes
    them (on S3: a conditional GET answered 304 Not Modified)."""
    store.promoted_version()  # the connection open and the ETag known, as in a running replica
    seconds = []
    cpu = time.process_time()
    for _ in range(calls):
        start = time.perf_counter()
        store.promoted_version()
        seconds.append(time.perf_counter() - start)
    return PollRound(seconds, time.process_time() - cpu)


def _text(value: str | bytes) -> str:
    return value.decode("latin-1") if isinstance(value, bytes) else str(value)


def _request_bytes(request: Any) -> int:
    """An HTTP/1.1 request's size as sent: request line, headers (with those http.client adds)
    and body."""
    parts = urlsplit(request.url)
    target = parts.path + (f"?{parts.query}" if parts.query else "")
    headers = {_text(k).lower(): _text(v) for k, v in request.headers.items()}
    headers.setdefault("host", parts.netloc)
    headers.setdefault("accept-encoding", "identity")
    body = request.body if isinstance(request.body, bytes | str) else b""
    return (len(f"{request.method} {target} HTTP/1.1\r\n")
            + sum(len(k) + len(v) + 4 for k, v in headers.items()) + 2 + len(body))


def _response_bytes(response: Any) -> int:
    reason = getattr(getattr(response, "raw", None), "reason", "") or ""
    return (len(f"HTTP/1.1 {response.status_code} {reason}\r\n")
            + sum(len(_text(k)) + len(_text(v)) + 4 for k, v in response.headers.items()) + 2
            + len(response.content or b""))


def poll_wire_bytes(store: ModelStore, calls: int = 20) -> tuple[float, float, int]:
    """(request bytes, response bytes, status) of an unchanged S3 poll, from what botocore sends
    and receives (HTTP only: no TCP/IP headers, no TLS)."""
    events = store.objects._s3.meta.events  # type: ignore[attr-defined]
    sent: list[int] = []
    received: list[tuple[int, int]] = []

    def on_send(request: Any, **_: Any) -> None:
        sent.append(_request_bytes(request))

    def on_reply(http_response: Any, **_: Any) -> None:
        received.append((_response_bytes(http_response), http_response.status_code))

    store.promoted_version()
    events.register("before-send.s3.GetObject", on_send)
    events.register("after-call.s3.GetObject", on_reply)
    try:
        for _ in range(calls):
            store.promoted_version()
    finally:
        events.unregister("before-send.s3.GetObject", on_send)
        events.unregister("after-call.s3.GetObject", on_reply)
    statuses = {status for _, status in received}
    return (sum(sent) / len(sent), sum(b for b, _ in received) / len(received),
            statuses.pop() if len(statuses) == 1 else 0)


# ------------------------------------------------------------------------------ download

def download_round(backend: Backend, version: int) -> tuple[float, float]:
    """(cold, warm) seconds of `open_version(version)`: first into a fresh work directory (an
    empty cache; on a directory store, hashing the file in place), then again (cached)."""
    work = backend.fresh_work_dir()
    try:
        store = backend.open(work)
        store.promoted_version()  # the connection open, as in a polling replica
        start = time.perf_counter()
        store.open_version(version)
        cold = time.perf_counter() - start
        start = time.perf_counter()
        store.open_version(version)
        return cold, time.perf_counter() - start
    finally:
        shutil.rmtree(work, ignore_errors=True)


# ------------------------------------------------------------------------------ promotion

@dataclass
class Promotion:
    version: int
    publish_s: float                 # the whole publish call (upload, card, pointer, history)
    replica_s: list[float] = field(default_factory=list)  # pointer moved -> replica serves it
    load_s: list[float] = field(default_factory=list)     # each replica's open + warm-up


def _watch(replica: Replica, before: int, seen: list[tuple[float, int] | None], index: int,
           stop: threading.Event) -> None:
    """Read the replica's gauge every WATCH_EVERY_S until it serves something other than
    `before`; record when (the reply's arrival) and what."""
    while not stop.is_set():
        version = replica.version()
        if version != before:
            seen[index] = (time.monotonic(), version)
            return
        time.sleep(WATCH_EVERY_S)


def promotion_round(backend: Backend, publisher: ModelStore, replicas: list[Replica],
                    interval_s: float, rng: random.Random) -> Promotion:
    """Publish the ConvNet as a new version (promoted), then time until each replica serves it.
    A random wait first, so the pointer moves at a random point of the replicas' poll cycles."""
    before = publisher.promoted_version() or 0
    if any(replica.version() != before for replica in replicas):
        raise SystemExit(f"{backend.name}: a replica does not serve version {before} yet")
    loaded = [replica.load_seconds() for replica in replicas]
    time.sleep(rng.uniform(0, interval_s))
    seen: list[tuple[float, int] | None] = [None] * len(replicas)
    stop = threading.Event()
    watchers = [threading.Thread(target=_watch, args=(r, before, seen, i, stop), daemon=True)
                for i, r in enumerate(replicas)]
    for watcher in watchers:
        watcher.start()
    _MOVED.clear()
    start = time.perf_counter()
    result = publisher.publish(backend.model_file, {"classes": [str(i) for i in range(10)]},
                               lambda _: GateDecision(True, ("benchmark",)), actor="benchmark")
    publish_s = time.perf_counter() - start
    moved = _MOVED[-1]
    for watcher in watchers:
        watcher.join(timeout=max(0.0, moved + SPREAD_TIMEOUT_S - time.monotonic()))
    stop.set()
    if any(s is None or s[1] != result.version for s in seen):
        raise SystemExit(f"{backend.name}: version {result.version} not served by every replica "
                         f"within {SPREAD_TIMEOUT_S:.0f} s (seen: {seen})")
    assert result.version is not None
    return Promotion(result.version, publish_s, [s[0] - moved for s in seen if s is not None],
                     [r.load_seconds() - before_s for r, before_s in zip(replicas, loaded,
                                                                          strict=True)])


# ------------------------------------------------------------------------------ idle CPU

def idle_cpu(groups: dict[str, list[int]], seconds: float) -> dict[str, float]:
    """Each group's CPU time over `seconds` of wall time, as % of one core per process."""
    before = {label: sum(cpu_seconds(pid) for pid in pids) for label, pids in groups.items()}
    start = time.monotonic()
    time.sleep(seconds)
    elapsed = time.monotonic() - start
    return {label: 100 * (sum(cpu_seconds(pid) for pid in pids) - before[label])
            / elapsed / len(pids) for label, pids in groups.items()}
