"""Serving benchmark: convserve over gRPC against in-process ONNX Runtime, on one machine.

    .venv/bin/python benchmarks/serve.py [--duration 10] [--out docs/serve-latest.md]

1. Exports the ConvNet (10 classes) into a fresh store and starts `convserve serve` on 127.0.0.1.
2. Measures the ceiling: ONNX Runtime in this process, same settings, closed loop, per batch size.
3. Drives the server with closed-loop gRPC clients in separate processes (each caller sends its
   next request when the previous reply is back): C = 1, 8, 64 single-image requests (float32
   3x32x32, and uint8 for comparison) and C = 4 with 32-image requests. Warm-up, then a fixed
   duration; every reply is checked (shape, rows summing to 1, the served version).
4. Measures the ceiling again, and reports images/s, latency percentiles, errors, the ratio of
   throughput to the ceiling at the request's batch size, and the server's RSS.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))


@dataclass(frozen=True)
class Scenario:
    name: str
    callers: int
    batch: int
    dtype: str  # "float32" (NCHW 3x32x32, values in [0, 1]) or "uint8" (NHWC)


SCENARIOS = (
    Scenario("C=1, float32", 1, 1, "float32"),
    Scenario("C=1, uint8", 1, 1, "uint8"),
    Scenario("C=8, float32", 8, 1, "float32"),
    Scenario("C=64, float32", 64, 1, "float32"),
    Scenario("C=64, uint8", 64, 1, "uint8"),
    Scenario("C=4 x 32 images, float32", 4, 32, "float32"),
)


# --- the load generator (runs in client processes) -------------------------------------------

def payload(batch: int, dtype: str) -> bytes:
    from service.pb.convserve.v1 import convserve_pb2 as pb

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

    from service.pb.convserve.v1 import convserve_pb2 as pb

    request = payload(batch, dtype)
    latencies: list[float] = []
    errors: list[str] = []
    async with grpc.aio.insecure_channel(address) as channel:
        # Pre-serialised request, raw bytes reply: the client's own cost stays small.
        call = channel.unary_unary("/convserve.v1.Inference/Predict")
        start = time.perf_counter()
        measure_from, measure_to = start + warmup_s, start + warmup_s + duration_s

        async def caller() -> None:
            while (now := time.perf_counter()) < measure_to:
                try:
                    reply = pb.PredictResponse.FromString(await call(request, timeout=10))
                    probs = np.frombuffer(reply.probabilities, dtype="<f4").reshape(batch, -1)
                    if not np.allclose(probs.sum(axis=1), 1.0, atol=1e-4) or reply.model_version != 1:
                        errors.append("bad reply")
                except grpc.aio.AioRpcError as error:
                    errors.append(error.code().name)
                done = time.perf_counter()
                if measure_from <= now and done <= measure_to:
                    latencies.append(done - now)

        await asyncio.gather(*(caller() for _ in range(callers)))
    return {"latencies": latencies, "errors": errors}


def worker_main(args: argparse.Namespace) -> None:
    result = asyncio.run(drive(args.address, args.callers, args.batch, args.dtype, args.warmup,
                               args.duration))
    np.save(args.result, np.asarray(result["latencies"], dtype=np.float64))
    print(json.dumps({"errors": len(result["errors"]), "kinds": sorted(set(result["errors"]))}))


# --- the ceiling: ONNX Runtime in this process ------------------------------------------------

def ceiling(model_path: Path, batch: int, seconds: float = 2.0) -> float:
    """Images/s of back-to-back session.run calls at `batch`, the server's session settings."""
    import onnxruntime as ort

    from service.loader import SessionSettings, session_options

    options = session_options(SessionSettings(providers=("cpu",), allow_spinning=False))
    session = ort.InferenceSession(str(model_path), options, providers=["CPUExecutionProvider"])
    pixels = np.random.default_rng(0).integers(0, 256, (batch, 32, 32, 3), dtype=np.uint8)
    for _ in range(20):
        session.run(None, {"pixels": pixels})
    runs, started = 0, time.perf_counter()
    while time.perf_counter() - started < seconds:
        session.run(None, {"pixels": pixels})
        runs += 1
    return runs * batch / (time.perf_counter() - started)


# --- orchestration -----------------------------------------------------------------------------

def make_store(root: Path) -> Path:
    from service.store import ModelStore
    from training.export import export_onnx, serving_model
    from training.model import ConvNet, Preprocess

    model = export_onnx(serving_model(ConvNet(10), Preprocess([0.5] * 3, [0.25] * 3)),
                        root / "candidate" / "model.onnx",
                        {"classes": [str(i) for i in range(10)]})
    store = ModelStore(root / "store")
    store.publish(model, {"classes": [str(i) for i in range(10)]},
                  lambda _: {"promoted": True, "reason": "benchmark"}, actor="benchmark")
    return store.model_path(1)


