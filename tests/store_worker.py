"""Publish one model into a store from a separate process; used by tests/store/.

    python tests/store_worker.py <store: a directory or s3://bucket/prefix> <model_file> <accuracy>
        [--hold-seconds S] [--barrier DIR] [--job-id ID] [--crash-at POINT]

decide() promotes iff ``accuracy`` beats the champion card's metrics.onnx_val_accuracy (or there
is no champion). It records what it saw and when (monotonic clock, system-wide on Linux), so the
tests can check that concurrent deciders were serialised. Prints the PublishResult as JSON.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import signal
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from convserve.contracts.model_card import GateDecision
from convserve.store import base as store_module
from convserve.store.location import location_of, open_store
from tests.barrier import arrive_and_wait


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("root")
    parser.add_argument("model_file", type=Path)
    parser.add_argument("accuracy", type=float)
    parser.add_argument("--hold-seconds", type=float, default=0.0)
    parser.add_argument("--barrier", type=Path, default=None,
                        help="start together with the other workers (tests/barrier.py)")
    parser.add_argument("--job-id", default=None)
    parser.add_argument("--work-dir", default=None, help="for an s3:// store: its local cache")
    parser.add_argument("--crash-at", default=None,
                        help="die by SIGKILL at this named point of publish (store.base.crash_point)")
    args = parser.parse_args()

    # An s3:// store takes its endpoint and credentials from the AWS_* environment.
    store = open_store(location_of(args.root, work_dir=args.work_dir or ""))
    if args.crash_at:
        def crash_point(name: str) -> None:
            if name == args.crash_at:
                os.kill(os.getpid(), signal.SIGKILL)

        store_module.crash_point = crash_point

    trace: dict[str, object] = {}  # when decide() ran and what it saw, for the race tests

    def decide(champion: int | None) -> GateDecision:
        trace["entered"] = time.monotonic()
        best = None if champion is None else store.card(champion)["metrics"]["onnx_val_accuracy"]
        if args.hold_seconds:
            time.sleep(args.hold_seconds)  # widen the race window while holding the lock
        promoted = best is None or args.accuracy > best
        trace.update(champion_seen=champion, left=time.monotonic())
        return GateDecision(promoted, (f"accuracy {args.accuracy} vs champion {best}",),
                            champion_version=champion, champion_accuracy=best)

    if args.barrier is not None:
        arrive_and_wait(args.barrier)
    requested = time.monotonic()
    result = store.publish(
        args.model_file,
        {"metrics": {"onnx_val_accuracy": args.accuracy}, "dataset": {"name": "fake"}},
        decide,
        actor=f"job:{args.job_id}" if args.job_id else f"worker:{os.getpid()}",
        job_id=args.job_id,
    )
    print(json.dumps({**dataclasses.asdict(result), "requested": requested,
                      "decision": {**result.decision.to_dict(), **trace}}))


if __name__ == "__main__":
    main()
