"""`convserve demo`: the whole product on the embedded defaults, as a newcomer first meets it.

Starts a server replica (a child process, as in production) on a local store, trains on the
built-in digits through the SDK while showing the job's progress, waits for the gate, then sends
real validation digits as PNG files to Predict and prints what the promoted model says. The
server keeps running afterwards unless --stop is given, so the SDK and CLI can be tried on it.
"""

from __future__ import annotations

import argparse
import io
import os
import subprocess
from pathlib import Path

from convserve.cli.launch import ServerStartError, launch, serve_command


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
            job = client.train("digits", epochs=args.epochs)
            print(f"training: job {job.id} on digits, {args.epochs} epochs")
            code = follow(client, job.id)
            if code != 0:
                return code
            images, labels = sample_digits(8)
            prediction = client.predict(images, top_k=2)
        print(f"predict:  8 validation digits sent as PNG to model version {prediction.version}")
        for label, name, probs in zip(labels, prediction.names, prediction.probabilities,
                                      strict=True):
            print(f"          true {label}  predicted {name}  p={probs.max():.3f}")
        correct = sum(str(label) == name for label, name in zip(labels, prediction.names,
                                                                 strict=True))
        print(f"          {correct}/8 correct")
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


def sample_digits(count: int) -> tuple[list[bytes], list[int]]:
    """Validation digits (never trained on, same split as the job) as PNG files."""
    from PIL import Image

    from convserve.training.data import load_dataset

    data = load_dataset("digits", Path("."), seed=0)
    pngs = []
    for pixels in data.val_images[:count]:
        buffer = io.BytesIO()
        Image.fromarray(pixels).save(buffer, format="PNG")
        pngs.append(buffer.getvalue())
    return pngs, [int(label) for label in data.val_labels[:count]]
