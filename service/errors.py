"""One exception hierarchy for the service and the single place it maps to gRPC status codes.

Every error a caller can cause is a `ConvserveError` whose message says what was expected and what
came; the servicers never choose a status code themselves. Anything else is a bug: INTERNAL, logged
with its traceback, and the server keeps serving.
"""

from __future__ import annotations

import grpc

from convserve.store import IntegrityError, InvalidJobId, StoreError, VersionNotFound


class ConvserveError(Exception):
    """Base class: an error the caller caused or can act on."""

    code = grpc.StatusCode.INTERNAL


class InvalidInput(ConvserveError):
    """Bad shape, dtype, size, layout, undecodable image, out-of-range parameter."""

    code = grpc.StatusCode.INVALID_ARGUMENT


class NotFound(ConvserveError):
    """Unknown job or model version."""

    code = grpc.StatusCode.NOT_FOUND


class NoModel(ConvserveError):
    """No model is promoted yet.

    FAILED_PRECONDITION rather than UNAVAILABLE: retrying does not help until someone trains or
    promotes a model, and a load balancer must not read it as "this replica is down".
    """

    code = grpc.StatusCode.FAILED_PRECONDITION


class LimitExceeded(ConvserveError):
    """Too many images in a request, a message too large, a full queue."""

    code = grpc.StatusCode.RESOURCE_EXHAUSTED


class Conflict(ConvserveError):
    """The request is valid but the target's state forbids it (e.g. cancelling a finished job)."""

    code = grpc.StatusCode.FAILED_PRECONDITION


class AlreadyExists(ConvserveError):
    """A create whose key already names something different (an idempotency key reused with
    other parameters)."""

    code = grpc.StatusCode.ALREADY_EXISTS


class Unavailable(ConvserveError):
    """The server is draining or cannot serve right now; a retry elsewhere may succeed."""

    code = grpc.StatusCode.UNAVAILABLE


class Unauthenticated(ConvserveError):
    code = grpc.StatusCode.UNAUTHENTICATED


class PermissionDenied(ConvserveError):
    code = grpc.StatusCode.PERMISSION_DENIED


class ClientError(Exception):
    """What the SDK raises for a failed call: `code` is the gRPC status code, `details` the
    server's message. Defined here (grpc only) so the CLI can catch it without importing the SDK."""

    def __init__(self, code: grpc.StatusCode, details: str, method: str = "",
                 request_id: str = "") -> None:
        prefix = f"{method}: " if method else ""
        super().__init__(f"{prefix}{code.name}: {details}")
        self.code = code
        self.details = details
        self.request_id = request_id  # the server's log lines for this call carry it


def status_of(error: BaseException) -> tuple[grpc.StatusCode, str]:
    """The status code and message a caller receives for `error`."""
    if isinstance(error, ConvserveError):
        return error.code, str(error)
    if isinstance(error, VersionNotFound):
        return grpc.StatusCode.NOT_FOUND, str(error)
    if isinstance(error, InvalidJobId):
        return grpc.StatusCode.INVALID_ARGUMENT, str(error)
    if isinstance(error, IntegrityError):
        # The store holds a file that no longer matches its card: not the caller's fault, and
        # not something retrying fixes; an operator must promote a sound version.
        return grpc.StatusCode.DATA_LOSS, str(error)
    if isinstance(error, StoreError):
        return grpc.StatusCode.FAILED_PRECONDITION, str(error)
    return grpc.StatusCode.INTERNAL, f"internal error ({type(error).__name__}); see server log"
