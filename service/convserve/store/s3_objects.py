"""The few object operations the S3 store needs, over boto3, with S3's conditional writes and
boto3's errors turned into convserve's.

Why boto3: it has the conditional writes (`IfNoneMatch="*"` to create only, `IfMatch=<ETag>` to
replace only what was read; botocore 1.35+), retries with backoff (its "standard" mode), multipart
uploads of large files, and it is what TensorBoard's S3 reader already uses, so one client library
serves both. obstore was the other candidate: smaller and async, but a second S3 stack beside the
one TensorBoard brings. The serving image grows by botocore's ~35 MB (docs/deploy.md).

Errors: a server that cannot be reached (refused, timed out, 5xx after boto3's retries) is
`Unavailable`, which callers wait out; wrong credentials, a missing bucket and other refusals are
`StoreError` with the bucket named and what to check.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import boto3
import botocore.exceptions as boto_errors
from botocore.config import Config

from convserve.contracts.errors import StoreError, Unavailable
from convserve.store.location import StoreLocation

log = logging.getLogger("convserve.store")

# Short connect timeout: a replica polls every half second and must notice an outage quickly;
# boto3's standard retry mode then backs off (3 attempts in all) before we call it Unavailable.
CLIENT_CONFIG = Config(connect_timeout=2, read_timeout=30, retries={"mode": "standard",
                       "max_attempts": 3}, max_pool_connections=16,
                       s3={"addressing_style": "path"})  # S3-compatible servers expect paths
_DENIED = {"AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch", "403",
           "InvalidToken", "ExpiredToken"}
_MISSING = {"NoSuchKey", "404", "NotFound"}


class PreconditionFailed(Exception):
    """A conditional write lost: the key exists (If-None-Match) or changed (If-Match)."""


@dataclass(frozen=True)
class Blob:
    body: bytes
    etag: str


class NotModified(Exception):
    """A conditional GET: the object still has the ETag the caller holds."""


class Objects:
    """One bucket and prefix; keys passed in are relative to the prefix. Thread-safe."""

    def __init__(self, location: StoreLocation) -> None:
        self.url = location.url
        self.bucket, self.prefix = location.bucket_and_prefix()
        try:
            self._s3: Any = boto3.session.Session().client(
                "s3", endpoint_url=location.s3_endpoint_url or None, config=CLIENT_CONFIG)
        except boto_errors.BotoCoreError as error:  # e.g. no region and no endpoint
            raise StoreError(f"cannot set up the S3 client for {self.url}: {error}") from None

    def key(self, name: str) -> str:
        return self.prefix + name

    def check(self) -> None:
        """Reach the bucket with these credentials (HEAD bucket)."""
        with self.errors("reach the bucket"):
            self._s3.head_bucket(Bucket=self.bucket)

    def get(self, name: str, *, if_none_match: str | None = None) -> Blob | None:
        """The object and its ETag; None when it does not exist; NotModified when its ETag is
        still `if_none_match` (a poll that finds nothing new costs one small request)."""
        extra = {"IfNoneMatch": if_none_match} if if_none_match else {}
        try:
            with self.errors(f"read {name}"):
                reply = self._s3.get_object(Bucket=self.bucket, Key=self.key(name), **extra)
                body = reply["Body"].read()
        except _Missing:
            return None
        return Blob(body, str(reply["ETag"]))

    def put(self, name: str, body: bytes, *, create_only: bool = False,
            if_match: str | None = None) -> str:
        """Write an object; returns its ETag. PreconditionFailed when `create_only` and it exists,
        or when `if_match` no longer is its ETag."""
        extra: dict[str, str] = {}
        if create_only:
            extra["IfNoneMatch"] = "*"
        if if_match:
            extra["IfMatch"] = if_match
        with self.errors(f"write {name}"):
            reply = self._s3.put_object(Bucket=self.bucket, Key=self.key(name), Body=body, **extra)
        return str(reply["ETag"])

    def upload(self, name: str, path: Path) -> None:
        """A file, as one object (multipart when large: invisible until complete)."""
        with self.errors(f"upload {name}"):
            self._s3.upload_file(str(path), self.bucket, self.key(name))

    def download(self, name: str, into: IO[bytes]) -> None:
        with self.errors(f"download {name}"):
            self._s3.download_fileobj(self.bucket, self.key(name), into)

    def delete(self, name: str) -> None:
        with self.errors(f"delete {name}"):
            self._s3.delete_object(Bucket=self.bucket, Key=self.key(name))

    def names(self, under: str) -> Iterator[str]:
        """Every key under `under` (relative to the prefix), in lexicographic order."""
        pages = self._s3.get_paginator("list_objects_v2").paginate(
            Bucket=self.bucket, Prefix=self.key(under))
        with self.errors(f"list {under}"):
            for page in pages:
                for item in page.get("Contents", ()):
                    yield item["Key"][len(self.prefix):]

    @contextlib.contextmanager
    def errors(self, action: str) -> Iterator[None]:
        """boto3's exceptions as convserve's, naming the bucket and the action."""
        where = f"{self.url} (bucket {self.bucket!r})"
        try:
            yield
        except boto_errors.ClientError as error:
            raise _client_error(error, self.url, self.bucket, action) from None
        except (boto_errors.NoCredentialsError, boto_errors.PartialCredentialsError) as error:
            raise StoreError(f"cannot {action} in {where}: no usable AWS credentials ({error}); "
                             "set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, a profile or a "
                             "role") from None
        except boto_errors.BotoCoreError as error:  # refused, timed out, closed mid-reply, ...
            raise Unavailable(f"object store {where} unreachable: cannot {action}: {error}"
                              ) from None


class _Missing(Exception):
    """A 404 for a key, which `get` answers with None."""


def _client_error(error: boto_errors.ClientError, url: str, bucket: str, action: str
                  ) -> Exception:
    where = f"{url} (bucket {bucket!r})"
    info = error.response.get("Error", {})
    code = str(info.get("Code", ""))
    status = int(error.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0) or 0)
    if code in ("PreconditionFailed", "412") or status == 412:
        return PreconditionFailed(action)
    if code == "304" or status == 304:
        return NotModified(action)
    if code == "NoSuchBucket" or (action == "reach the bucket" and status == 404):
        return StoreError(f"no bucket {bucket!r} for {url}: create it, or correct --store")
    if code in _MISSING or status == 404:
        return _Missing(action)
    if code in _DENIED or status == 403:
        return StoreError(f"access denied to {where} ({code}): check the AWS credentials "
                          f"(AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY or the role) and the "
                          f"bucket's policy; could not {action}")
    if status >= 500 or code in ("SlowDown", "ServiceUnavailable", "InternalError"):
        return Unavailable(f"object store {where} failing: cannot {action}: {code} "
                           f"{info.get('Message', '')}".rstrip())
    return StoreError(f"object store {where} refused to {action}: {code} "
                      f"{info.get('Message', '')}".rstrip())
