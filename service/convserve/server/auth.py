"""Access control: a bearer token for operator calls (and, if configured, for inference), TLS.

The token arrives as `authorization: Bearer <token>` metadata. A protected call without one is
answered UNAUTHENTICATED, with a wrong one PERMISSION_DENIED; the comparison takes constant time
(`hmac.compare_digest`) and the token is never logged (the configuration print redacts it).
"""

from __future__ import annotations

import hmac
import ssl
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import grpc

from convserve.contracts.errors import ConvserveError, PermissionDenied, Unauthenticated
from convserve.contracts.headers import AUTHORIZATION
from convserve.errors import status_of

OPERATOR_METHODS = frozenset({"/convserve.v1.Training/Train", "/convserve.v1.Training/CancelJob",
                              "/convserve.v1.Models/Promote"})
# With --auth-inference: Predict and its reads, and the Open Inference Protocol's methods that
# read or run the model (its health, readiness and server metadata stay open, as probes need).
INFERENCE_METHODS = frozenset({"/convserve.v1.Inference/Predict",
                               "/convserve.v1.Inference/GetModel",
                               "/convserve.v1.Inference/ListModels",
                               *(f"/inference.GRPCInferenceService/{method}" for method in (
                                   "ModelMetadata", "ModelInfer", "ModelConfig",
                                   "ModelStatistics", "RepositoryIndex"))})


class BearerTokenAuth(grpc.aio.ServerInterceptor):
    def __init__(self, token: str, protected: frozenset[str]) -> None:
        if not token:
            raise ValueError("an empty token would let every caller in")
        self._token = token.encode()
        self._protected = protected

    async def intercept_service(
            self, continuation: Callable[[grpc.HandlerCallDetails], Awaitable[Any]],
            details: grpc.HandlerCallDetails) -> Any:
        if details.method not in self._protected:
            return await continuation(details)
        supplied = dict(details.invocation_metadata or ()).get(AUTHORIZATION, "")
        scheme, _, token = supplied.partition(" ")
        if scheme.lower() != "bearer" or not token:
            return _refusal(Unauthenticated(
                f"{details.method} needs a bearer token: send metadata 'authorization: Bearer "
                "<token>' (SDK: Client(token=...); CLI: --token or CONVSERVE_TOKEN)"))
        if not hmac.compare_digest(token.encode(), self._token):
            return _refusal(PermissionDenied(f"{details.method}: the bearer token is not valid"))
        return await continuation(details)


def _refusal(error: ConvserveError) -> grpc.RpcMethodHandler:
    code, message = status_of(error)  # the one status map, as for every other refusal

    async def refuse(request: bytes, context: grpc.aio.ServicerContext) -> None:
        await context.abort(code, message)

    return grpc.unary_unary_rpc_method_handler(refuse)  # raw bytes in: nothing is parsed


def server_credentials(cert_file: str, key_file: str, client_ca_file: str = ""
                       ) -> grpc.ServerCredentials:
    """TLS from PEM files; with a client CA, callers must present a certificate it signed."""
    client_ca = Path(client_ca_file).read_bytes() if client_ca_file else None
    return grpc.ssl_server_credentials(
        [(Path(key_file).read_bytes(), Path(cert_file).read_bytes())],
        root_certificates=client_ca, require_client_auth=client_ca is not None)


def http_ssl_context(cert_file: str, key_file: str, client_ca_file: str = ""
                     ) -> ssl.SSLContext | None:
    """The same TLS for the HTTP port as server_credentials gives gRPC (None: plaintext)."""
    if not cert_file:
        return None
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(cert_file, key_file)
    if client_ca_file:
        context.load_verify_locations(client_ca_file)
        context.verify_mode = ssl.CERT_REQUIRED
    return context
