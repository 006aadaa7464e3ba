"""Runs the real gate against a real store in its own process, for the concurrency test.

    python tests/gate_worker.py STORE MODEL --barrier DIR [--hold S]

Scores MODEL on the small synthetic validation split, waits at the barrier (tests/barrier.py)
so that several workers race, and publishes through `gate.decide_against`, holding the lock
--hold seconds longer to widen the race window. Prints the PublishResult as JSON.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from convserve.contracts.gate_policy import GatePolicy
from convserve.store.directory import DirectoryStore
from convserve.training import gate
from convserve.training.data import load_dataset
from convserve.training.export import ParityReport
from convserve.training.onnx_eval import OnnxClassifier
from tests.barrier import arrive_and_wait
from tests.conftest import SMALL_SYNTHETIC


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("store", type=Path)
    parser.add_argument("model", type=Path)
    parser.add_argument("--barrier", type=Path, required=True)
    parser.add_argument("--hold", type=float, default=0.5)
    args = parser.parse_args()

    data = load_dataset(SMALL_SYNTHETIC, Path("unused"), seed=3)
    candidate = OnnxClassifier(args.model).score(data.val_images, data.val_labels)
    # Parity is not under test here: the models are real exports that passed it.
    parity = ParityReport(images=1, max_abs_diff=0.0, argmax_equal=True, tolerance=1e-5)
    store = DirectoryStore(args.store)
    decide = gate.decide_against(store, GatePolicy(min_accuracy=0.0), parity, data.classes,
                                 candidate, data.val_images, data.val_labels)

    def slow_decide(champion: int | None) -> dict:
        decision = decide(champion)
        time.sleep(args.hold)
        return decision

    arrive_and_wait(args.barrier)
    result = store.publish(args.model, {"metrics": {"onnx_val_accuracy": candidate.accuracy}},
                           slow_decide, actor=f"job:{args.model.stem}")
    print(json.dumps(dataclasses.asdict(result)))


if __name__ == "__main__":
    main()
