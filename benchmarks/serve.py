"""Serving benchmark: convserve over gRPC against in-process ONNX Runtime, on one machine.

    .venv/bin/python benchmarks/serve.py [--duration 10] [--out docs/serve-latest.md]

1. Exports the ConvNet (10 classes) into a fresh store and starts `convserve serve` on 127.0.0.1.
2. Measures the ceiling right before and after each scenario: stock ONNX Runtime in this process
   (`InferenceSession(path, providers)`, default SessionOptions), one thread, back to back.
3. Drives the server with closed-loop gRPC clients in separate processes (each caller sends its
   next request when the previous reply is back): C = 1, 8, 64 single-image requests (float32
   3x32x32, and uint8 for comparison) and C = 4 with 32-image requests. Warm-up, then a fixed
   duration; every reply is checked (shape, rows summing to 1, the served version).
4. Reports images/s, latency percentiles, errors, the ratio of throughput to the ceiling at the
   request's batch size, and the server's RSS (all its processes, with `--server-arg=--workers=N`).
5. Runs the same load against a *transport floor*: a gRPC server in the same stack (grpc.aio)
   whose Predict returns a canned reply without decoding or inference. It shows what Python gRPC
   alone costs on this machine. For every run, the CPU seconds the server and the clients spent
   per request are reported too: on a machine where they share the cores, those bound what any
   server in this stack can reach.
6. Splits the server's CPU per request into the transport floor's, ONNX Runtime's (the ORT calls
   and mean batch size the server's /metrics counted, times the CPU one such call costs with the
   server's own session settings, measured alone) and the rest: convserve's own path.
"""

from __future__ import annotations

import argparse
import asyncio
import atexit
import contextlib
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import numpy as np

from convserve.cli.launch import LaunchedServer, launch, serve_command
from convserve.contracts.model_card import GateDecision

REPO = Path(__file__).resolve().parent.parent


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


# --- the load generator (runs in client processes) -------------------------------------------

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


# --- the transport floor: the same gRPC stack, no decoding, no inference -----------------------

def canned_replies() -> dict[int, bytes]:
    """Request size in bytes -> a valid serialised reply for that request's batch."""
    from convserve.serving.codec import predict_response

    replies = {}
    for batch in {s.batch for s in SCENARIOS + GPU_SCENARIOS}:
        reply = predict_response(1, [str(i) for i in range(10)],
                                 np.full((batch, 10), 0.1, dtype=np.float32), 0).SerializeToString()
        for dtype in ("float32", "uint8"):
            replies[len(payload(batch, dtype))] = reply
    return replies


async def floor_server() -> None:
    import grpc

    from convserve.server.config import LISTENING_PREFIX

    replies = canned_replies()

    async def predict(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        if len(request) not in replies:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "not a benchmark payload")
        return replies[len(request)]

    server = grpc.aio.server()
    server.add_generic_rpc_handlers([grpc.method_handlers_generic_handler(
        "convserve.v1.Inference", {"Predict": grpc.unary_unary_rpc_method_handler(predict)})])
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    print(f"{LISTENING_PREFIX}127.0.0.1:{port}", flush=True)
    await server.wait_for_termination()


# --- the ceiling: stock ONNX Runtime in this process ------------------------------------------

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
    from convserve.contracts.store import ModelStore
    from convserve.server import config
    from convserve.server.server import session_settings
    from convserve.server.workers import worker_config
    from convserve.serving.loader import load_version

    settings = config.parse(server_args)
    if settings.workers > 1:  # what each worker really runs with (its share of the cores)
        settings = worker_config(settings, settings.port, 0)
    model = load_version(ModelStore(store), 1, session_settings(settings))
    pixels = np.random.default_rng(0).integers(0, 256, (batch, 32, 32, 3), dtype=np.uint8)
    for _ in range(20):
        model.predict(pixels)
    started = time.process_time()
    for _ in range(calls):
        model.predict(pixels)
    return 1000 * (time.process_time() - started) / calls


# --- orchestration -----------------------------------------------------------------------------

def make_store(root: Path) -> Path:
    """A store under `root` with the (untrained) ConvNet published and promoted as version 1."""
    from convserve.contracts.store import ModelStore
    from convserve.training.export import export_onnx, serving_model
    from convserve.training.model import ConvNet, Preprocess

    model = export_onnx(serving_model(ConvNet(10), Preprocess([0.5] * 3, [0.25] * 3)),
                        root / "candidate" / "model.onnx",
                        {"classes": [str(i) for i in range(10)]})
    store = ModelStore(root / "store")
    store.publish(model, {"classes": [str(i) for i in range(10)]},
                  lambda _: GateDecision(True, ("benchmark",)), actor="benchmark")
    return store.root


