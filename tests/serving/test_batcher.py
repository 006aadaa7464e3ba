"""The dynamic batcher: batch formation, timeout, isolation, backpressure, result order.

A real ONNX Runtime session over a real exported model; the model is wrapped only to record the
batch sizes it was called with and, where a test needs batches in flight, to hold each call until
the test lets it go. Events are ordered by those signals and by the batcher's own queue, never by
sleeping.
"""

from __future__ import annotations

import asyncio
import threading
import time

import numpy as np
import pytest

from convserve import arrays
from convserve.contracts.errors import InvalidInput, LimitExceeded, NoModel
from convserve.pb.convserve.v1 import convserve_pb2 as pb
from convserve.serving import codec
from convserve.serving.batcher import BatchingConfig, DynamicBatcher
from convserve.serving.loader import LoadedModel, SessionSettings, load_version
from convserve.store.directory import DirectoryStore
from tests.servers import images, publish
from tests.waits import DEFAULT_LIMIT_S, until


class RecordingModel:
    """The real loaded model; remembers each call's batch size and duration.

    `gated=True`: every call, once counted in `calls` and `in_flight`, waits for `release()`, so
    the test knows exactly which batches are in flight while it queues more requests. `delay_s`
    stands for a slower model's compute time (see the idle fast path's test)."""

    def __init__(self, model: LoadedModel, gated: bool = False, delay_s: float = 0.0) -> None:
        self.model, self.delay_s = model, delay_s
        self.version, self.classes = model.version, model.classes
        self.calls: list[int] = []
        self.seconds: list[float] = []  # each call's own duration, gate included
        self.lock = threading.Lock()
        self.in_flight = self.most_in_flight = 0
        self.gate = threading.Event()
        if not gated:
            self.gate.set()

    def release(self) -> None:
        """Let held calls (and all later ones) run."""
        self.gate.set()

    def predict(self, pixels: np.ndarray) -> np.ndarray:
        started = time.perf_counter()
        with self.lock:
            self.calls.append(len(pixels))
            self.in_flight += 1
            self.most_in_flight = max(self.most_in_flight, self.in_flight)
        try:
            if not self.gate.wait(DEFAULT_LIMIT_S):
                raise AssertionError("the test never released the model")
            if self.delay_s:
                time.sleep(self.delay_s)  # compute time, not a signal: nothing waits on it
            return self.model.predict(pixels)
        finally:
            with self.lock:
                self.in_flight -= 1
                self.seconds.append(time.perf_counter() - started)


@pytest.fixture(scope="module")
def loaded(onnx_models, tmp_path_factory) -> LoadedModel:
    store = DirectoryStore(tmp_path_factory.mktemp("store"))
    publish(store, onnx_models["good"])
    return load_version(store, 1, SessionSettings(providers=("cpu",), intra_op_threads=1))


def _run(coroutine_factory, model: RecordingModel, config: BatchingConfig):
    """Run `coroutine_factory(batcher)` with a batch loop going; returns its result."""

    async def scenario():
        batcher = DynamicBatcher(lambda: model, config)
        stop = asyncio.Event()
        loop_task = asyncio.create_task(batcher.run(stop))
        try:
            return await coroutine_factory(batcher), batcher
        finally:
            model.release()  # a scenario that failed early must not leave a call held
            stop.set()
            await loop_task

    return asyncio.run(scenario())


async def _submit(batcher: DynamicBatcher, pixels: np.ndarray) -> asyncio.Task:
    """Start `batcher.predict(pixels)` in a task; return the task once the request is queued.

    `predict` queues a request before its first await, so once the task has entered it, the
    request is in the batcher's queue (or already taken from it by the batch loop)."""
    entered = asyncio.Event()

    async def request():
        entered.set()
        return await batcher.predict(pixels)

    task = asyncio.create_task(request())
    await entered.wait()  # wakes after the task's first step: predict has queued the request
    return task


def _calls_started(model: RecordingModel, calls: list[int]):
    return lambda: model.calls == calls


