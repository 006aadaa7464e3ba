"""The dynamic batcher: batch formation, timeout, isolation, backpressure, result order.

A real ONNX Runtime session over a real exported model; the model is wrapped only to record the
batch sizes it was called with.
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


class RecordingModel:
    """The real loaded model; remembers each call's batch size, optionally slows calls down."""

    def __init__(self, model: LoadedModel, delay_s: float = 0.0) -> None:
        self.model, self.delay_s = model, delay_s
        self.version, self.classes = model.version, model.classes
        self.calls: list[int] = []
        self.lock = threading.Lock()
        self.in_flight = self.most_in_flight = 0

    def predict(self, pixels: np.ndarray) -> np.ndarray:
        with self.lock:
            self.calls.append(len(pixels))
            self.in_flight += 1
            self.most_in_flight = max(self.most_in_flight, self.in_flight)
        time.sleep(self.delay_s)
        try:
            return self.model.predict(pixels)
        finally:
            with self.lock:
                self.in_flight -= 1


@pytest.fixture(scope="module")
def loaded(onnx_models, tmp_path_factory) -> LoadedModel:
    store = DirectoryStore(tmp_path_factory.mktemp("store"))
    publish(store, onnx_models["good"])
    return load_version(store, 1, SessionSettings(providers=("cpu",), intra_op_threads=1))


def _run(coroutine_factory, model, config: BatchingConfig):
    """Run `coroutine_factory(batcher)` with a batch loop going; returns its result."""

    async def scenario():
        batcher = DynamicBatcher(lambda: model, config)
        stop = asyncio.Event()
        loop_task = asyncio.create_task(batcher.run(stop))
        try:
            return await coroutine_factory(batcher), batcher
        finally:
            stop.set()
            await loop_task

    return asyncio.run(scenario())


def test_concurrent_requests_share_one_call_and_each_gets_its_own_rows(loaded) -> None:
    model = RecordingModel(loaded, delay_s=0.05)
    requests = [images(n, seed=n) for n in (1, 3, 2, 1, 4, 1)]

    async def scenario(batcher):
        first = asyncio.create_task(batcher.predict(requests[0]))
        await asyncio.sleep(0.01)  # the first call is now running: the rest queue behind it
        rest = [asyncio.create_task(batcher.predict(r)) for r in requests[1:]]
        return await asyncio.gather(first, *rest)

    results, batcher = _run(scenario, model, BatchingConfig(max_batch_size=64))
    assert model.calls == [1, 11]  # everything that queued behind the first call: one batch
    for pixels, (served_by, probabilities) in zip(requests, results, strict=True):
        assert served_by is model
        np.testing.assert_array_equal(probabilities, loaded.predict(pixels))
    assert _totals(batcher.metrics.batch_sizes) == (2, 12)
    assert _totals(batcher.metrics.queue_seconds)[0] == len(requests)  # one wait per request
    assert _totals(batcher.metrics.compute_seconds)[0] == 2  # one per ONNX Runtime call
    assert _totals(batcher.metrics.compute_seconds)[1] >= 0.05  # the first call's delay


def test_max_batch_size_splits_batches_but_never_a_request(loaded) -> None:
    model = RecordingModel(loaded, delay_s=0.05)

    async def scenario(batcher):
        blocker = asyncio.create_task(batcher.predict(images(1)))
        await asyncio.sleep(0.01)
        queued = [asyncio.create_task(batcher.predict(images(n))) for n in (3, 3, 3, 9)]
        return await asyncio.gather(blocker, *queued)

    results, _ = _run(scenario, model, BatchingConfig(max_batch_size=6))
    assert model.calls == [1, 6, 3, 9]  # 3+3, then 3 (9 would exceed 6), then 9 alone
    assert [len(p) for _, p in results] == [1, 3, 3, 3, 9]


@pytest.mark.parametrize("concurrent", [1, 2])
def test_at_most_max_concurrent_batches_run_at_once(loaded, concurrent: int) -> None:
    """Triton's instance count: with N slots, N batches overlap and never more; results still
    reach the right callers."""
    model = RecordingModel(loaded, delay_s=0.1)
    requests = [images(1, seed=s) for s in range(6)]

    async def scenario(batcher):
        tasks = []
        for pixels in requests:  # one at a time, so each can become its own batch
            tasks.append(asyncio.create_task(batcher.predict(pixels)))
            await asyncio.sleep(0.01)
        return await asyncio.gather(*tasks)

    results, _ = _run(scenario, model, BatchingConfig(max_concurrent_batches=concurrent))
    assert model.most_in_flight == concurrent
    assert sum(model.calls) == 6
    for pixels, (_, probabilities) in zip(requests, results, strict=True):
        np.testing.assert_array_equal(probabilities, loaded.predict(pixels))


def test_batch_timeout_waits_for_stragglers_and_zero_timeout_does_not(loaded) -> None:
    async def stragglers(batcher):
        first = asyncio.create_task(batcher.predict(images(1)))
        await asyncio.sleep(0.02)
        second = asyncio.create_task(batcher.predict(images(1)))
        return await asyncio.gather(first, second)

    waiting = RecordingModel(loaded)
    _run(stragglers, waiting, BatchingConfig(batch_timeout_s=0.2))
    assert waiting.calls == [2]
    eager = RecordingModel(loaded)
    _run(stragglers, eager, BatchingConfig(batch_timeout_s=0.0))
    assert eager.calls == [1, 1]


def test_a_full_queue_is_refused_and_queued_requests_still_complete(loaded) -> None:
    model = RecordingModel(loaded, delay_s=0.1)

    async def scenario(batcher):
        running = asyncio.create_task(batcher.predict(images(1)))
        await asyncio.sleep(0.02)
        queued = [asyncio.create_task(batcher.predict(images(2))) for _ in range(2)]
        await asyncio.sleep(0)
        with pytest.raises(LimitExceeded, match="queue is full"):
            await batcher.predict(images(1))
        return await asyncio.gather(running, *queued)

    results, _ = _run(scenario, model, BatchingConfig(max_enqueued=4))
    assert [len(p) for _, p in results] == [1, 2, 2]


def test_a_bad_request_is_refused_before_the_queue_and_neighbours_succeed(loaded) -> None:
    model = RecordingModel(loaded, delay_s=0.05)
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
    assert sum(model.calls) == 4


def test_a_caller_that_gave_up_is_skipped(loaded) -> None:
    model = RecordingModel(loaded, delay_s=0.1)

    async def scenario(batcher):
        running = asyncio.create_task(batcher.predict(images(1)))
        await asyncio.sleep(0.02)
        abandoned = asyncio.create_task(batcher.predict(images(5)))
        kept = asyncio.create_task(batcher.predict(images(2)))
        await asyncio.sleep(0)
        abandoned.cancel()  # what a caller's deadline does to its handler
        return await asyncio.gather(running, kept)

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