def start_convserve(store: Path, extra: list[str], checkout: Path = REPO) -> LaunchedServer:
    """`convserve serve` on `store` with the benchmark's flags, running `checkout`'s code.

    This checkout runs through this environment's install. Another one runs its own code, on
    PYTHONPATH ahead of this environment's editable install: its service/ and training/ folders
    where they hold `convserve` as it is imported; before that layout, a copy laid out as the
    wheel is; before the package was named convserve (its folders imported as `service`), from
    its folder."""
    flags = ["--store", str(store), "--port", "0", "--metrics-port", "0", "--log-level",
             "WARNING", *extra]
    checkout = checkout.resolve()
    if checkout == REPO:
        return launch(serve_command(*flags), cwd=REPO)
    if (checkout / "service" / "convserve").is_dir():  # its folders hold `convserve` as it is
        path = os.pathsep.join(str(checkout / folder) for folder in ("service", "training"))
        return launch(serve_command(*flags), cwd=checkout, env={**os.environ, "PYTHONPATH": path})
    if "package-dir" not in (checkout / "pyproject.toml").read_text():
        return launch([sys.executable, "-m", "service.cli", "serve", *flags], cwd=checkout)
    layout = Path(tempfile.mkdtemp(prefix="convserve-layout-"))
    atexit.register(shutil.rmtree, layout, ignore_errors=True)
    skip = shutil.ignore_patterns("__pycache__")
    shutil.copytree(checkout / "service", layout / "convserve", ignore=skip)
    shutil.copytree(checkout / "training", layout / "convserve" / "training", ignore=skip)
    return launch(serve_command(*flags), cwd=checkout,
                  env={**os.environ, "PYTHONPATH": str(layout)})


def batches_served(server: LaunchedServer) -> tuple[float, float]:
    """(ORT calls, images) so far, summed over the server's processes, from /metrics."""
    from urllib.request import urlopen

    calls = images = 0.0
    for url in server.metrics_urls:
        text = urlopen(url, timeout=10).read().decode()
        for line in text.splitlines():
            if line.startswith("convserve_batch_size_count"):
                calls += float(line.split()[-1])
            elif line.startswith("convserve_batch_size_sum"):
                images += float(line.split()[-1])
    return calls, images


