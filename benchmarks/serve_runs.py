"""benchmarks/serve.py's measurements: one scenario's load against one server, the rounds that
alternate the variants between the same two ceilings, and the transport floor's runs."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
from serve_ceiling import ceilings, ort_cpu_ms_per_call
from serve_load import Scenario
from serve_servers import (
    REPO,
    SCRIPT,
    LaunchedServer,
    Variant,
    batches_served,
    cpu_seconds,
    launch,
    make_store,
    rss_mb,
    start_convserve,
)

Row = tuple[Scenario, Variant, dict]


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
            [sys.executable, str(SCRIPT), "--worker", "--address", server.address,
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


def measure_scenario(scenario: Scenario, variants: list[Variant], servers: list[LaunchedServer],
                     model_path: Path, providers: list[str], args: argparse.Namespace,
                     tmp: Path) -> list[Row]:
    """Every variant between the same two ceilings."""
    before = ceilings(model_path, [scenario.compared_batch], providers, 1.5)
    # Rounds alternate the variants, so a slow spell of a shared machine hits them all alike;
    # each variant's median round is reported.
    rounds: dict[str, list[dict]] = {v.label: [] for v in variants}
    for _ in range(args.rounds):
        for variant, server in zip(variants, servers, strict=True):
            rounds[variant.label].append(
                run_scenario(server, scenario, args.warmup, args.duration, tmp))
    measured = [(v, median_round(rounds[v.label])) for v in variants]
    after = ceilings(model_path, [scenario.compared_batch], providers, 1.5)
    rows = []
    for variant, result in measured:
        result["ceiling"] = (before[scenario.compared_batch], after[scenario.compared_batch])
        rows.append((scenario, variant, result))
    return rows


def measure(scenarios: list[Scenario], variants: list[Variant], providers: list[str],
            args: argparse.Namespace, tmp: Path
            ) -> tuple[list[Row], dict[Scenario, dict], dict[str, float]]:
    """(rows, the transport floor's results per scenario, each variant's RSS in MB): the whole
    benchmark, its store and servers under `tmp`."""
    store = make_store(tmp)
    model_path = store / "models" / "1" / "model.onnx"
    servers = [start_convserve(store, v.args, v.cwd) for v in variants]
    rows: list[Row] = []
    try:
        for scenario in scenarios:
            rows += measure_scenario(scenario, variants, servers, model_path, providers, args, tmp)
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
        run_all([sys.executable, str(SCRIPT), "--floor-server"], scenarios, args, tmp))
    return rows, floor, rss


def run_all(command: list[str], scenarios: list[Scenario], args: argparse.Namespace,
            tmp: Path) -> list[tuple[Scenario, dict]]:
    """Every scenario against one server process."""
    server = launch(command, cwd=REPO)
    try:
        return [(s, run_scenario(server, s, args.warmup, args.duration, tmp)) for s in scenarios]
    finally:
        server.process.terminate()
        server.process.wait(timeout=30)
