"""`convserve models ...`: the model store from the operator's shell, with no server: list,
show (and check), promote, history, and copy a whole store between a directory and object storage.

Every command takes ``--store DIR|s3://BUCKET/PREFIX`` (default: $CONVSERVE_STORE; the flag wins)
and ``--s3-endpoint-url`` for S3-compatible servers; credentials come from the AWS settings.
"""

from __future__ import annotations

import argparse
import getpass
import json
import os
import sys
from pathlib import Path

from convserve.contracts.commands import EXIT_FAILED, EXIT_OK, add_output_flag
from convserve.contracts.errors import ConfigError, IntegrityError, StoreError
from convserve.store.base import HistoryEntry, ModelStore
from convserve.store.location import location_of
from convserve.store.location import open_store as open_location
from convserve.store.transfer import copy_store

PROG = "convserve"
STORE_ENV = "CONVSERVE_STORE"
S3_ENDPOINT_ENV = "CONVSERVE_S3_ENDPOINT_URL"

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


def add_store(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--store", type=_non_empty, default=None, metavar="DIR|s3://BUCKET/PREFIX",
                        help=f"the model store (default: ${STORE_ENV})")
    _add_endpoint(parser)


def _add_endpoint(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--s3-endpoint-url", default=None, metavar="URL",
                        help=f"an S3-compatible server, for s3:// stores (default: "
                             f"${S3_ENDPOINT_ENV}, else AWS's own)")


def _add_version(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("version", type=_version, metavar="N", help="model version number")


# ----------------------------------------------------------------------------- helpers


def open_store(args: argparse.Namespace) -> ModelStore:
    """The store named by --store or $CONVSERVE_STORE; it must already exist."""
    url = args.store or os.environ.get(STORE_ENV, "")
    if not url.strip():
        raise ConfigError(f"no model store given: pass --store DIR or set {STORE_ENV}")
    return existing_store(url, _endpoint(args))


def existing_store(url: str, s3_endpoint_url: str, *, existing: bool = True) -> ModelStore:
    """Open a store and reach it. A directory must hold a store already unless `existing` is
    False: a typo must fail, not show (or fill) an empty new store."""
    # An object store's downloads go to the user's cache, not into the current directory.
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "convserve"
    location = location_of(url, s3_endpoint_url=s3_endpoint_url,
                           work_dir=cache if url.startswith("s3://") else "")
    if existing and not location.is_s3 and not (Path(url) / "models").is_dir():
        raise StoreError(f"no model store at {url} (expected a directory containing models/)")
    store = open_location(location)
    store.check()
    return store


def _endpoint(args: argparse.Namespace) -> str:
    return args.s3_endpoint_url if args.s3_endpoint_url is not None else \
        os.environ.get(S3_ENDPOINT_ENV, "")


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


# ----------------------------------------------------------------------------- models commands


def add_list_arguments(parser: argparse.ArgumentParser) -> None:
    add_store(parser)
    add_output_flag(parser)


def models_list(args: argparse.Namespace) -> int:
    store = open_store(args)
    if args.output == "json":
        print(json.dumps(_versions(store), indent=2))
    elif store.versions():
        print(format_versions_table(store))
    else:
        print(f"no versions in {store.url}")
    return EXIT_OK


def add_show_arguments(parser: argparse.ArgumentParser) -> None:
    _add_version(parser)
    add_store(parser)
    add_output_flag(parser)


def models_show(args: argparse.Namespace) -> int:
    store = open_store(args)
    card = store.card(args.version)
    status = _promotion_status(store, args.version)
    try:
        store.open_version(args.version)
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
    if failure:
        print(f"{PROG}: error: {failure}", file=sys.stderr)
        return EXIT_FAILED
    return EXIT_OK


def add_promote_arguments(parser: argparse.ArgumentParser) -> None:
    _add_version(parser)
    parser.add_argument("--reason", type=_non_empty, required=True,
                        help="why (recorded in the promotion history)")
    parser.add_argument("--actor", type=_non_empty, default=None, metavar="NAME",
                        help="recorded as operator:NAME (default: the login user)")
    add_store(parser)


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
        print(f"no promotions in {store.url}")
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




def add_copy_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("source", type=_non_empty, metavar="SRC",
                        help="the store to copy: a directory or s3://BUCKET/PREFIX")
    parser.add_argument("destination", type=_non_empty, metavar="DST",
                        help="an empty store (created if it is a new directory)")
    _add_endpoint(parser)


def models_copy(args: argparse.Namespace) -> int:
    source = existing_store(args.source, _endpoint(args))
    destination = existing_store(args.destination, _endpoint(args), existing=False)
    copied = copy_store(source, destination)
    print(f"copied {len(copied.versions)} versions and {copied.history} history entries from "
          f"{source.url} to {destination.url}; promoted: {copied.promoted or 'none'}")
    return EXIT_OK
