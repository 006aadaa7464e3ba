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
import tempfile
from pathlib import Path

from serve_floor import floor_server
from serve_load import GPU_SCENARIOS, NAMED_SCENARIOS, SCENARIOS, Scenario, worker_main
from serve_report import report
from serve_runs import measure
from serve_servers import (
    REPO,
    LaunchedServer,
    Variant,
    child_pids,
    make_store,
    rss_mb,
    start_convserve,
)

# The parts live in serve_load.py (scenarios, client processes), serve_floor.py (the transport
# floor), serve_ceiling.py (stock ONNX Runtime), serve_servers.py (store, servers, /proc),
# serve_runs.py (the measurements) and serve_report.py (the table). benchmarks/profile_serve.py,
# swap_memory.py and perf_analyzer.py `import serve` for these:
__all__ = ["REPO", "LaunchedServer", "child_pids", "make_store", "rss_mb", "start_convserve"]


def build_parser() -> argparse.ArgumentParser:
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
    return parser


def chosen_scenarios(parser: argparse.ArgumentParser, args: argparse.Namespace
                     ) -> list[Scenario]:
    offered = SCENARIOS + (GPU_SCENARIOS if args.gpu else ()) + (NAMED_SCENARIOS if args.scenario
                                                                 else ())
    scenarios = [s for s in offered
                 if not args.scenario or any(s.name.startswith(p) for p in args.scenario)]
    if not scenarios:
        parser.error(f"--scenario {args.scenario}: no scenario matches; "
                     f"names: {[s.name for s in offered]}")
    return scenarios


def main() -> None:
    parser = build_parser()
    args = parser.parse_args()
    if args.worker:
        worker_main(args)
        return
    if args.floor_server:
        asyncio.run(floor_server())
        return

    scenarios = chosen_scenarios(parser, args)
    providers = ["CUDAExecutionProvider", "CPUExecutionProvider"] if args.gpu else [
        "CPUExecutionProvider"]
    variants = [Variant("convserve", args.server_cwd, args.server_arg),
                *(Variant.parse(text) for text in args.variant)]
    with tempfile.TemporaryDirectory() as tmp_dir:
        rows, floor, rss = measure(scenarios, variants, providers, args, Path(tmp_dir))

    table = report(rows, floor, providers, rss, args)
    print(table)
    if args.out:
        args.out.write_text(table)


if __name__ == "__main__":
    main()
