"""benchmarks/serve.py's load: the scenarios, and the closed-loop gRPC clients that run in client
processes (`serve.py --worker`), each sending its next request when the previous reply is back."""

from __future__ import annotations

import argparse
import asyncio
import json
import time
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Scenario:
    name: str
    callers: int
    batch: int
    dtype: str  # "float32" (NCHW 3x32x32, values in [0, 1]) or "uint8" (NHWC)
    ceiling_batch: int = 0  # the ceiling's batch size to compare with (0: the request's batch)

    @property
    def compared_batch(self) -> int:
        return self.ceiling_batch or self.batch


SCENARIOS = (
    Scenario("C=1, float32", 1, 1, "float32"),
    Scenario("C=1, uint8", 1, 1, "uint8"),
    Scenario("C=8, float32", 8, 1, "float32"),
    Scenario("C=64, float32", 64, 1, "float32"),
    Scenario("C=64, uint8", 64, 1, "uint8"),
    Scenario("C=4 x 32 images, float32", 4, 32, "float32"),
)
# With --gpu: many callers, so the batcher forms full batches; compared with in-process ORT on
# the GPU at the largest batch the server forms (the default max_batch_size, 256).
GPU_SCENARIOS = (Scenario("C=256, uint8", 256, 1, "uint8", ceiling_batch=256),)
# Only when named (--scenario): the load perf_analyzer generates (benchmarks/perf_analyzer.py).
NAMED_SCENARIOS = (Scenario("C=8, uint8", 8, 1, "uint8"),)


def payload(batch: int, dtype: str) -> bytes:
    from convserve.pb.convserve.v1 import convserve_pb2 as pb

    rng = np.random.default_rng(batch)
    if dtype == "float32":
        images = (rng.integers(0, 256, (batch, 3, 32, 32)) / 255).astype(np.float32)
        raw = pb.RawImages(data=images.tobytes(), dtype=pb.FLOAT32, layout=pb.NCHW,
                           shape=images.shape)
    else:
        images = rng.integers(0, 256, (batch, 32, 32, 3), dtype=np.uint8)
        raw = pb.RawImages(data=images.tobytes(), dtype=pb.UINT8, layout=pb.NHWC,
                           shape=images.shape)
    return pb.PredictRequest(raw=raw).SerializeToString()


async def drive(address: str, callers: int, batch: int, dtype: str, warmup_s: float,
                duration_s: float) -> dict:
    import grpc

    from convserve.pb.convserve.v1 import convserve_pb2 as pb

    request = payload(batch, dtype)
    latencies: list[float] = []
    errors: list[str] = []
    completed = 0  # warm-up included: the CPU accounting covers the whole run
    async with grpc.aio.insecure_channel(address) as channel:
        # Pre-serialised request, raw bytes reply: the client's own cost stays small.
        call = channel.unary_unary("/convserve.v1.Inference/Predict")
        start = time.perf_counter()
        measure_from, measure_to = start + warmup_s, start + warmup_s + duration_s

        async def caller() -> None:
            nonlocal completed
            while (now := time.perf_counter()) < measure_to:
                try:
                    reply = pb.PredictResponse.FromString(await call(request, timeout=10))
                    probs = np.frombuffer(reply.probabilities, dtype="<f4").reshape(batch, -1)
                    if not np.allclose(probs.sum(axis=1), 1.0, atol=1e-4) or reply.model_version != 1:
                        errors.append("bad reply")
                except grpc.aio.AioRpcError as error:
                    errors.append(error.code().name)
                done = time.perf_counter()
                completed += 1
                if measure_from <= now and done <= measure_to:
                    latencies.append(done - now)

        await asyncio.gather(*(caller() for _ in range(callers)))
    return {"latencies": latencies, "errors": errors, "completed": completed}


def worker_main(args: argparse.Namespace) -> None:
    result = asyncio.run(drive(args.address, args.callers, args.batch, args.dtype, args.warmup,
                               args.duration))
    np.save(args.result, np.asarray(result["latencies"], dtype=np.float64))
    print(json.dumps({"errors": len(result["errors"]), "kinds": sorted(set(result["errors"])),
                      "completed": result["completed"], "cpu_s": time.process_time()}))
