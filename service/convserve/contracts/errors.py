"""convserve's one exception hierarchy. Standard library only, so the store, the training spec and
the training process raise the same classes the server maps to gRPC status codes.

Every error a caller can cause or act on is a `ConvserveError` whose one-line message says what was
expected and what came. `status` names the gRPC status code a remote caller receives; the mapping
to grpc itself lives in one place, `convserve.errors.status_of`. Anything else is a bug: INTERNAL.
"""

from __future__ import annotations


class ConvserveError(Exception):
    """Base class: an error the caller caused or can act on."""

    status = "INTERNAL"


class InvalidInput(ConvserveError, ValueError):
    """Bad shape, dtype, size, layout, undecodable image, out-of-range parameter."""

    status = "INVALID_ARGUMENT"


class ConfigError(InvalidInput):
    """A setting out of range (training spec, gate policy, server settings); the message names the
    setting, the value and the range."""


class PortInUse(ConfigError):
    """A port the configuration names is taken by another process: exit 2, one line."""


class DatasetError(InvalidInput):
    """A dataset name, or a dataset on disk, that cannot be used. Shown to remote callers, so the
    message is always one line."""

    def __init__(self, message: str) -> None:
        super().__init__(" ".join(str(message).split()))


class NotFound(ConvserveError):
    """Unknown job or model version."""

    status = "NOT_FOUND"


class NoModel(ConvserveError):
    """No model is promoted yet.

    FAILED_PRECONDITION rather than UNAVAILABLE: retrying does not help until someone trains or
    promotes a model, and a load balancer must not read it as "this replica is down".
    """

    status = "FAILED_PRECONDITION"


class LimitExceeded(ConvserveError):
    """Too many images in a request, a message too large, a full queue."""

    status = "RESOURCE_EXHAUSTED"


class Conflict(ConvserveError):
    """The request is valid but the target's state forbids it (e.g. cancelling a finished job)."""

    status = "FAILED_PRECONDITION"


class AlreadyExists(ConvserveError):
    """A create whose key already names something different (an idempotency key reused with
    other parameters)."""

    status = "ALREADY_EXISTS"


class Unavailable(ConvserveError):
    """The server is draining or cannot serve right now; a retry elsewhere may succeed."""

    status = "UNAVAILABLE"


class Unauthenticated(ConvserveError):
    status = "UNAUTHENTICATED"


class PermissionDenied(ConvserveError):
    status = "PERMISSION_DENIED"


# --- the model store ---------------------------------------------------------------------------

class StoreError(ConvserveError):
    """The model store refuses an operation; messages are one line."""

    status = "FAILED_PRECONDITION"


class VersionNotFound(StoreError, NotFound):
    """The requested version does not exist."""

    status = "NOT_FOUND"


class IntegrityError(StoreError):
    """A version's files are missing, unreadable or do not match the card's sha256. Not the
    caller's fault and not fixed by retrying: an operator must promote a sound version."""

    status = "DATA_LOSS"


class ClaimLost(StoreError):
    """A training process's attempt no longer holds its job: its trainer was declared dead and
    another attempt took the job over, so this one must not publish."""


class InvalidJobId(StoreError, InvalidInput):
    """A job id is not 1-64 characters of [A-Za-z0-9_-]."""

    status = "INVALID_ARGUMENT"


class ModelLoadError(ConvserveError):
    """A version exists and is intact but cannot be served (not ONNX, wrong inputs/outputs...)."""

    status = "FAILED_PRECONDITION"


# --- a training run ----------------------------------------------------------------------------

class ExportError(ConvserveError):
    """The export failed, or the exported file does not match the torch model."""


class ResumeError(ConvserveError):
    """A checkpoint that cannot continue this run (missing, or made with another config)."""

    status = "FAILED_PRECONDITION"
