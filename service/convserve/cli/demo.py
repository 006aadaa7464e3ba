"""`convserve demo`: the whole product on the embedded defaults, as a newcomer first meets it.

Starts a server replica (a child process, as in production) on a local store, trains on the
built-in digits through the SDK while showing the job's progress, waits for the gate, then sends
the whole validation split as PNG files to Predict, prints the first few answers and the accuracy
over all of them (next to the gate's). The server keeps running afterwards unless --stop is
given, so the SDK and CLI can be tried on it.
"""

from __future__ import annotations

import argparse
import io
import os
import subprocess
from pathlib import Path
from typing import TYPE_CHECKING

from convserve.cli.launch import ServerStartError, launch, serve_command

if TYPE_CHECKING:
    from convserve.client import Client

# The job's split, asked for explicitly so that the images the demo sends are the ones it held out.
SEED = 0
VAL_FRACTION = 0.2
EXAMPLES = 8         # the first validation images, shown whatever the model makes of them
PREDICT_BATCH = 128  # images per Predict call: 3 calls for digits' 359 (the server takes up to 1024)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--store", type=Path, default=Path("runs/demo/store"))
    parser.add_argument("--port", type=int, default=50051, help="0: any free port")
    parser.add_argument("--metrics-port", type=int, default=9090, help="-1: no metrics")
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--stop", action="store_true", help="stop the server at the end")


def run(args: argparse.Namespace) -> int:
    from convserve.cli.remote import follow
    from convserve.client import Client

    server, address = start_server(args.store, args.port, args.metrics_port)
    print(f"server:   {address} (pid {server.pid}, store {args.store}, log "
          f"{args.store / 'server.log'})")
    try:
        with Client(address, timeout=60) as client:
            job = client.train("digits", epochs=args.epochs, seed=SEED, val_fraction=VAL_FRACTION)
            print(f"training: job {job.id} on digits, {args.epochs} epochs")
            code = follow(client, job.id)
            if code != 0:
                return code
            predict_validation_split(client)
        if not args.stop:
            print(f"\nThe server is still running: try\n"
                  f"  .venv/bin/convserve jobs --address {address}\n"
                  f"  .venv/bin/convserve models list --store {args.store}\n"
                  f"and stop it with: kill {server.pid}")
        return 0
    finally:
        if args.stop:
            server.terminate()
            server.wait(timeout=30)


def predict_validation_split(client: Client) -> None:
    """Every validation digit through Predict as a PNG file: the accuracy a user gets from the
    service, over the images the gate scored, rather than a handful of examples."""
    images, labels, classes = validation_digits()
    version = 0  # the promoted one, then pinned: every batch is answered by the same model
    names: list[str] = []
    confidence: list[float] = []
    for start in range(0, len(images), PREDICT_BATCH):
        prediction = client.predict(images[start:start + PREDICT_BATCH], version=version)
        version = prediction.version
        names += prediction.names
        confidence += [float(row.max()) for row in prediction.probabilities]
    calls = -(-len(images) // PREDICT_BATCH)
    print(f"predict:  {len(images)} validation digits sent as PNG files to model version {version}"
          f" in {calls} calls; the first {EXAMPLES}:")
    for label, name, p in list(zip(labels, names, confidence, strict=True))[:EXAMPLES]:
        print(f"          true {label}  predicted {name}  p={p:.3f}")
    correct = sum(classes[label] == name for label, name in zip(labels, names, strict=True))
    print(f"          validation accuracy through Predict ({len(images)} PNG files): "
          f"{100 * correct / len(images):.1f} % ({correct}/{len(images)})")
    gate = client.model(version).val_accuracy  # ONNX Runtime's on the same split, at export
    # Same images, same model: only a near tie decided differently by the server could differ.
    if round(gate * len(images)) == correct:
        print(f"          the same as the gate's ONNX Runtime accuracy in the model card ({gate:.4f})")
    else:
        print(f"          the gate's ONNX Runtime accuracy in the model card differs: {gate:.4f}")


def start_server(store: Path, port: int, metrics_port: int = 9090
                 ) -> tuple[subprocess.Popen[str], str]:
    """`convserve serve` on the store, in its own session (it outlives the demo), its log in
    the store's server.log."""
    store.mkdir(parents=True, exist_ok=True)
    with (store / "server.log").open("ab") as log:
        try:
            server = launch(serve_command("--store", str(store), "--port", str(port),
                                          "--metrics-port", str(metrics_port)),
                            env=dict(os.environ, PYTHONUNBUFFERED="1"), stderr=log,
                            new_session=True)
        except ServerStartError as error:
            raise SystemExit(f"convserve demo: {error}; see {store / 'server.log'}") from None
    return server.process, server.address


def validation_digits() -> tuple[list[bytes], list[int], tuple[str, ...]]:
    """The job's validation split (never trained on) as PNG files, with its labels and class
    names."""
    from PIL import Image

    from convserve.training.data import load_dataset

    data = load_dataset("digits", Path("."), seed=SEED, val_fraction=VAL_FRACTION)
    pngs = []
    for pixels in data.val_images:
        buffer = io.BytesIO()
        Image.fromarray(pixels).save(buffer, format="PNG")
        pngs.append(buffer.getvalue())
    return pngs, [int(label) for label in data.val_labels], data.classes
