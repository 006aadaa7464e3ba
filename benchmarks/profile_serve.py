"""Where a replica's time goes under load: py-spy on the live server, summarised per stage.

    .venv/bin/python benchmarks/profile_serve.py [--callers 64] [--seconds 8] [--server-arg=...]

Starts `convserve serve` on a fresh store (the untrained ConvNet, as benchmarks/serve.py does),
drives it with the benchmark's closed-loop clients (1-image float32 requests, two client
processes), and records the server with `py-spy record --pid --nonblocking` (a sampling profiler
that reads the process from outside: the server runs unmodified). With `--server-arg=--workers=N`
each serving process is recorded. Every sample is put in the first stage whose frame it holds;
the table gives each stage's share of the samples in which a thread was busy. Native frames
(gRPC's Cython core, ONNX Runtime's kernels) show as the Python frame that called them.
"""

from __future__ import annotations

import argparse
import collections
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import serve as bench  # benchmarks/serve.py: the store, the server, the clients

# (stage, a substring of a frame): the first match wins, most specific first.
STAGES = (
    ("ONNX Runtime (Session.run)", "Session.run ("),
    ("request decode + validation (codec.decode_images)", "decode_images ("),
    ("reply (codec.predict_response)", "predict_response ("),
    ("thread hand-off (to_thread, executor, wake-ups)", "concurrent/futures/"),
    ("thread hand-off (to_thread, executor, wake-ups)", "to_thread ("),
    ("thread hand-off (to_thread, executor, wake-ups)", "_write_to_self ("),
    ("batcher (queue, batch forming, futures)", "service/convserve/serving/batcher.py"),
    ("call wrapper (request id, status, metrics, logs)", "service/convserve/server/servicers.py:"),
    ("call wrapper (request id, status, metrics, logs)", "service/convserve/server/telemetry.py"),
    ("call wrapper (request id, status, metrics, logs)", "service/convserve/metrics.py"),
    ("event loop waiting (epoll)", "EpollSelector.select ("),
    ("gRPC transport (grpc.aio's Cython core, on the loop)", "Handle._run ("),
    ("gRPC transport (grpc.aio's Cython core, on the loop)", "grpc/"),
    ("asyncio scheduling", "asyncio/"),
)
IDLE_THREAD = ("_worker (concurrent/futures/thread.py:81)", "Thread.run (threading.py:982)")


def stage_of(stack: str) -> str | None:
    """The stage of one collapsed stack (`frame;frame;...`, outermost first); None: an idle
    worker thread waiting for work (py-spy cannot always tell those apart)."""
    frames = stack.split(";")
    if frames[-1].strip() in IDLE_THREAD:
        return None
    for name, needle in STAGES:
        if needle in stack:
            return name
    return "other"


def summarise(raw_files: list[Path]) -> dict[str, int]:
    counts: collections.Counter[str] = collections.Counter()
    for raw in raw_files:
        for line in raw.read_text().splitlines():
            stack, _, count = line.rpartition(" ")
            if not count.isdigit():
                continue
            stage = stage_of(stack)
            if stage is not None:
                counts[stage] += int(count)
    return dict(counts)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--callers", type=int, default=64)
    parser.add_argument("--seconds", type=float, default=8.0, help="recorded seconds")
    parser.add_argument("--rate", type=int, default=200, help="py-spy samples per second")
    parser.add_argument("--server-arg", action="append", default=[])
    parser.add_argument("--server-cwd", type=Path, default=bench.REPO,
                        help="run the server from this checkout (e.g. a worktree of an older commit)")
    parser.add_argument("--out", type=Path, default=None, help="also write the table here")
    args = parser.parse_args()
    py_spy = shutil.which("py-spy") or str(Path(sys.executable).with_name("py-spy"))
    if not Path(py_spy).exists():
        parser.error("py-spy is not installed (it is a dev dependency: make venv)")

    with tempfile.TemporaryDirectory() as tmp_dir:
        tmp = Path(tmp_dir)
        server = bench.start_convserve(bench.make_store(tmp), args.server_arg, args.server_cwd)
        try:
            load_s = args.seconds + 4
            clients = [subprocess.Popen(
                [sys.executable, bench.__file__, "--worker", "--address", server.address,
                 "--callers", str(callers), "--batch", "1", "--dtype", "float32",
                 "--warmup", "0", "--duration", str(load_s), "--result", str(tmp / f"l{i}.npy")],
                stdout=subprocess.PIPE, text=True)
                for i, callers in enumerate((args.callers - args.callers // 2,
                                             args.callers // 2)) if callers]
            time.sleep(2)  # past start-up and the first batches
            pids = [server.process.pid, *bench.child_pids(server.process.pid)]
            raws = [tmp / f"profile-{pid}.txt" for pid in pids]
            profilers = [subprocess.Popen(
                [py_spy, "record", "--pid", str(pid), "--rate", str(args.rate), "--duration",
                 str(round(args.seconds)), "--format", "raw", "--output", str(raw),
                 "--nonblocking"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
                for pid, raw in zip(pids, raws, strict=True)]
            for profiler in profilers:
                profiler.wait(timeout=args.seconds + 60)
            for client in clients:
                client.communicate(timeout=load_s + 60)
            counts = summarise([raw for raw in raws if raw.exists()])
        finally:
            server.process.terminate()
            server.process.wait(timeout=60)

    total = sum(counts.values()) or 1
    lines = [f"py-spy, {args.callers} callers, {args.seconds:g} s at {args.rate} Hz, server args "
             f"{args.server_arg or 'defaults'}, server from {args.server_cwd}; {total:,} busy "
             "samples", "",
             "| stage | share of busy samples |", "|---|---|"]
    lines += [f"| {stage} | {100 * n / total:.1f} % |"
              for stage, n in sorted(counts.items(), key=lambda item: -item[1])]
    table = "\n".join(lines) + "\n"
    print(table)
    if args.out:
        args.out.write_text(table)


if __name__ == "__main__":
    main()
