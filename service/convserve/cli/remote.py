"""`convserve serve | train | watch | jobs | cancel | predict | promote`: the commands that run or
talk to a server, built on the client SDK. Registered in `convserve.cli.main.COMMANDS`.

grpc, numpy and the SDK are imported inside the handlers, so `convserve --help` stays instant.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from convserve.contracts import spec
from convserve.contracts.commands import (
    EXIT_FAILED,
    EXIT_OF_JOB_STATE,
    EXIT_OK,
    EXIT_USAGE,
    add_output_flag,
)
from convserve.contracts.errors import ConfigError
from convserve.contracts.gate_policy import add_gate_arguments, gate_overrides_of

if TYPE_CHECKING:
    from convserve.client import Client
    from convserve.pb.convserve.v1 import convserve_pb2 as pb

ADDRESS_ENV = "CONVSERVE_ADDRESS"
TOKEN_ENV = "CONVSERVE_TOKEN"
DEFAULT_ADDRESS = "127.0.0.1:50051"


def default_address(environ: dict[str, str] | None = None) -> str:
    """$CONVSERVE_ADDRESS, else this host's server on $CONVSERVE_PORT (so a container's own
    health check follows the port it serves on), else 127.0.0.1:50051."""
    environ = dict(os.environ) if environ is None else environ
    if environ.get(ADDRESS_ENV):
        return environ[ADDRESS_ENV]
    return f"127.0.0.1:{environ['CONVSERVE_PORT']}" if environ.get("CONVSERVE_PORT") \
        else DEFAULT_ADDRESS


def add_address(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--address", default=default_address(),
                        help=f"server host:port (default: ${ADDRESS_ENV}, else "
                             f"127.0.0.1:$CONVSERVE_PORT, else {DEFAULT_ADDRESS})")
    parser.add_argument("--token", default=os.environ.get(TOKEN_ENV, ""),
                        help=f"bearer token for protected calls (default: ${TOKEN_ENV})")
    parser.add_argument("--tls", action="store_true", help="TLS with the system's CA roots")
    parser.add_argument("--tls-ca", default="", help="TLS: the server's CA certificate (PEM)")
    parser.add_argument("--tls-cert", default="", help="TLS: this client's certificate (PEM)")
    parser.add_argument("--tls-key", default="", help="TLS: this client's private key (PEM)")
    parser.add_argument("--timeout", type=float, default=30.0, help="seconds per call")


def connect(args: argparse.Namespace, **options: Any) -> Client:
    """The SDK client for the connection flags every remote command takes."""
    from convserve.client import Client

    return Client(args.address, timeout=args.timeout, token=args.token, tls=args.tls,
                  tls_ca_file=args.tls_ca, tls_cert_file=args.tls_cert,
                  tls_key_file=args.tls_key, **options)


# --- serve -----------------------------------------------------------------------------------

def add_serve_arguments(parser: argparse.ArgumentParser) -> None:
    from convserve.server import config

    config.add_arguments(parser)


def serve(args: argparse.Namespace) -> int:
    import asyncio
    import logging

    from convserve.server import config, logs, server

    try:
        settings = config.from_sources(args)
        # Before anything is logged: a port in use is one line and exit 2.
        config.check_port_free(settings.host, settings.port, "gRPC")
    except ConfigError as error:
        print(f"convserve serve: error: {error}", file=sys.stderr)
        return EXIT_USAGE
    logs.configure(settings.log_level, settings.log_format)
    logging.getLogger("convserve").info("configuration:\n%s", settings.describe())
    try:
        if settings.workers > 1:
            from convserve.server import workers

            return asyncio.run(workers.serve_workers(settings))
        asyncio.run(server.serve(settings))
    except ConfigError as error:  # e.g. a port in use: one line, no traceback
        print(f"convserve serve: error: {error}", file=sys.stderr)
        return EXIT_USAGE
    return EXIT_OK


# --- training jobs ---------------------------------------------------------------------------

def add_train_arguments(parser: argparse.ArgumentParser) -> None:
    add_address(parser)
    spec.add_arguments(parser, spec.REQUEST_SETTINGS, defaults=None)
    add_gate_arguments(parser, defaults=None)
    parser.add_argument("--idempotency-key", default=None,
                        help="retrying with the same key returns the same job")
    parser.add_argument("--watch", action="store_true", help="follow the job with a progress bar")


def train(args: argparse.Namespace) -> int:
    options = spec.values_from(args, spec.REQUEST_SETTINGS) | gate_overrides_of(args)
    with connect(args) as client:
        job = client.train(idempotency_key=args.idempotency_key, **options)
        print(f"job {job.id}: {job.state}")
        return follow(client, job.id) if args.watch else EXIT_OK


def add_job_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("job_id", metavar="JOB")
    add_address(parser)


def watch(args: argparse.Namespace) -> int:
    with connect(args) as client:
        return follow(client, args.job_id)


def add_jobs_arguments(parser: argparse.ArgumentParser) -> None:
    add_address(parser)
    add_output_flag(parser)


def jobs(args: argparse.Namespace) -> int:
    with connect(args) as client:
        listed = client.jobs()
    if args.output == "json":
        from google.protobuf.json_format import MessageToDict

        print(json.dumps([MessageToDict(job.message, preserving_proto_field_name=True)
                          for job in listed], indent=2))
        return EXIT_OK
    if not listed:
        print("no jobs")
    for job in listed:
        request = job.message.request
        detail = (f"v{job.model_version}" if job.model_version
                  else job.error.splitlines()[-1] if job.error else job.gate_reason)
        print(f"{job.id}  {job.state:<9}  {request.dataset:<14} epochs {request.epochs:<3} "
              f"{job.message.created_at}  {_where(job.message)}{detail}")
    return EXIT_OK


def _where(job: pb.Job) -> str:
    """Its place in the queue, or the trainer of its last attempt (and which attempt)."""
    if job.queue_position:
        return f"queued #{job.queue_position}  "
    if not job.attempts:
        return ""
    last = job.attempts[-1]
    return f"on {last.trainer}" + (f" (attempt {last.number})  " if last.number > 1 else "  ")


def cancel(args: argparse.Namespace) -> int:
    with connect(args) as client:
        job = client.cancel(args.job_id)
    print(f"job {job.id}: {job.state}")
    return EXIT_OK


def add_resume_arguments(parser: argparse.ArgumentParser) -> None:
    add_job_arguments(parser)
    parser.add_argument("--watch", action="store_true", help="follow the job with a progress bar")


def resume(args: argparse.Namespace) -> int:
    with connect(args) as client:
        job = client.resume(args.job_id)
        print(f"job {job.id}: {job.state}")
        return follow(client, job.id) if args.watch else EXIT_OK


def follow(client: Client, job_id: str) -> int:
    """Stream a job's events: a progress bar on a terminal, a line per phase and epoch always.
    The exit code says how the job ended (EXIT_OF_JOB_STATE)."""
    from convserve.progress_bar import ProgressDisplay

    display = ProgressDisplay(lines=sys.stdout, bar=sys.stdout)
    for event in client.watch(job_id):
        if event.type == "progress":
            eta = event.eta_s if event.HasField("eta_s") else None
            display.progress(event.step, event.steps, event.epoch, event.epochs,
                             event.images_per_s, eta)
        else:
            display.line(event.message)
    display.close()
    job = client.job(job_id)
    outcome = {"PROMOTED": f"promoted as version {job.model_version}",
               "REJECTED": f"rejected by the gate: {job.gate_reason}"}.get(job.state, job.error)
    print(f"job {job.id}: {job.state}" + (f" ({outcome})" if outcome else ""))
    return EXIT_OF_JOB_STATE.get(job.state, EXIT_FAILED)


# --- inference and promotion -----------------------------------------------------------------

def add_predict_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("files", nargs="+", type=Path, metavar="FILE",
                        help="PNG or JPEG images (any size; resized to 32x32 by the server)")
    parser.add_argument("--top-k", type=int, default=3)
    parser.add_argument("--version", type=int, default=0, help="pin a version (0: promoted)")
    add_address(parser)
    add_output_flag(parser)


def predict(args: argparse.Namespace) -> int:

    payloads = []
    for path in args.files:
        try:
            payloads.append(path.read_bytes())
        except OSError as error:
            print(f"convserve predict: error: cannot read {path}: {error.strerror}",
                  file=sys.stderr)
            return EXIT_FAILED
    with connect(args) as client:
        result = client.predict(payloads, top_k=args.top_k, version=args.version)
    if args.output == "json":
        print(json.dumps({"version": result.version, "images": [
            {"file": str(path), "class": name, "top_k": [{"class": label, "probability": p}
                                                          for label, p in ranked]}
            for path, name, ranked in zip(args.files, result.names,
                                          result.top_k or [()] * len(payloads), strict=True)]},
            indent=2))
        return EXIT_OK
    for path, name, ranked in zip(args.files, result.names, result.top_k or [()] * len(payloads),
                                  strict=True):
        others = ", ".join(f"{label} {p:.3f}" for label, p in ranked)
        print(f"{path}: {name}  ({others})")
    print(f"model version {result.version}")
    return EXIT_OK


def add_promote_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("version", type=int, metavar="N")
    parser.add_argument("--reason", required=True)
    add_address(parser)


def add_health_arguments(parser: argparse.ArgumentParser) -> None:
    add_address(parser)
    parser.add_argument("--service", default="",
                        help="one service, e.g. convserve.v1.Inference (default: the server)")


def health(args: argparse.Namespace) -> int:
    """Exit 0 when SERVING, else 1: the container's HEALTHCHECK and a probe for scripts."""
    with connect(args, retries=0) as client:
        status = client.health(args.service)
    print(status)
    return EXIT_OK if status == "SERVING" else EXIT_FAILED


def promote(args: argparse.Namespace) -> int:
    with connect(args) as client:
        info = client.promote(args.version, args.reason)
    print(f"promoted version {info.version} ({info.dataset}, val accuracy "
          f"{info.val_accuracy:.4f}): {args.reason}")
    return EXIT_OK
