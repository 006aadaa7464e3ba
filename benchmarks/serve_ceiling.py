"""benchmarks/serve.py's references in ONNX Runtime: the ceiling (stock ONNX Runtime in this
process) and what one ORT call costs with the server's own session settings."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np


def ceilings(model_path: Path, batches: list[int], providers: list[str], seconds: float = 2.0
             ) -> dict[int, float]:
    """Images/s of back-to-back calls at each batch size, in this process, one calling thread, on
    a session opened the way other model servers open it: `InferenceSession(path, providers)` with
    default SessionOptions (spin-waiting on, one intra-op thread per core). This is the honest
    reference: it owes nothing to convserve's own settings."""
    import onnxruntime as ort

    session = ort.InferenceSession(str(model_path), providers=providers)
    name = session.get_inputs()[0].name
    results = {}
    for batch in batches:
        pixels = np.random.default_rng(0).integers(0, 256, (batch, 32, 32, 3), dtype=np.uint8)
        for _ in range(20):  # warm-up
            session.run(None, {name: pixels})
        runs, started = 0, time.perf_counter()
        while time.perf_counter() - started < seconds:
            session.run(None, {name: pixels})
            runs += 1
        results[batch] = runs * batch / (time.perf_counter() - started)
    del session
    return results


def ort_cpu_ms_per_call(store: Path, server_args: list[str], batch: int, calls: int = 300
                        ) -> float:
    """CPU ms one ORT call at `batch` images costs with the *server's* session settings (its
    spinning and threads): what the server's own ORT calls cost, to split its CPU per request."""
    from convserve.server import config
    from convserve.server.server import session_settings
    from convserve.server.workers import worker_config
    from convserve.serving.loader import load_version
    from convserve.store.directory import DirectoryStore

    settings = config.parse(server_args)
    if settings.workers > 1:  # what each worker really runs with (its share of the cores)
        settings = worker_config(settings, settings.port, 0)
    model = load_version(DirectoryStore(store), 1, session_settings(settings))
    pixels = np.random.default_rng(0).integers(0, 256, (batch, 32, 32, 3), dtype=np.uint8)
    for _ in range(20):
        model.predict(pixels)
    started = time.process_time()
    for _ in range(calls):
        model.predict(pixels)
    return 1000 * (time.process_time() - started) / calls
