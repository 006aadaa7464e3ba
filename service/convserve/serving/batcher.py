"""Dynamic batching for Predict: many requests, one ONNX Runtime call.

Requests are validated and decoded *before* they are queued (`codec.decode_images`), so a batch
only ever holds well-formed pixels and one bad request can never fail its neighbours. The loop
takes the first waiting request, adds whatever else is queued (waiting at most `batch_timeout_s`
for more) up to `max_batch_size` images, runs the live model once, and resolves each request's
future with its own rows. While ONNX Runtime runs (in a worker thread: it releases the GIL), new
requests queue up and form the next batch by themselves, so under load batches grow without any
waiting, and a lone caller pays no batching delay with the default timeout of 0.

Knobs are named as in TF Serving: `max_batch_size`, `batch_timeout_s`, `max_enqueued` (images
waiting; beyond it Predict answers RESOURCE_EXHAUSTED).

The idle fast path (`inline_max_images`): a small request that finds the batcher idle (nothing
queued, no batch running, no batching delay to wait for, and no request arriving, running
inline or finishing a batch within the last inline run's duration) runs at once, in the
caller's own coroutine on the event loop. That skips the queue, the batch loop's wake-up and
the worker-thread hop, which at a few callers are a large part of the server's own cost. Under
load it would be wrong: ORT would run on the loop's core instead of beside it, one image at a
time, so requests that arrive close together always take the batch loop. Measured in docs/benchmarks.md.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from prometheus_client import Histogram

from convserve.contracts.errors import LimitExceeded
from convserve.serving.loader import LoadedModel

BATCH_SIZE_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)
QUEUE_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5,
                 1.0)


@dataclass(frozen=True)
class BatchingConfig:
    max_batch_size: int = 256     # images per ONNX Runtime call (a larger request runs alone)
    batch_timeout_s: float = 0.0  # how long a batch waits for more requests once it has one
    max_enqueued: int = 4096      # images waiting before new requests are refused
    max_concurrent_batches: int = 1  # ORT calls in flight at once (Triton's instance count)
    inline_max_images: int = 0    # idle fast path: run requests this small on the loop (0: off)

    def __post_init__(self) -> None:
        if (self.max_batch_size < 1 or self.max_enqueued < 1 or self.max_concurrent_batches < 1
                or not 0 <= self.batch_timeout_s <= 1 or self.inline_max_images < 0):
            raise ValueError(f"invalid batching config {self}: need max_batch_size >= 1, "
                             "max_enqueued >= 1, max_concurrent_batches >= 1, "
                             "0 <= batch_timeout_s <= 1, inline_max_images >= 0")


@dataclass
class _Request:
    pixels: np.ndarray
    future: asyncio.Future[tuple[LoadedModel, np.ndarray]]
    queued_at: float


class BatchMetrics:
    """Images per ONNX Runtime call, each request's wait for its batch, and each call's time
    (Triton's queue and compute_infer durations). Registered by the server's telemetry."""

    def __init__(self) -> None:
        self.batch_sizes = Histogram("convserve_batch_size", "Images per ONNX Runtime call",
                                     buckets=BATCH_SIZE_BUCKETS, registry=None)
        self.queue_seconds = Histogram(
            "convserve_queue_seconds", "A request's wait for its batch to start, in seconds "
            "(0 on the idle fast path)", buckets=QUEUE_BUCKETS, registry=None)
        self.compute_seconds = Histogram("convserve_compute_seconds",
                                         "One ONNX Runtime call, in seconds",
                                         buckets=QUEUE_BUCKETS, registry=None)

    def all(self) -> tuple[Histogram, ...]:
        return self.batch_sizes, self.queue_seconds, self.compute_seconds


class DynamicBatcher:
    def __init__(self, current_model: Callable[[], LoadedModel], config: BatchingConfig,
                 metrics: BatchMetrics | None = None) -> None:
        self._current_model = current_model
        self._config = config
        self._waiting: deque[_Request] = deque()
        self._waiting_images = 0
        self._arrived = asyncio.Event()
        self._running = 0  # batches in flight (thread or inline)
        self.inline_batches = 0  # how many ran on the idle fast path (tests, metrics)
        # Load detection for the fast path: when the last request arrived or ran inline, and a
        # moving average of an inline run's duration. A request that comes less than one inline
        # run after that found others arriving or waiting: it goes through the batch loop.
        self._last_activity = 0.0
        self._inline_seconds = 0.0
        self.metrics = metrics or BatchMetrics()

    @property
    def queued_images(self) -> int:
        return self._waiting_images

    async def predict(self, pixels: np.ndarray) -> tuple[LoadedModel, np.ndarray]:
        """Probabilities for `pixels` (uint8 [N, 32, 32, 3]) and the model that computed them."""
        if self._waiting_images + len(pixels) > self._config.max_enqueued:
            raise LimitExceeded(f"prediction queue is full ({self._waiting_images} images "
                                f"waiting, limit {self._config.max_enqueued}); retry later")
        model = self._current_model()  # no model: answer now (NoModel), not from a batch
        now = time.perf_counter()
        idle, self._last_activity = now - self._last_activity, now
        if (len(pixels) <= self._config.inline_max_images and not self._waiting
                and not self._running and self._config.batch_timeout_s == 0
                and idle > self._inline_seconds):
            return model, self._run_inline(model, pixels)
        future = asyncio.get_running_loop().create_future()
        self._waiting.append(_Request(pixels, future, now))
        self._waiting_images += len(pixels)
        self._arrived.set()
        return await future

    def _run_inline(self, model: LoadedModel, pixels: np.ndarray) -> np.ndarray:
        """The idle fast path (module doc). No await between the caller's check and the run, so
        no other batch starts meanwhile and max_concurrent_batches holds."""
        self.inline_batches += 1
        self.metrics.batch_sizes.observe(len(pixels))
        self.metrics.queue_seconds.observe(0.0)
        self._running += 1
        started = time.perf_counter()
        try:
            return model.predict(pixels)
        finally:
            self._running -= 1
            self._last_activity = time.perf_counter()
            seconds = self._last_activity - started
            self.metrics.compute_seconds.observe(seconds)
            self._inline_seconds += 0.2 * (seconds - self._inline_seconds)

    async def run(self, stop: asyncio.Event) -> None:
        """The batch loop: runs until `stop` is set; fails what is still queued when it stops.

        Up to `max_concurrent_batches` batches run at once; the next batch is taken only when a
        slot is free, so requests keep accumulating into it meanwhile.
        """
        slots = asyncio.Semaphore(self._config.max_concurrent_batches)
        running: set[asyncio.Task] = set()
        # A plain Event wait (no wait_for: that costs a task and a timer per wake-up); `stop`
        # wakes the loop through the same event.
        stopper = asyncio.ensure_future(stop.wait())
        stopper.add_done_callback(lambda _: self._arrived.set())
        try:
            while not stop.is_set():
                if not self._waiting:
                    self._arrived.clear()
                    await self._arrived.wait()
                    continue
                await slots.acquire()
                batch = await self._take_batch()
                if not batch:
                    slots.release()
                    continue
                self._running += 1
                task = asyncio.create_task(self._run_batch(batch))
                running.add(task)
                task.add_done_callback(lambda done: self._batch_done(done, running, slots))
        finally:
            stopper.cancel()
            if running:
                await asyncio.wait(running)
            for request in self._waiting:
                if not request.future.done():
                    request.future.set_exception(LimitExceeded("server is shutting down"))

    def _batch_done(self, task: asyncio.Task, running: set[asyncio.Task],
                    slots: asyncio.Semaphore) -> None:
        running.discard(task)
        self._running -= 1
        self._last_activity = time.perf_counter()  # a batch just ended: callers are busy
        slots.release()

    async def _take_batch(self) -> list[_Request]:
        batch: list[_Request] = []
        images = 0
        deadline = asyncio.get_running_loop().time() + self._config.batch_timeout_s
        while True:
            while self._waiting and (not batch or images + len(self._waiting[0].pixels)
                                     <= self._config.max_batch_size):
                request = self._waiting.popleft()
                self._waiting_images -= len(request.pixels)
                if request.future.done():  # cancelled by its caller (deadline): skip it
                    continue
                batch.append(request)
                images += len(request.pixels)
            if self._waiting or images >= self._config.max_batch_size:
                return batch
            remaining = deadline - asyncio.get_running_loop().time()
            if remaining <= 0:
                return batch
            self._arrived.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._arrived.wait(), timeout=remaining)

    async def _run_batch(self, batch: list[_Request]) -> None:
        try:
            model = self._current_model()  # one model per batch: every row from one version
            pixels = (batch[0].pixels if len(batch) == 1
                      else np.concatenate([r.pixels for r in batch]))
            self.metrics.batch_sizes.observe(len(pixels))
            started = time.perf_counter()
            for request in batch:
                self.metrics.queue_seconds.observe(started - request.queued_at)
            probabilities, seconds = await asyncio.to_thread(_timed_predict, model, pixels)
            self.metrics.compute_seconds.observe(seconds)
        except Exception as error:  # e.g. no model any more: every request of the batch learns why
            for request in batch:
                if not request.future.done():
                    request.future.set_exception(error)
            return
        start = 0
        for request in batch:
            end = start + len(request.pixels)
            if not request.future.done():
                request.future.set_result((model, probabilities[start:end]))
            start = end


def _timed_predict(model: LoadedModel, pixels: np.ndarray) -> tuple[np.ndarray, float]:
    """In the worker thread: the call's own time, not the thread hand-off's."""
    started = time.perf_counter()
    probabilities = model.predict(pixels)
    return probabilities, time.perf_counter() - started