def run_scenario(server: LaunchedServer, scenario: Scenario, warmup: float, duration: float,
                 tmp: Path) -> dict:
    # One client process per two cores (2 on the 2-core machine, where more would only contend).
    processes = 1 if scenario.callers == 1 else max(2, min(8, (os.cpu_count() or 2) // 2))
    per_process = [scenario.callers // processes + (i < scenario.callers % processes)
                   for i in range(processes)]
    server_cpu_before = cpu_seconds(server.process.pid)
    batches_before = batches_served(server) if server.metrics_urls else (0.0, 0.0)
    workers = []
    for index, callers in enumerate(per_process):
        result = tmp / f"latencies-{index}.npy"
        workers.append((result, subprocess.Popen(
            [sys.executable, __file__, "--worker", "--address", server.address,
             "--callers", str(callers), "--batch", str(scenario.batch), "--dtype", scenario.dtype,
             "--warmup", str(warmup), "--duration", str(duration), "--result", str(result)],
            stdout=subprocess.PIPE, text=True)))
    errors = completed = 0
    client_cpu = 0.0
    latencies = []
    for result, worker in workers:
        out, _ = worker.communicate(timeout=warmup + duration + 120)
        summary = json.loads(out.strip().splitlines()[-1])
        errors += summary["errors"]
        completed += summary["completed"]
        client_cpu += summary["cpu_s"]
        latencies.append(np.load(result))
    server_cpu = cpu_seconds(server.process.pid) - server_cpu_before
    batches_after = batches_served(server) if server.metrics_urls else (0.0, 0.0)
    calls, images = (after - before for after, before in zip(batches_after, batches_before,
                                                             strict=True))
    merged = np.concatenate(latencies) * 1000
    return {"requests": len(merged), "images_per_s": len(merged) * scenario.batch / duration,
            "p50": np.percentile(merged, 50), "p90": np.percentile(merged, 90),
            "p99": np.percentile(merged, 99), "errors": errors, "completed": completed,
            # CPU per request over the whole run (warm-up included, as are the clients' start-up
            # costs: a small overestimate for the clients).
            "server_cpu_ms": 1000 * server_cpu / max(completed, 1),
            "client_cpu_ms": 1000 * client_cpu / max(completed, 1),
            "ort_calls": calls, "mean_batch": images / calls if calls else 0.0}


def median_round(results: list[dict]) -> dict:
    ordered = sorted(results, key=lambda r: r["images_per_s"])
    return {**ordered[len(ordered) // 2], "rounds": len(results)}


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a running process and its children (the workers), from /proc,
    Linux only. Reaped children count too (cutime/cstime)."""
    def own(one: int) -> float:
        try:
            fields = Path(f"/proc/{one}/stat").read_text().rsplit(")", 1)[1].split()
        except FileNotFoundError:
            return 0.0
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    return own(pid) + sum(own(child) for child in child_pids(pid))


def child_pids(pid: int) -> list[int]:
    children = []
    for task in Path(f"/proc/{pid}/task").glob("*/children"):
        with contextlib.suppress(FileNotFoundError, ProcessLookupError):  # a thread ended
            children += [int(c) for c in task.read_text().split()]
    return children


def rss_mb(pid: int) -> float:
    total = 0.0
    for one in (pid, *child_pids(pid)):
        for line in Path(f"/proc/{one}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                total += int(line.split()[1]) / 1024
    return total


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
                        help="extra `convserve serve` flag (repeat), e.g. --server-arg=--workers=2")
    parser.add_argument("--scenario", action="append", default=[],
                        help="run only scenarios whose name starts with this (repeat), e.g. 'C=8'")
    parser.add_argument("--gpu", action="store_true",
                        help=f"also run {[s.name for s in GPU_SCENARIOS]} (for a GPU host)")
    parser.add_argument("--server-cwd", type=Path, default=REPO,
                        help="run the server from this checkout (e.g. a git worktree of an older "
                             "commit, to re-measure it against the same ceiling)")
    parser.add_argument("--rounds", type=int, default=1,
                        help="measure each scenario this many times, alternating the variants; "
                             "the median round is reported")
    parser.add_argument("--variant", action="append", default=[],
                        help="also measure another server between the same ceilings, as "
                             "LABEL@CHECKOUT[:FLAG,...] (repeat); e.g. 'workers=2@.:--workers=2', "
                             "'before@/tmp/base' (a git worktree of an older commit)")
    parser.add_argument("--no-floor", action="store_true",
                        help="skip the transport-floor runs (halves the time)")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--floor-server", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--address"), parser.add_argument("--callers", type=int)
    parser.add_argument("--batch", type=int), parser.add_argument("--dtype")
    parser.add_argument("--result", type=Path)
    args = parser.parse_args()
    if args.worker:
        worker_main(args)
        return
    if args.floor_server:
        asyncio.run(floor_server())
        return

    offered = SCENARIOS + (GPU_SCENARIOS if args.gpu else ()) + (NAMED_SCENARIOS if args.scenario
                                                                 else ())
    scenarios = [s for s in offered
                 if not args.scenario or any(s.name.startswith(p) for p in args.scenario)]
    if not scenarios:
        parser.error(f"--scenario {args.scenario}: no scenario matches; "
                     f"names: {[s.name for s in offered]}")
    providers = ["CUDAExecutionProvider", "CPUExecutionProvider"] if args.gpu else [
        "CPUExecutionProvider"]
    variants = [Variant("convserve", args.server_cwd, args.server_arg),
                *(Variant.parse(text) for text in args.variant)]
    with tempfile.TemporaryDirectory() as tmp_dir:
        tmp = Path(tmp_dir)
        store = make_store(tmp)
        model_path = store / "models" / "1" / "model.onnx"
        servers = [start_convserve(store, v.args, v.cwd) for v in variants]
        rows: list[tuple[Scenario, Variant, dict]] = []
        try:
            for scenario in scenarios:  # every variant between the same two ceilings
                before = ceilings(model_path, [scenario.compared_batch], providers, 1.5)
                # Rounds alternate the variants, so a slow spell of a shared machine hits them
                # all alike; each variant's median round is reported.
                rounds: dict[str, list[dict]] = {v.label: [] for v in variants}
                for _ in range(args.rounds):
                    for variant, server in zip(variants, servers, strict=True):
                        rounds[variant.label].append(
                            run_scenario(server, scenario, args.warmup, args.duration, tmp))
                measured = [(v, median_round(rounds[v.label])) for v in variants]
                after = ceilings(model_path, [scenario.compared_batch], providers, 1.5)
                for variant, result in measured:
                    result["ceiling"] = (before[scenario.compared_batch],
                                         after[scenario.compared_batch])
                    rows.append((scenario, variant, result))
            rss = {v.label: rss_mb(server.process.pid) for v, server in zip(variants, servers,
                                                                            strict=True)}
        finally:
            for server in servers:
                server.process.terminate()
                server.process.wait(timeout=60)
        for _scenario, variant, result in rows:  # each server's ORT cost per request, alone
            batch = max(1, round(result["mean_batch"])) if result["ort_calls"] else 0
            per_call = ort_cpu_ms_per_call(store, variant.args, batch) if batch else 0.0
            result["ort_cpu_ms"] = per_call * result["ort_calls"] / max(result["completed"], 1)
        floor = {} if args.no_floor else dict(
            run_all([sys.executable, __file__, "--floor-server"], scenarios, args, tmp))

    table = report(rows, floor, providers, rss, args)
    print(table)
    if args.out:
        args.out.write_text(table)


@dataclass(frozen=True)
class Variant:
    """A server to measure: a label, the checkout it runs from, its extra flags."""

    label: str
    cwd: Path
    args: list[str]

    @classmethod
    def parse(cls, text: str) -> Variant:
        """`LABEL@CHECKOUT[:FLAG,FLAG...]`, e.g. `workers=2@.:--workers=2` or `old@/tmp/base`."""
        label, at, rest = text.partition("@")
        where, _, flags = rest.partition(":")
        if not label or not at or not where:
            raise SystemExit(f"--variant {text!r}: expected LABEL@CHECKOUT[:FLAG,FLAG...]")
        return cls(label, Path(where).resolve(), [f for f in flags.split(",") if f])


def run_all(command: list[str], scenarios: list[Scenario], args: argparse.Namespace,
            tmp: Path) -> list[tuple[Scenario, dict]]:
    """Every scenario against one server process."""
    server = launch(command, cwd=REPO)
    try:
        return [(s, run_scenario(server, s, args.warmup, args.duration, tmp)) for s in scenarios]
    finally:
        server.process.terminate()
        server.process.wait(timeout=30)


def report(rows, floor, providers, rss, args) -> str:
    lines = [
        f"date: {datetime.now(UTC):%Y-%m-%d %H:%M} UTC; machine: {os.cpu_count()} cores, "
        f"{platform.processor() or platform.machine()}; {versions()}",
        f"command: .venv/bin/python benchmarks/serve.py --duration {args.duration:g} "
        f"--warmup {args.warmup:g}" + f" --rounds {args.rounds}" * (args.rounds > 1)
        + " --gpu" * args.gpu
        + "".join(f" --scenario='{name}'" for name in args.scenario)
        + "".join(f" --server-arg={a}" for a in args.server_arg)
        + (f" --server-cwd={args.server_cwd}" if args.server_cwd != REPO else "")
        + "".join(f" --variant='{v}'" for v in args.variant),
        "",
        f"ceiling: stock ONNX Runtime in-process (InferenceSession(path, providers={providers}), "
        "default SessionOptions, one calling thread), measured right before and right after each "
        "scenario (every server variant runs between the two); the ratio uses their mean."
        + (f" Each row is the median of {args.rounds} rounds that alternate the variants."
           if args.rounds > 1 else ""),
        "",
        "| scenario | server | requests | images/s | p50 ms | p90 ms | p99 ms | errors "
        "| ceiling images/s (before / after) | ratio to ceiling "
        "| CPU ms/request: server / clients | server CPU split: floor / ORT / own |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for scenario, variant, r in rows:
        before, after = r["ceiling"]
        ratio = r["images_per_s"] / ((before + after) / 2)
        split = "–"
        if scenario in floor:
            floor_ms = floor[scenario]["server_cpu_ms"]
            own = r["server_cpu_ms"] - floor_ms - r["ort_cpu_ms"]
            split = f"{floor_ms:.3f} / {r['ort_cpu_ms']:.3f} / {own:.3f}"
        lines.append(f"| {scenario.name} | {variant.label} | {r['requests']:,} | "
                     f"{r['images_per_s']:,.0f} | {r['p50']:.3f} | {r['p90']:.3f} | "
                     f"{r['p99']:.3f} | {r['errors']} | {before:,.0f} / {after:,.0f} "
                     f"(batch {scenario.compared_batch}) | {ratio:.2f} | "
                     f"{r['server_cpu_ms']:.3f} / {r['client_cpu_ms']:.3f} | {split} |")
    lines += ["", "server RSS after the run (all its processes): "
              + ", ".join(f"{label} {mb:.0f} MB" for label, mb in rss.items())]
    if floor:
        lines += [
            "", "transport floor (same load, a grpc.aio server answering a canned reply):", "",
            "| scenario | images/s | p50 ms | p99 ms | errors | CPU ms/request: server / clients |",
            "|---|---|---|---|---|---|",
        ]
        lines += [f"| {s.name} | {r['images_per_s']:,.0f} | {r['p50']:.3f} | {r['p99']:.3f} | "
                  f"{r['errors']} | {r['server_cpu_ms']:.3f} / {r['client_cpu_ms']:.3f} |"
                  for s, r in floor.items()]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
