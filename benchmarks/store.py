"""The model store's two backends side by side: what a replica's pointer poll costs, how soon a
promotion reaches every replica, and how long a model takes to download.

    .venv/bin/python benchmarks/store.py [--rounds 5] [--replicas 2] [--poll-calls 2000]
        [--big-mb 50] [--poll-interval-s 0.5] [--idle-s 20] [--backends directory,s3]
        [--json PATH]

Stores: a directory under a temporary folder, and s3://bench/store on a SeaweedFS server
started here (tests/s3.py's `SeaweedServer`: the dev extra's `weed`, on 127.0.0.1). Each holds
the untrained ConvNet as version 1 (promoted) and `--big-mb` MiB of random bytes as version 2
(imported, never promoted: `open_version` only downloads and hashes it).

Phases, each in rounds that alternate the backends (A B, then B A), so the noisy machine weighs
on both alike:
- poll: `promoted_version()` back to back, the pointer unchanged (S3: a conditional GET answered
  304), on one long-lived store object as a replica holds; wall time per call, this process's
  CPU time per call, and (S3) the HTTP bytes of one poll from what botocore sends and receives.
  Cost at the interval = 1 / interval polls per second.
- download: `open_version` into a fresh work directory (cold cache) and again (warm), with the
  connection already open, for the ConvNet and the big file. The directory store has no cache:
  both are a hash of the file in place (from the page cache: the file was just written).
- idle: `--replicas` `convserve serve --role serve` replicas per backend, started together, then
  their CPU over `--idle-s` seconds doing nothing but poll (and the S3 server's, against its own
  baseline before the replicas started).
- promotion: after a random wait in [0, interval) (a random point of the poll cycle), a new
  version is published (the ConvNet again, under a new number: S3 replicas download it); the
  clock starts when the pointer has moved (the stores' `crash_point("before_history")` hook)
  and stops, per replica, when its `convserve_model_version` gauge shows the new version (read
  every 20 ms, so up to 20 ms late).
Prints markdown tables; `--json PATH` writes every sample.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import random
import statistics
import time
from pathlib import Path
from typing import Any

import store_measure as measure
from store_backends import (
    BIG_VERSION,
    MODEL_VERSION,
    Backend,
    Replica,
    backends,
    start_replicas,
    stop_replicas,
    weed_version,
)

from convserve.store.base import ModelStore


def ordered(items: list[Any], round_index: int) -> list[Any]:
    """A B in even rounds, B A in odd ones."""
    return items if round_index % 2 == 0 else items[::-1]


def percentile(values: list[float], q: float) -> float:
    ranked = sorted(values)
    return ranked[min(len(ranked) - 1, math.ceil(q * len(ranked)) - 1)]


def run_polls(found: list[Backend], args: argparse.Namespace) -> dict[str, dict[str, Any]]:
    stores = {b.name: b.open(b.fresh_work_dir()) for b in found}
    per_round = math.ceil(args.poll_calls / args.rounds)
    out: dict[str, dict[str, Any]] = {b.name: {"seconds": [], "cpu_s": 0.0} for b in found}
    for index in range(args.rounds):
        for backend in ordered(found, index):
            sample = measure.poll_round(stores[backend.name], per_round)
            out[backend.name]["seconds"] += sample.seconds
            out[backend.name]["cpu_s"] += sample.cpu_s
    for backend in found:
        if backend.is_s3:
            sent, received, status = measure.poll_wire_bytes(stores[backend.name])
            out[backend.name] |= {"sent_bytes": sent, "received_bytes": received,
                                  "status": status}
    return out


def run_downloads(found: list[Backend], args: argparse.Namespace) -> dict[str, dict[str, Any]]:
    out: dict[str, dict[str, Any]] = {
        b.name: {str(v): {"cold": [], "warm": []} for v in (MODEL_VERSION, BIG_VERSION)}
        for b in found}
    for index in range(args.rounds):
        for backend in ordered(found, index):
            for version in (MODEL_VERSION, BIG_VERSION):
                cold, warm = measure.download_round(backend, version)
                out[backend.name][str(version)]["cold"].append(cold)
                out[backend.name][str(version)]["warm"].append(warm)
    return out


def run_replicas(found: list[Backend], args: argparse.Namespace) -> dict[str, dict[str, Any]]:
    """Idle CPU, then the promotions, on `--replicas` replicas per backend all running at once."""
    server_pids = {b.name: b.server_pid for b in found if b.server_pid is not None}
    out: dict[str, dict[str, Any]] = {b.name: {} for b in found}
    for name, pid in server_pids.items():
        out[name]["server_idle_cpu_pct"] = measure.idle_cpu({"s": [pid]}, args.idle_s)["s"]
    replicas: dict[str, list[Replica]] = {}
    try:
        for backend in found:
            replicas[backend.name] = start_replicas(backend, args.replicas, args.poll_interval_s)
        time.sleep(2 * args.poll_interval_s + 1)  # past their first polls and warm-ups
        groups = {name: [r.server.process.pid for r in group] for name, group in replicas.items()}
        groups |= {f"{name} server": [pid] for name, pid in server_pids.items()}
        cpu = measure.idle_cpu(groups, args.idle_s)
        for backend in found:
            out[backend.name]["replica_idle_cpu_pct"] = cpu[backend.name]
            if backend.name in server_pids:
                out[backend.name]["server_polled_cpu_pct"] = cpu[f"{backend.name} server"]
        out_promotions = run_promotions(found, replicas, args)
        for name, promotions in out_promotions.items():
            out[name]["promotions"] = promotions
    finally:
        for group in replicas.values():
            stop_replicas(group)
    return out


def run_promotions(found: list[Backend], replicas: dict[str, list[Replica]],
                   args: argparse.Namespace) -> dict[str, list[dict[str, Any]]]:
    measure.install_pointer_hook()
    publishers: dict[str, ModelStore] = {b.name: b.open(b.fresh_work_dir()) for b in found}
    rng = random.Random(20261204)
    out: dict[str, list[dict[str, Any]]] = {b.name: [] for b in found}
    for index in range(args.rounds):
        for backend in ordered(found, index):
            done = measure.promotion_round(backend, publishers[backend.name],
                                           replicas[backend.name], args.poll_interval_s, rng)
            out[backend.name].append({"version": done.version, "publish_s": done.publish_s,
                                      "replica_s": done.replica_s, "load_s": done.load_s})
    return out


# ------------------------------------------------------------------------------ report

def _ms(seconds: float) -> str:
    return f"{seconds * 1000:.2f}"


def poll_table(polls: dict[str, dict[str, Any]], interval_s: float) -> list[str]:
    rate = 1 / interval_s
    lines = [f"Pointer poll, unchanged pointer ({len(next(iter(polls.values()))['seconds'])} "
             f"calls per backend); cost per replica at a {interval_s:g} s interval "
             f"({rate:g} polls/s):", "",
             "| backend | one poll | p50 ms | p99 ms | CPU µs/poll | CPU % of a core at the "
             "interval | HTTP bytes/poll (sent / received) | bytes/s at the interval |",
             "|---|---|---|---|---|---|---|---|"]
    for name, poll in polls.items():
        calls = len(poll["seconds"])
        cpu_per = poll["cpu_s"] / calls
        if "sent_bytes" in poll:
            what = f"GET models/PROMOTED, If-None-Match → {poll['status']}"
            wire = f"{poll['sent_bytes']:.0f} / {poll['received_bytes']:.0f}"
            per_s = f"{(poll['sent_bytes'] + poll['received_bytes']) * rate:,.0f}"
        else:
            what, wire, per_s = "read PROMOTED, stat the version's folder", "— (local)", "—"
        lines.append(f"| {name} | {what} | {_ms(statistics.median(poll['seconds']))} | "
                     f"{_ms(percentile(poll['seconds'], 0.99))} | {cpu_per * 1e6:.0f} | "
                     f"{100 * cpu_per * rate:.3f} | {wire} | {per_s} |")
    return lines


def promotion_table(reps: dict[str, dict[str, Any]], replicas: int) -> list[str]:
    heads = " | ".join(f"replica {i + 1} median s" for i in range(replicas))
    lines = ["Promotion → every replica serving it (s from the pointer's move; median over "
             "promotions, min–max in brackets):", "",
             f"| backend | promotions | publish s | {heads} | every replica: median (min–max) "
             "| load + warm-up s | the rest (poll wait) s |",
             "|---|---|---|" + "---|" * replicas + "---|---|---|"]
    for name, rep in reps.items():
        done = rep["promotions"]
        per = " | ".join(f"{statistics.median(p['replica_s'][i] for p in done):.3f}"
                         for i in range(replicas))
        worst = [max(p["replica_s"]) for p in done]
        load = [s for p in done for s in p["load_s"]]
        rest = [t - s for p in done for t, s in zip(p["replica_s"], p["load_s"], strict=True)]
        lines.append(f"| {name} | {len(done)} | "
                     f"{statistics.median(p['publish_s'] for p in done):.3f} | {per} | "
                     f"{statistics.median(worst):.3f} ({min(worst):.3f}–{max(worst):.3f}) | "
                     f"{statistics.median(load):.3f} | {statistics.median(rest):.3f} |")
    lines += ["", "Idle replicas (polling only), CPU % of one core:", "",
              "| backend | each replica (whole process) | store server: alone → with the "
              "replicas polling |", "|---|---|---|"]
    for name, rep in reps.items():
        server = (f"{rep['server_idle_cpu_pct']:.2f} → {rep['server_polled_cpu_pct']:.2f}"
                  if "server_idle_cpu_pct" in rep else "—")
        lines.append(f"| {name} | {rep['replica_idle_cpu_pct']:.2f} | {server} |")
    return lines


def download_table(downloads: dict[str, dict[str, Any]], sizes: dict[int, int]) -> list[str]:
    lines = ["`open_version`, cold cache (fresh work directory) and warm (again); median s:", "",
             "| backend | file | MiB | cold s | cold MiB/s | warm s |", "|---|---|---|---|---|---|"]
    names = {MODEL_VERSION: "ConvNet (ONNX)", BIG_VERSION: "random bytes"}
    for name, per_version in downloads.items():
        for version in (MODEL_VERSION, BIG_VERSION):
            mib = sizes[version] / (1 << 20)
            cold = statistics.median(per_version[str(version)]["cold"])
            warm = statistics.median(per_version[str(version)]["warm"])
            lines.append(f"| {name} | {names[version]} | {mib:.2f} | {cold:.3f} | "
                         f"{mib / cold:.0f} | {warm:.3f} |")
    return lines


def versions_line() -> str:
    from importlib.metadata import version

    def of(package: str) -> str:
        try:
            return version(package)
        except Exception:
            return "absent"
    return (f"Python {platform.python_version()}, boto3 {of('boto3')}, botocore "
            f"{of('botocore')}, SeaweedFS {weed_version()}, onnxruntime "
            f"{of('onnxruntime-gpu') if of('onnxruntime-gpu') != 'absent' else of('onnxruntime')}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--replicas", type=int, default=2)
    parser.add_argument("--poll-calls", type=int, default=2000)
    parser.add_argument("--big-mb", type=int, default=50)
    parser.add_argument("--poll-interval-s", type=float, default=0.5)
    parser.add_argument("--idle-s", type=float, default=20.0)
    parser.add_argument("--backends", default="directory,s3")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    names = [n for n in args.backends.split(",") if n]
    if not names or set(names) - {"directory", "s3"}:
        raise SystemExit("--backends: expected directory, s3 or both")
    started = time.monotonic()
    with backends(names, args.big_mb) as found:
        polls = run_polls(found, args)
        downloads = run_downloads(found, args)
        reps = run_replicas(found, args)
        sizes = found[0].sizes
    print(f"{versions_line()}; {time.monotonic() - started:.0f} s in all\n")
    for table in (poll_table(polls, args.poll_interval_s), download_table(downloads, sizes),
                  promotion_table(reps, args.replicas)):
        print("\n".join(table), end="\n\n")
    if args.json:
        args.json.write_text(json.dumps({"args": vars(args) | {"json": str(args.json)},
                                         "polls": polls, "downloads": downloads,
                                         "replicas": reps}, indent=1))


if __name__ == "__main__":
    main()
