"""The one place convserve's errors meet gRPC: the status a caller receives for an exception, and
`ClientError`, what the SDK raises for a failed call.

The hierarchy itself is `convserve.contracts.errors` (standard library only), and every module
imports its error classes from there: one import path for each class (a test checks it). This
module holds only what needs grpc. The servicers never choose a status code themselves.
"""

from __future__ import annotations

import grpc

from convserve.contracts.errors import ConvserveError

__all__ = ["ClientError", "status_of"]


class ClientError(ConvserveError):
    """What the SDK raises for a failed call: `code` is the gRPC status code, `details` the
    server's message. Here (grpc only) so the CLI can catch it without importing the SDK."""

    def __init__(self, code: grpc.StatusCode, details: str, method: str = "",
                 request_id: str = "") -> None:
        prefix = f"{method}: " if method else ""
        super().__init__(f"{prefix}{code.name}: {details}")
        self.code = code
        self.status = code.name
        self.details = details
        self.request_id = request_id  # the server's log lines for this call carry it


def status_of(error: BaseException) -> tuple[grpc.StatusCode, str]:
    """The status code and message a caller receives for `error`."""
    if isinstance(error, ConvserveError):
        return grpc.StatusCode[error.status], str(error)
    return grpc.StatusCode.INTERNAL, f"internal error ({type(error).__name__}); see server log"
