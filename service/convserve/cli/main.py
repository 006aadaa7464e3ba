"""`convserve`: the operator's command line for the model store and the server.

    convserve serve [--port N --store DIR ...]             run a replica (see --help)
    convserve train --dataset digits --epochs 10 --watch   start a job on a server and follow it
    convserve watch JOB | jobs | cancel JOB                follow, list, cancel jobs
    convserve predict FILE... [--top-k 3]                  classify PNG/JPEG files
    convserve promote N --reason TEXT                      rollback/pin through a server

    convserve models list                                  versions, '*' marks the promoted one
    convserve models show N                                card, promotion status, sha256 check
    convserve models promote N --reason TEXT [--actor NAME]  point PROMOTED at N (rollback/pin)
    convserve models history                               promotion history, oldest first
    convserve db upgrade [--jobs-url URL]                  create/migrate the PostgreSQL job store

Every models command takes ``--store DIR`` (default: $CONVSERVE_STORE; the flag wins).
Exit codes: 0 done; 1 the operation failed (store or integrity error, no store at DIR);
2 usage error. An error is always one line on stderr, never a traceback.

Standard library and convserve.store.directory only: this module is the server's entry point and the serving
path must never import torch, numpy or onnxruntime. A command that needs them imports them inside
its handler, so `--help` and argument errors stay fast.

Adding a subcommand: write ``def handler(args: argparse.Namespace) -> int`` (plus a function that
adds its arguments, if any) and append one ``Command`` to ``COMMANDS``; a new group also needs a
line in ``GROUPS``.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from convserve.cli import demo, models, remote
from convserve.contracts.commands import (
    EXIT_FAILED,
    EXIT_INTERRUPTED,
    EXIT_OK,
    EXIT_USAGE,
    OneLineParser,
    add_version_flag,
)
from convserve.contracts.errors import ConfigError, StoreError, Unavailable
from convserve.errors import ClientError
from convserve.jobs.backend import JOBS_URL_ENV

PROG = "convserve"


Handler = Callable[[argparse.Namespace], int]
AddArguments = Callable[[argparse.ArgumentParser], None]


def _fail(code: int, message: str) -> int:
    print(f"{PROG}: error: {message}", file=sys.stderr)
    return code


def _no_arguments(parser: argparse.ArgumentParser) -> None:
    """For commands that take no arguments of their own."""


@dataclass(frozen=True)
class Command:
    path: tuple[str, ...]  # ("models", "list") is `convserve models list`
    handler: Handler
    help: str
    add_arguments: AddArguments = _no_arguments


# ----------------------------------------------------------------------------- registry

def _add_jobs_url(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--jobs-url", default=None, metavar="URL",
                        help=f"the PostgreSQL job store (default: ${JOBS_URL_ENV})")


def db_upgrade(args: argparse.Namespace) -> int:
    """Create or migrate the PostgreSQL job store's schema: what every replica also does when
    it first reaches the database, for deployments whose runtime role may not run DDL."""
    from convserve.jobs import schema
    from convserve.jobs.backend import POSTGRESQL_SCHEMES, redact

    url = args.jobs_url or os.environ.get(JOBS_URL_ENV, "")
    if not url.startswith(POSTGRESQL_SCHEMES):
        raise ConfigError(f"expected --jobs-url or ${JOBS_URL_ENV} to be a PostgreSQL URL "
                          f"(postgresql://user:password@host/db), got {redact(url)!r}")
    applied = schema.upgrade_at(url)
    print(f"{redact(url)}: schema version {schema.LATEST} "
          f"({'applied ' + ', '.join(map(str, applied)) if applied else 'already current'})")
    return EXIT_OK


GROUPS: dict[tuple[str, ...], str] = {
    ("models",): "inspect, verify and promote model versions in the store",
    ("db",): "the PostgreSQL job store's schema",
}

COMMANDS: tuple[Command, ...] = (
    Command(("models", "list"), models.models_list, "list versions ('*' marks the promoted one)",
            models.add_list_arguments),
    Command(("models", "show"), models.models_show, "print a version's card and check its sha256",
            models.add_show_arguments),
    Command(("models", "promote"), models.models_promote,
            "promote an existing version (rollback or pin), recorded in the history",
            models.add_promote_arguments),
    Command(("models", "history"), models.models_history, "print the promotion history",
            models.add_store),
    Command(("models", "copy"), models.models_copy,
            "copy a store (versions, cards, history, pointer) to an empty one: a directory to "
            "s3:// or back", models.add_copy_arguments),
    Command(("db", "upgrade"), db_upgrade,
            "create or migrate the PostgreSQL job store's schema (replicas also do it at start)",
            _add_jobs_url),
    Command(("demo",), demo.run, "start a server, train on digits, predict: the quick start",
            demo.add_arguments),
    Command(("serve",), remote.serve, "run a server replica (flags or CONVSERVE_* variables)",
            remote.add_serve_arguments),
    Command(("train",), remote.train, "start a training job on a server",
            remote.add_train_arguments),
    Command(("watch",), remote.watch, "follow a job's progress until it ends",
            remote.add_job_arguments),
    Command(("jobs",), remote.jobs, "list training jobs", remote.add_jobs_arguments),
    Command(("resume",), remote.resume,
            "continue an INTERRUPTED job (its server stopped) from its checkpoint",
            remote.add_resume_arguments),
    Command(("cancel",), remote.cancel, "cancel a queued or running job",
            remote.add_job_arguments),
    Command(("predict",), remote.predict, "classify image files with the served model",
            remote.add_predict_arguments),
    Command(("health",), remote.health,
            "check the server's grpc.health.v1 status (exit 0 when SERVING)",
            remote.add_health_arguments),
    Command(("promote",), remote.promote,
            "ask a server to serve an existing version (rollback or pin)",
            remote.add_promote_arguments),
)


def build_parser(commands: Sequence[Command] = COMMANDS) -> OneLineParser:
    parser = OneLineParser(prog=PROG, description="Train, serve and manage ConvNet models.")
    add_version_flag(parser)
    parsers: dict[tuple[str, ...], argparse.ArgumentParser] = {(): parser}
    actions: dict[tuple[str, ...], argparse._SubParsersAction] = {}
    for command in commands:
        for depth in range(1, len(command.path) + 1):
            prefix, parent = command.path[:depth], command.path[: depth - 1]
            if prefix in parsers:
                continue
            if parent not in actions:
                # dest is needed for the "required" error message; metavar is what users see.
                actions[parent] = parsers[parent].add_subparsers(
                    dest=f"_command_{depth}", metavar="COMMAND", required=True)
            text = command.help if prefix == command.path else GROUPS[prefix]
            parsers[prefix] = actions[parent].add_parser(prefix[-1], help=text, description=text)
        command.add_arguments(parsers[command.path])
        parsers[command.path].set_defaults(_command=command)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exit_:  # --help or a usage error: return its code, as the signature says
        return EXIT_USAGE if isinstance(exit_.code, str) else exit_.code or EXIT_OK
    command: Command = args._command
    try:
        return command.handler(args)
    except ConfigError as error:  # a bad invocation only seen after parsing: exit 2
        return _fail(EXIT_USAGE, f"{error} (see --help)")
    except (StoreError, OSError) as error:
        return _fail(EXIT_FAILED, str(error))
    except (ClientError, Unavailable) as error:  # one line, no traceback
        return _fail(EXIT_FAILED, str(error))
    except KeyboardInterrupt:
        return _fail(EXIT_INTERRUPTED, "interrupted")
    except ModuleNotFoundError as error:  # a bare install (the SDK only) asked to serve or train
        extra = EXTRA_OF_MODULE.get((error.name or "").split(".")[0])
        if extra is None:
            raise
        return _fail(EXIT_FAILED, f"this command needs convserve's '{extra}' packages (no module "
                                  f"named {error.name!r}): pip install 'convserve[{extra}]'")


# The install extra that brings each module a bare `pip install convserve` lacks (pyproject.toml).
EXTRA_OF_MODULE = {"onnxruntime": "serve", "grpc_reflection": "serve", "PIL": "serve",
                   "prometheus_client": "serve", "aiohttp": "serve",
                   "torch": "train", "torchvision": "train", "onnx": "train",
                   "onnxscript": "train", "tensorboard": "train", "sklearn": "train"}