def test_concurrent_requests_share_one_call_and_each_gets_its_own_rows(loaded) -> None:
    model = RecordingModel(loaded, gated=True)
    requests = [images(n, seed=n) for n in (1, 3, 2, 1, 4, 1)]

    async def scenario(batcher):
        first = await _submit(batcher, requests[0])
        await until(_calls_started(model, [1]), "the first call to start")
        # The first call is held in flight: the rest queue behind it.
        rest = [await _submit(batcher, r) for r in requests[1:]]
        assert batcher.queued_images == 11
        model.release()
        return await asyncio.gather(first, *rest)

    results, batcher = _run(scenario, model, BatchingConfig(max_batch_size=64))
    assert model.calls == [1, 11]  # everything that queued behind the first call: one batch
    for pixels, (served_by, probabilities) in zip(requests, results, strict=True):
        assert served_by is model
        np.testing.assert_array_equal(probabilities, loaded.predict(pixels))
    assert _totals(batcher.metrics.batch_sizes) == (2, 12)
    assert _totals(batcher.metrics.queue_seconds)[0] == len(requests)  # one wait per request
    assert _totals(batcher.metrics.compute_seconds)[0] == 2  # one per ONNX Runtime call
    # Each observation spans the whole call: the model's own time, the first call's hold included.
    assert len(model.seconds) == 2 and model.seconds[0] > 0
    assert _totals(batcher.metrics.compute_seconds)[1] >= sum(model.seconds)


def test_max_batch_size_splits_batches_but_never_a_request(loaded) -> None:
    model = RecordingModel(loaded, gated=True)

    async def scenario(batcher):
        blocker = await _submit(batcher, images(1))
        await until(_calls_started(model, [1]), "the blocking call to start")
        queued = [await _submit(batcher, images(n)) for n in (3, 3, 3, 9)]
        assert batcher.queued_images == 18
        model.release()
        return await asyncio.gather(blocker, *queued)

    results, _ = _run(scenario, model, BatchingConfig(max_batch_size=6))
    assert model.calls == [1, 6, 3, 9]  # 3+3, then 3 (9 would exceed 6), then 9 alone
    assert [len(p) for _, p in results] == [1, 3, 3, 3, 9]


@pytest.mark.parametrize("concurrent", [1, 2])
def test_at_most_max_concurrent_batches_run_at_once(loaded, concurrent: int) -> None:
    """Triton's instance count: with N slots, N batches overlap and never more; results still
    reach the right callers."""
    model = RecordingModel(loaded, gated=True)
    requests = [images(1, seed=s) for s in range(6)]

    async def scenario(batcher):
        def settled(submitted: int):
            """While calls are held: the first N requests run, one batch each; the rest wait."""
            running = min(submitted, concurrent)
            return lambda: (len(model.calls) == running
                            and batcher.queued_images == submitted - running)

        tasks = []
        for submitted, pixels in enumerate(requests, start=1):  # one at a time: own batches
            tasks.append(await _submit(batcher, pixels))
            await until(settled(submitted), f"{min(submitted, concurrent)} calls in flight and "
                        f"the rest of {submitted} requests queued")
        assert model.in_flight == concurrent  # every slot held, the other requests queued
        model.release()
        return await asyncio.gather(*tasks)

    results, _ = _run(scenario, model, BatchingConfig(max_concurrent_batches=concurrent))
    assert model.most_in_flight == concurrent
    # The queued requests become one batch once a slot frees.
    assert model.calls == [1] * concurrent + [len(requests) - concurrent]
    for pixels, (_, probabilities) in zip(requests, results, strict=True):
        np.testing.assert_array_equal(probabilities, loaded.predict(pixels))


def test_batch_timeout_waits_for_stragglers_and_zero_timeout_does_not(loaded) -> None:
    """The second request arrives after the batch loop took the first. With a timeout the batch
    waits for it (and, not full, runs once the timeout passes); with 0 it has already left.
    The timeout only has to outlast one turn of this test's event loop."""

    async def stragglers(batcher):
        first = await _submit(batcher, images(1))
        await until(lambda: batcher.queued_images == 0, "the batch loop to take the first")
        second = await _submit(batcher, images(1))
        return await asyncio.gather(first, second)

    waiting = RecordingModel(loaded)
    _run(stragglers, waiting, BatchingConfig(batch_timeout_s=0.5))
    assert waiting.calls == [2]
    eager = RecordingModel(loaded)
    _run(stragglers, eager, BatchingConfig(batch_timeout_s=0.0))
    assert eager.calls == [1, 1]


def test_a_full_queue_is_refused_and_queued_requests_still_complete(loaded) -> None:
    model = RecordingModel(loaded, gated=True)

    async def scenario(batcher):
        running = await _submit(batcher, images(1))
        await until(_calls_started(model, [1]), "the first call to start")
        queued = [await _submit(batcher, images(2)) for _ in range(2)]
        assert batcher.queued_images == 4  # the limit
        # Refused before predict's first await: the task is over once it has started.
        refused = await _submit(batcher, images(1))
        assert refused.done(), "a request beyond max_enqueued was queued"
        with pytest.raises(LimitExceeded, match="queue is full"):
            refused.result()
        model.release()
        return await asyncio.gather(running, *queued)

    results, _ = _run(scenario, model, BatchingConfig(max_enqueued=4))
    assert [len(p) for _, p in results] == [1, 2, 2]
    assert model.calls == [1, 4]


