"""Where a model store is, and opening it: a directory (the default, no setup) or
`s3://bucket/prefix` on S3 or an S3-compatible server.

Credentials and region come from boto3's standard chain (environment, ~/.aws files, instance and
pod roles), never from the URL, so a URL can be logged and written into a job's spec.json.
Standard library only: boto3 is imported when an s3:// store is opened.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

from convserve.contracts.errors import ConfigError, StoreError, Unavailable
from convserve.store.base import ModelStore

log = logging.getLogger("convserve.store")

S3_SCHEME = "s3://"
DEFAULT_WORK_DIR = "convserve-work"  # relative to the current directory, object stores only


@dataclass(frozen=True)
class StoreLocation:
    url: str                  # a directory, or s3://bucket/prefix
    s3_endpoint_url: str = ""  # an S3-compatible server; "" = boto3's own (AWS_ENDPOINT_URL too)
    work_dir: str = ""        # local job directories; "" = the directory store's own directory

    @property
    def is_s3(self) -> bool:
        return self.url.startswith(S3_SCHEME)

    def bucket_and_prefix(self) -> tuple[str, str]:
        """("bucket", "prefix/") of an s3:// URL ("" prefix: the bucket's root)."""
        parts = urlsplit(self.url)
        if parts.scheme != "s3" or not parts.netloc or parts.query or parts.fragment:
            raise ConfigError(f"store URL {self.url!r}: expected s3://bucket or "
                              "s3://bucket/prefix (credentials come from the AWS settings)")
        if "@" in parts.netloc or ":" in parts.netloc:
            raise ConfigError(f"store URL {self.url!r}: no credentials or port in the URL; use "
                              "the AWS environment or config files, and --s3-endpoint-url")
        prefix = parts.path.strip("/")
        return parts.netloc, f"{prefix}/" if prefix else ""

    def local_work_dir(self) -> Path:
        if self.work_dir:
            return Path(self.work_dir)
        return Path(DEFAULT_WORK_DIR) if self.is_s3 else Path(self.url)


def location_of(store: str | os.PathLike[str], *, s3_endpoint_url: str = "",
                work_dir: str | os.PathLike[str] = "") -> StoreLocation:
    text = os.fspath(store)
    if not text.strip():
        raise ConfigError("no model store given: expected a directory or s3://bucket/prefix")
    if "://" in text and not text.startswith(S3_SCHEME):
        raise ConfigError(f"store {text!r}: expected a directory or s3://bucket/prefix")
    location = StoreLocation(text, s3_endpoint_url, os.fspath(work_dir))
    if location.is_s3:
        location.bucket_and_prefix()  # reject a malformed URL before anything starts
    return location


def open_store(location: StoreLocation) -> ModelStore:
    """The store at `location`; nothing is contacted yet (`check()` does that)."""
    if location.is_s3:
        from convserve.store.s3 import S3Store  # boto3 only for object stores

        return S3Store(location)
    from convserve.store.directory import DirectoryStore

    return DirectoryStore(location.url, work_dir=location.work_dir or None)


def open_reachable(location: StoreLocation) -> ModelStore:
    """A server's store, reached once at start: wrong credentials or a missing bucket are a
    ConfigError (one line, exit 2); an unreachable store is not (models load once it answers)."""
    store = open_store(location)
    try:
        store.check()
    except StoreError as error:
        raise ConfigError(f"model store: {error}") from None
    except Unavailable as error:
        log.warning("%s; starting anyway: models load once it answers", error)
    return store
