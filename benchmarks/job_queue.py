"""The store's job queue under racing trainers: how fast jobs are queued and claimed, and that
each is claimed exactly once.

    .venv/bin/python benchmarks/job_queue.py [--jobs 400] [--trainers 4] [--store DIR]

Queues N jobs into a fresh store (the path a Train takes: job.json, its event, the queue file,
under the queue's lock), then starts K trainer processes that claim from the one queue at once
(`JobRunner.claim_next`, the claim a trainer makes: the job's lock, the record, the claim file)
until it is empty. No training runs: this measures the queue, not the ConvNet. Prints one JSON
line: submits/s, claims/s over all trainers, each trainer's share, and the exactly-once check.
`--store` puts the store elsewhere (an NFS mount, to measure a shared volume).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

from convserve.contracts.store import ModelStore
from convserve.jobs import JobRunner, RunnerConfig, TrainParams

TRAINER = """
import json, sys, time
from convserve.contracts.store import ModelStore
from convserve.jobs import JobRunner, RunnerConfig
runner = JobRunner(ModelStore(sys.argv[1]), RunnerConfig(datasets_root=sys.argv[1],
                                                          replica_id=sys.argv[2]))
sys.stdin.readline()  # everyone starts together
claimed, started = [], time.perf_counter()
while (record := runner.claim_next()) is not None:
    claimed.append(record.id)
print(json.dumps({"claimed": claimed, "seconds": time.perf_counter() - started}))
"""


def measure(jobs: int, trainers: int, root: Path) -> dict:
    runner = JobRunner(ModelStore(root), RunnerConfig(datasets_root=root, max_queue=jobs,
                                                      replica_id="submitter"))
    started = time.perf_counter()
    ids = [runner.submit(TrainParams.of(dataset="synthetic:64")).id for _ in range(jobs)]
    submit_s = time.perf_counter() - started
    processes = [subprocess.Popen([sys.executable, "-c", TRAINER, str(root), f"trainer-{i}"],
                                  stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
                 for i in range(trainers)]
    time.sleep(1.0)  # let every interpreter import before the start line
    started = time.perf_counter()
    for process in processes:
        assert process.stdin is not None
        process.stdin.write("go\n")
        process.stdin.flush()
    results = [json.loads(p.communicate(timeout=600)[0]) for p in processes]
    claim_s = time.perf_counter() - started
    counts = Counter(job for r in results for job in r["claimed"])
    return {
        "jobs": jobs, "trainers": trainers,
        "submits_per_s": round(jobs / submit_s, 1),
        "claims_per_s": round(jobs / claim_s, 1),
        "claims_by_trainer": [len(r["claimed"]) for r in results],
        "each_claimed_once": sorted(counts) == sorted(ids) and set(counts.values()) == {1},
        # FIFO: each trainer took its jobs oldest first.
        "fifo": all(r["claimed"] == sorted(r["claimed"], key=ids.index) for r in results),
        "queue_left": runner.queued(),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--jobs", type=int, default=400)
    parser.add_argument("--trainers", type=int, default=4)
    parser.add_argument("--store", type=Path, default=None,
                        help="an empty folder for the store (default: a temporary one)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="convserve-queue-") as scratch:
        result = measure(args.jobs, args.trainers, args.store or Path(scratch) / "store")
    print(json.dumps(result))
    ok = result["each_claimed_once"] and result["fifo"] and result["queue_left"] == 0
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
