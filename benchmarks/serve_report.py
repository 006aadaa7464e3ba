"""benchmarks/serve.py's report: the Markdown table docs/benchmarks.md records."""

from __future__ import annotations

import argparse
import os
import platform
from datetime import UTC, datetime

from serve_load import Scenario
from serve_servers import REPO, Variant


def versions() -> str:
    from importlib.metadata import version

    names = ("grpcio", "onnxruntime-gpu", "numpy", "protobuf")
    return ", ".join(f"{n} {version(n)}" for n in names) + f", Python {platform.python_version()}"


def command_line(args: argparse.Namespace) -> str:
    """The command that measured this, as docs/benchmarks.md quotes it."""
    return (f"command: .venv/bin/python benchmarks/serve.py --duration {args.duration:g} "
            f"--warmup {args.warmup:g}" + f" --rounds {args.rounds}" * (args.rounds > 1)
            + " --gpu" * args.gpu
            + "".join(f" --scenario='{name}'" for name in args.scenario)
            + "".join(f" --server-arg={a}" for a in args.server_arg)
            + (f" --server-cwd={args.server_cwd}" if args.server_cwd != REPO else "")
            + "".join(f" --variant='{v}'" for v in args.variant))


def row_line(scenario: Scenario, variant: Variant, r: dict, floor: dict[Scenario, dict]) -> str:
    before, after = r["ceiling"]
    ratio = r["images_per_s"] / ((before + after) / 2)
    split = "–"
    if scenario in floor:
        floor_ms = floor[scenario]["server_cpu_ms"]
        own = r["server_cpu_ms"] - floor_ms - r["ort_cpu_ms"]
        split = f"{floor_ms:.3f} / {r['ort_cpu_ms']:.3f} / {own:.3f}"
    return (f"| {scenario.name} | {variant.label} | {r['requests']:,} | "
            f"{r['images_per_s']:,.0f} | {r['p50']:.3f} | {r['p90']:.3f} | "
            f"{r['p99']:.3f} | {r['errors']} | {before:,.0f} / {after:,.0f} "
            f"(batch {scenario.compared_batch}) | {ratio:.2f} | "
            f"{r['server_cpu_ms']:.3f} / {r['client_cpu_ms']:.3f} | {split} |")


def report(rows: list[tuple[Scenario, Variant, dict]], floor: dict[Scenario, dict],
           providers: list[str], rss: dict[str, float], args: argparse.Namespace) -> str:
    lines = [
        f"date: {datetime.now(UTC):%Y-%m-%d %H:%M} UTC; machine: {os.cpu_count()} cores, "
        f"{platform.processor() or platform.machine()}; {versions()}",
        command_line(args),
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
    lines += [row_line(scenario, variant, r, floor) for scenario, variant, r in rows]
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
