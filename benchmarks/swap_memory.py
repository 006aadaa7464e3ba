"""A replica's memory across model swaps: flip the promoted version N times under light load.

    .venv/bin/python benchmarks/swap_memory.py [--swaps 20] [--server-arg=...] [--server-cwd DIR]

Publishes two versions of the ConvNet into a fresh store, starts `convserve serve`, keeps two
callers sending Predict, and promotes the other version N times, waiting each time until Predict
is answered by it (the swap happened) and its memory released. Prints the server's RSS after the
first swap and after every later one, and the ratio last / first (the goal: ≤ 1.2).
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import serve as bench  # benchmarks/serve.py: the store, the server, RSS

from convserve.contracts.model_card import GateDecision


def two_versions(root: Path) -> Path:
    """A store with the untrained ConvNet as versions 1 and 2 (2 promoted)."""
    from convserve.store.directory import DirectoryStore

    store_root = bench.make_store(root)
    store = DirectoryStore(store_root)
    model = store.root / "models" / "1" / "model.onnx"
    store.publish(model, store.card(1), lambda _: GateDecision(True, ("second",)),
                  actor="benchmark")
    return store_root


def released(server: bench.LaunchedServer) -> None:
    """Wait until the replaced model's memory is handed back (its last batch let go and the next
    poll trimmed the heap), as the server reports it. A checkout from before that metric gets
    a fixed 0.6 s: the old session's last batches end and a 0.1 s poll frees it."""
    from urllib.request import urlopen

    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        text = urlopen(server.metrics_urls[0], timeout=10).read().decode()
        pending = re.search(r"^convserve_replaced_models_unreleased (\S+)$", text, re.MULTILINE)
        if pending is None:
            time.sleep(0.6)
            return
        if float(pending.group(1)) == 0:
            return
        time.sleep(0.01)
    raise SystemExit("a replaced model was not released within 60 s")


def measure(swaps: int, server_args: list[str], cwd: Path) -> dict:
    import grpc
    import numpy as np

    from convserve.pb.convserve.v1 import convserve_pb2 as pb
    from convserve.pb.convserve.v1 import convserve_pb2_grpc as pb_grpc
    from convserve.store.directory import DirectoryStore

    with tempfile.TemporaryDirectory() as tmp:
        store_root = two_versions(Path(tmp))
        store = DirectoryStore(store_root)
        server = bench.start_convserve(store_root, ["--poll-interval-s", "0.1", *server_args],
                                       cwd)
        stop = threading.Event()
        pixels = np.random.default_rng(0).integers(0, 256, (4, 32, 32, 3), dtype=np.uint8)
        request = pb.PredictRequest(raw=pb.RawImages(data=pixels.tobytes(), dtype=pb.UINT8,
                                                     layout=pb.NHWC, shape=[4, 32, 32, 3]))
        served: list[int] = [0]
        errors: list[str] = []

        def load() -> None:
            with grpc.insecure_channel(server.address) as channel:
                predict = pb_grpc.InferenceStub(channel).Predict
                while not stop.is_set():
                    try:
                        served[0] = predict(request, timeout=10).model_version
                    except grpc.RpcError as error:
                        errors.append(error.code().name)
                    time.sleep(0.002)

        callers = [threading.Thread(target=load) for _ in range(2)]
        for caller in callers:
            caller.start()
        rss = []
        try:
            for swap in range(swaps):
                target = 1 if swap % 2 == 0 else 2
                store.promote(target, reason=f"swap {swap + 1}", actor="benchmark")
                deadline = time.monotonic() + 60
                while served[0] != target:
                    if time.monotonic() > deadline:
                        raise SystemExit(f"swap {swap + 1}: version {target} not served in 60 s")
                    time.sleep(0.01)
                released(server)
                rss.append(bench.rss_mb(server.process.pid))
        finally:
            stop.set()
            for caller in callers:
                caller.join()
            server.process.terminate()
            server.process.wait(timeout=60)
    return {"rss_mb": [round(r, 1) for r in rss], "ratio": rss[-1] / rss[0], "errors": errors}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--swaps", type=int, default=20)
    parser.add_argument("--server-arg", action="append", default=[])
    parser.add_argument("--server-cwd", type=Path, default=bench.REPO)
    args = parser.parse_args()
    result = measure(args.swaps, args.server_arg, args.server_cwd)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
