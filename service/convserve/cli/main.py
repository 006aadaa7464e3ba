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

Standard library and convserve.contracts.store only: this module is the server's entry point and the serving
path must never import torch, numpy or onnxruntime. A command that needs them imports them inside
its handler, so `--help` and argument errors stay fast.

Adding a subcommand: write ``def handler(args: argparse.Namespace) -> int`` (plus a function that
adds its arguments, if any) and append one ``Command`` to ``COMMANDS``; a new group also needs a
line in ``GROUPS``.
"""

from __future__ import annotations

import argparse
import getpass
import json
import os
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from convserve.cli import demo, remote
from convserve.contracts.commands import (
    EXIT_FAILED,
    EXIT_INTERRUPTED,
    EXIT_OK,
    EXIT_USAGE,
    OneLineParser,
    add_output_flag,
    add_version_flag,
)
from convserve.contracts.errors import ConfigError, IntegrityError, StoreError, Unavailable
from convserve.contracts.store import HistoryEntry, ModelStore
from convserve.errors import ClientError
from convserve.jobs.backend import JOBS_URL_ENV

PROG = "convserve"
STORE_ENV = "CONVSERVE_STORE"


Handler = Callable[[argparse.Namespace], int]
AddArguments = Callable[[argparse.ArgumentParser], None]


def _no_arguments(parser: argparse.ArgumentParser) -> None:
    """For commands that take no arguments of their own."""


@dataclass(frozen=True)
class Command:
    path: tuple[str, ...]  # ("models", "list") is `convserve models list`
    handler: Handler
    help: str
    add_arguments: AddArguments = _no_arguments


# ----------------------------------------------------------------------------- argument types


def _non_empty(value: str) -> str:
    if not value.strip():
        raise argparse.ArgumentTypeError("must not be empty")
    return value


def _version(value: str) -> int:
    # Plain ASCII digits only: int() would also take "1_0" (10), " 2", "+3" and non-ASCII digits.
    if not (value.isascii() and value.isdigit()) or int(value) < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer version, got {value!r}")
    return int(value)


def _store_path(value: str) -> Path:
    return Path(_non_empty(value))  # Path("") would silently mean the current directory


def _add_store(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--store", type=_store_path, default=None, metavar="DIR",
                        help=f"model store root (default: ${STORE_ENV})")


def _add_version(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("version", type=_version, metavar="N", help="model version number")


# ----------------------------------------------------------------------------- helpers


def open_store(args: argparse.Namespace) -> ModelStore:
    """The store named by --store or $CONVSERVE_STORE; it must already exist."""
    root = args.store
    if root is None:
        env = os.environ.get(STORE_ENV, "")
        if not env.strip():
            raise ConfigError(f"no model store given: pass --store DIR or set {STORE_ENV}")
        root = Path(env)
    # ModelStore() creates missing directories; a typo must fail, not show an empty new store.
    # "models" is the layout ModelStore creates (see service/contracts/store.py).
    if not (root / "models").is_dir():
        raise StoreError(f"no model store at {root} (expected a directory containing models/)")
    return ModelStore(root)


def login_user() -> str:
    try:
        return getpass.getuser()
    except (KeyError, OSError):  # no passwd entry / no login name inside some containers
        return "unknown"


def _one_line(text: str) -> str:
    # Reasons are free text; keep one history entry per output line.
    return " ".join(text.split())


def _or_none(version: int | None) -> str:
    return "none" if version is None else str(version)


def _promotion_status(store: ModelStore, version: int) -> str:
    try:
        promoted = store.promoted_version()
    except IntegrityError as error:  # a dangling pointer must not hide the version being inspected
        return f"promotion unknown ({error})"
    if promoted == version:
        return "promoted"
    return f"not promoted (promoted: {_or_none(promoted)})"


def _format_history_entry(entry: HistoryEntry) -> str:
    return (f"{entry.time}  version {entry.version}  (was {_or_none(entry.previous)})  "
            f"{entry.actor}  {_one_line(entry.reason)}")


def _fail(code: int, message: str) -> int:
    print(f"{PROG}: error: {message}", file=sys.stderr)
    return code


# ----------------------------------------------------------------------------- models commands


def _add_list_arguments(parser: argparse.ArgumentParser) -> None:
    _add_store(parser)
    add_output_flag(parser)


def models_list(args: argparse.Namespace) -> int:
    store = open_store(args)
    if args.output == "json":
        print(json.dumps(_versions(store), indent=2))
    elif store.versions():
        print(format_versions_table(store))
    else:
        print(f"no versions in {store.root}")
    return EXIT_OK


def _add_show_arguments(parser: argparse.ArgumentParser) -> None:
    _add_version(parser)
    _add_store(parser)
    add_output_flag(parser)


def models_show(args: argparse.Namespace) -> int:
    store = open_store(args)
    card = store.card(args.version)
    status = _promotion_status(store, args.version)
    try:
        store.verify(args.version)
        failure = None
    except IntegrityError as error:
        failure = str(error)
    verified = "NOT verified" if failure else "verified"
    if args.output == "json":
        print(json.dumps({"version": args.version, "status": status,
                          "sha256_verified": failure is None, "card": card}, indent=2,
                         sort_keys=True))
    else:
        print(json.dumps(card, indent=2, sort_keys=True))
        print(f"version {args.version}: {status}; sha256 {verified}")
    return _fail(EXIT_FAILED, failure) if failure else EXIT_OK


def _add_promote_arguments(parser: argparse.ArgumentParser) -> None:
    _add_version(parser)
    parser.add_argument("--reason", type=_non_empty, required=True,
                        help="why (recorded in the promotion history)")
    parser.add_argument("--actor", type=_non_empty, default=None, metavar="NAME",
                        help="recorded as operator:NAME (default: the login user)")
    _add_store(parser)


def models_promote(args: argparse.Namespace) -> int:
    store = open_store(args)
    actor = f"operator:{args.actor or login_user()}"
    entry = store.promote(args.version, reason=args.reason, actor=actor)
    print(f"promoted version {entry.version} (was {_or_none(entry.previous)}): "
          f"{_one_line(entry.reason)}")
    return EXIT_OK


def models_history(args: argparse.Namespace) -> int:
    store = open_store(args)
    entries = store.history()
    if not entries:
        print(f"no promotions in {store.root}")
    for entry in entries:
        print(_format_history_entry(entry))
    return EXIT_OK


def format_versions_table(store: ModelStore) -> str:
    """Plain-text table of all versions (`convserve models list`); '*' marks the promoted one."""
    try:
        promoted = store.promoted_version()
    except StoreError:
        promoted = None  # a listing must still work when the pointer is broken
    header = ("VERSION", "P", "CREATED_AT", "DATASET", "VAL_ACC", "JOB_ID")
    rows = [header] + [_version_row(store, v, v == promoted) for v in store.versions()]
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    return "\n".join(
        "  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip()
        for row in rows
    )


def _versions(store: ModelStore) -> list[dict[str, object]]:
    """`models list -o json`: one object per version (null fields: an unreadable card)."""
    try:
        promoted = store.promoted_version()
    except StoreError:
        promoted = None
    rows: list[dict[str, object]] = []
    for version in store.versions():
        try:
            card = store.model_card(version)
        except StoreError:
            rows.append({"version": version, "promoted": version == promoted, "card": None})
            continue
        rows.append({"version": version, "promoted": version == promoted,
                     "created_at": card.created_at or None, "dataset": card.dataset or None,
                     "val_accuracy": card.val_accuracy, "job_id": card.job_id})
    return rows


def _version_row(store: ModelStore, version: int, promoted: bool) -> tuple[str, ...]:
    marker = "*" if promoted else ""
    try:
        card = store.model_card(version)
    except StoreError:
        return (str(version), marker, "(unreadable card)", "-", "-", "-")
    accuracy = f"{card.val_accuracy:.4f}" if card.val_accuracy is not None else "-"
    return (str(version), marker, card.created_at or "-", card.dataset or "-", accuracy,
            card.job_id or "-")


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
    Command(("models", "list"), models_list, "list versions ('*' marks the promoted one)",
            _add_list_arguments),
    Command(("models", "show"), models_show, "print a version's card and check its sha256",
            _add_show_arguments),
    Command(("models", "promote"), models_promote,
            "promote an existing version (rollback or pin), recorded in the history",
            _add_promote_arguments),
    Command(("models", "history"), models_history, "print the promotion history", _add_store),
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