def start_server(store: Path, extra: list[str]) -> tuple[subprocess.Popen, str]:
    from service.config import LISTENING_PREFIX

    server = subprocess.Popen(
        [sys.executable, "-m", "service.cli", "serve", "--store", str(store), "--port", "0",
         "--log-level", "WARNING", *extra],
        cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    line = server.stdout.readline()
    if not line.startswith(LISTENING_PREFIX):
        raise SystemExit(f"server did not start: {line!r}")
    return server, line.split()[-1]


def run_scenario(address: str, scenario: Scenario, warmup: float, duration: float,
                 tmp: Path) -> dict:
    processes = 1 if scenario.callers == 1 else 2  # 2 cores: more client processes only contend
    per_process = [scenario.callers // processes + (i < scenario.callers % processes)
                   for i in range(processes)]
    workers = []
    for index, callers in enumerate(per_process):
        result = tmp / f"latencies-{index}.npy"
        workers.append((result, subprocess.Popen(
            [sys.executable, __file__, "--worker", "--address", address, "--callers", str(callers),
             "--batch", str(scenario.batch), "--dtype", scenario.dtype, "--warmup", str(warmup),
             "--duration", str(duration), "--result", str(result)],
            stdout=subprocess.PIPE, text=True)))
    errors = 0
    latencies = []
    for result, worker in workers:
        out, _ = worker.communicate(timeout=warmup + duration + 120)
        errors += json.loads(out.strip().splitlines()[-1])["errors"]
        latencies.append(np.load(result))
    merged = np.concatenate(latencies) * 1000
    return {"requests": len(merged), "images_per_s": len(merged) * scenario.batch / duration,
            "p50": np.percentile(merged, 50), "p90": np.percentile(merged, 90),
            "p99": np.percentile(merged, 99), "errors": errors}


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def versions() -> str:
    from importlib.metadata import version

    names = ("grpcio", "onnxruntime-gpu", "numpy", "protobuf")
    return ", ".join(f"{n} {version(n)}" for n in names) + f", Python {platform.python_version()}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--duration", type=float, default=10.0, help="measured seconds per scenario")
    parser.add_argument("--warmup", type=float, default=2.0)
    parser.add_argument("--out", type=Path, default=None, help="also write the table here")
    parser.add_argument("--server-arg", action="append", default=[],
                        help="extra `convserve serve` flag (repeat), e.g. --server-arg=--max-batch-size=64")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--address"), parser.add_argument("--callers", type=int)
    parser.add_argument("--batch", type=int), parser.add_argument("--dtype")
    parser.add_argument("--result", type=Path)
    args = parser.parse_args()
    if args.worker:
        worker_main(args)
        return

    with tempfile.TemporaryDirectory() as tmp_dir:
        tmp = Path(tmp_dir)
        model = make_store(tmp)
        batches = sorted({s.batch for s in SCENARIOS})
        before = {b: ceiling(model, b) for b in batches}
        server, address = start_server(tmp / "store", args.server_arg)
        try:
            rows = [(s, run_scenario(address, s, args.warmup, args.duration, tmp))
                    for s in SCENARIOS]
            rss = rss_mb(server.pid)
        finally:
            server.terminate()
            server.wait(timeout=30)
        after = {b: ceiling(model, b) for b in batches}

    table = report(rows, before, after, rss, args)
    print(table)
    if args.out:
        args.out.write_text(table)


def report(rows, before, after, rss, args) -> str:
    ceilings = {b: (before[b] + after[b]) / 2 for b in before}
    lines = [
        f"date: {datetime.now(UTC):%Y-%m-%d %H:%M} UTC; machine: {os.cpu_count()} cores, "
        f"{platform.processor() or platform.machine()}; {versions()}",
        f"command: .venv/bin/python benchmarks/serve.py --duration {args.duration:g} "
        f"--warmup {args.warmup:g}" + "".join(f" --server-arg={a}" for a in args.server_arg),
        "",
        "ceiling (in-process ONNX Runtime, images/s, before / after): " + "; ".join(
            f"batch {b}: {before[b]:,.0f} / {after[b]:,.0f}" for b in sorted(before)),
        "",
        "| scenario | requests | images/s | p50 ms | p90 ms | p99 ms | errors | ratio to ceiling |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for scenario, r in rows:
        ratio = r["images_per_s"] / ceilings[scenario.batch]
        lines.append(f"| {scenario.name} | {r['requests']:,} | {r['images_per_s']:,.0f} | "
                     f"{r['p50']:.3f} | {r['p90']:.3f} | {r['p99']:.3f} | {r['errors']} | "
                     f"{ratio:.2f} (batch {scenario.batch}) |")
    lines += ["", f"server RSS after the run: {rss:.0f} MB"]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