def test_a_bad_request_is_refused_before_the_queue_and_neighbours_succeed(loaded) -> None:
    model = RecordingModel(loaded)
    bad = pb.PredictRequest(raw=pb.RawImages(data=bytes(100), shape=[1, 32, 32, 3],
                                             dtype=pb.UINT8))

    async def scenario(batcher):
        async def submit(request):
            return await batcher.predict(codec.decode_images(request, codec.Limits()))

        good = [pb.PredictRequest(raw=arrays.encode_raw(images(1, seed=s))) for s in range(4)]
        tasks = [asyncio.create_task(submit(r)) for r in (good[0], good[1], bad, good[2], good[3])]
        return await asyncio.gather(*tasks, return_exceptions=True)

    results, _ = _run(scenario, model, BatchingConfig())
    assert isinstance(results[2], InvalidInput)
    assert all(isinstance(r, tuple) for i, r in enumerate(results) if i != 2)
    # All five tasks take their first step before the batch loop wakes: the four good requests
    # queue together and share one call, which the bad one never reached.
    assert model.calls == [4]


def test_a_caller_that_gave_up_is_skipped(loaded) -> None:
    model = RecordingModel(loaded, gated=True)

    async def scenario(batcher):
        running = await _submit(batcher, images(1))
        await until(_calls_started(model, [1]), "the first call to start")
        abandoned = await _submit(batcher, images(5))
        kept = await _submit(batcher, images(2))
        assert batcher.queued_images == 7
        abandoned.cancel()  # what a caller's deadline does to its handler
        model.release()
        results = await asyncio.gather(running, kept)
        assert abandoned.cancelled()
        return results

    _run(scenario, model, BatchingConfig())
    assert model.calls == [1, 2]


def test_no_model_is_answered_without_queueing() -> None:
    def no_model():
        raise NoModel("no model is promoted yet")

    async def scenario():
        batcher = DynamicBatcher(no_model, BatchingConfig())
        with pytest.raises(NoModel):
            await batcher.predict(images(1))
        return batcher.queued_images

    assert asyncio.run(scenario()) == 0


def _totals(histogram) -> tuple[int, float]:
    """A prometheus-client histogram's count and sum."""
    samples = {s.name: s.value for metric in histogram.collect() for s in metric.samples}
    return int(samples[histogram._name + "_count"]), samples[histogram._name + "_sum"]


def test_batching_config_is_validated() -> None:
    with pytest.raises(ValueError):
        BatchingConfig(max_batch_size=0)
    with pytest.raises(ValueError):
        BatchingConfig(batch_timeout_s=2)


def test_a_lone_request_runs_at_once_on_the_loop_and_load_still_batches(loaded) -> None:
    """The idle fast path: a request that finds the batcher idle runs in the caller's own
    coroutine (no thread: the loop's thread makes the call); requests arriving together still
    form batches in the worker thread, and every one gets its own rows."""
    model = RecordingModel(loaded, delay_s=0.02)
    threads: list[int] = []
    original = model.predict

    def predict(pixels: np.ndarray) -> np.ndarray:
        threads.append(threading.get_ident())
        return original(pixels)

    model.predict = predict  # type: ignore[method-assign]
    requests = [images(1, seed=n) for n in range(24)]

    async def scenario(batcher):
        loop_thread = threading.get_ident()
        lone = await batcher.predict(requests[0])
        assert threads == [loop_thread] and batcher.inline_batches == 1
        burst = await asyncio.gather(*(batcher.predict(r) for r in requests[1:]))
        return loop_thread, [lone, *burst]

    (loop_thread, results), batcher = _run(scenario, model, BatchingConfig(inline_max_images=8))
    for pixels, (_, probabilities) in zip(requests, results, strict=True):
        np.testing.assert_allclose(probabilities, loaded.predict(pixels), rtol=1e-5, atol=1e-6)
    # The burst: at most its first request ran inline; the rest formed batches off the loop.
    assert batcher.inline_batches <= 2 and max(model.calls) > 1
    assert any(thread != loop_thread for thread in threads)


def test_requests_bigger_than_the_inline_limit_never_run_on_the_loop(loaded) -> None:
    model = RecordingModel(loaded)

    async def scenario(batcher):
        return await batcher.predict(images(9))

    _, batcher = _run(scenario, model, BatchingConfig(inline_max_images=8))
    assert batcher.inline_batches == 0 and model.calls == [9]
