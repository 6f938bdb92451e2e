"""Transport security shared by the agent and the orchestrator: bearer token, TLS, mTLS.

The token travels as `authorization: Bearer <token>` call metadata. Health checks and
reflection stay open by default so that probes and tooling need no secret. The token is never
logged.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from pathlib import Path
from typing import Any

import grpc

log = logging.getLogger("rlm.auth")

AUTHORIZATION = "authorization"
BEARER = "bearer"
DEFAULT_EXEMPT_SERVICES: frozenset[str] = frozenset(
    {
        "grpc.health.v1.Health",
        "grpc.reflection.v1alpha.ServerReflection",
        "grpc.reflection.v1.ServerReflection",
    }
)
MISSING_TOKEN = "missing bearer token (expected metadata 'authorization: Bearer <token>')"
INVALID_TOKEN = "invalid bearer token"
FIRST_MESSAGE_WAIT_SECONDS = 1.0


def bearer_metadata(token: str) -> tuple[tuple[str, str], ...]:
    """Call metadata carrying `token`, for `stub.Method(request, metadata=...)`."""
    return ((AUTHORIZATION, f"Bearer {token}"),)


def _service_of(method: str) -> str:
    """'/pkg.Service/Method' -> 'pkg.Service'."""
    return method.lstrip("/").rpartition("/")[0]


def _refusal(handler: Any, message: str) -> Any:
    """A handler of the same RPC kind as `handler` that fails the call with UNAUTHENTICATED.

    The kind matters: a unary-request handler waits for the request message, a
    stream-request one does not. An unknown method (`handler` None) gets a stream-stream one,
    so that unauthenticated callers learn nothing about which methods exist. The request is
    never deserialized: nothing from an unauthenticated caller gets parsed.
    """

    async def refuse(_request: object, context: grpc.aio.ServicerContext) -> None:
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, message)

    async def refuse_stream(
        requests: AsyncIterator[bytes], context: grpc.aio.ServicerContext
    ) -> None:
        # Take the first message (raw bytes, never parsed) before refusing: aborting while
        # it is still in flight races in gRPC core and the client may see INTERNAL instead.
        with contextlib.suppress(Exception):
            async with asyncio.timeout(FIRST_MESSAGE_WAIT_SECONDS):
                await anext(aiter(requests), None)
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, message)

    request_streaming = handler.request_streaming if handler is not None else True
    response_streaming = handler.response_streaming if handler is not None else True
    if request_streaming:
        refuse = refuse_stream  # type: ignore[assignment]
    if request_streaming and response_streaming:
        make = grpc.stream_stream_rpc_method_handler
    elif request_streaming:
        make = grpc.stream_unary_rpc_method_handler
    elif response_streaming:
        make = grpc.unary_stream_rpc_method_handler
    else:
        make = grpc.unary_unary_rpc_method_handler
    return make(refuse)


class BearerTokenInterceptor(grpc.aio.ServerInterceptor):  # type: ignore[misc]
    """Refuses calls without `authorization: Bearer <token>` (UNAUTHENTICATED).

    Calls to `exempt_services` (full service names) pass without a token.
    """

    def __init__(
        self, token: str, exempt_services: Iterable[str] = DEFAULT_EXEMPT_SERVICES
    ) -> None:
        if not token:
            raise ValueError("the bearer token must not be empty")
        self._token = token.encode()
        self._exempt = frozenset(exempt_services)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(exempt_services={sorted(self._exempt)!r})"

    def _check(self, metadata: Iterable[tuple[str, Any]] | None) -> str | None:
        """None when the metadata holds exactly one matching bearer token, else why not."""
        values = [value for key, value in metadata or () if key.lower() == AUTHORIZATION]
        tokens = []
        for value in values:
            scheme, _, credentials = str(value).strip().partition(" ")
            if scheme.lower() == BEARER:
                tokens.append(credentials.strip())
        if not tokens:
            return MISSING_TOKEN
        if len(values) != 1 or not hmac.compare_digest(tokens[0].encode(), self._token):
            return INVALID_TOKEN
        return None

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[Any]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> Any:
        method: str = handler_call_details.method
        if _service_of(method) in self._exempt:
            return await continuation(handler_call_details)
        problem = self._check(handler_call_details.invocation_metadata)
        handler = await continuation(handler_call_details)
        if problem is None:
            return handler
        log.warning("refused %s: %s", method, problem)
        return _refusal(handler, problem)


def _read(path: Path | None) -> bytes | None:
    return path.read_bytes() if path is not None else None


def server_credentials(
    cert_file: Path, key_file: Path, client_ca_file: Path | None = None
) -> grpc.ServerCredentials:
    """TLS with the server's certificate chain and key (PEM).

    With `client_ca_file`, mutual TLS: clients must present a certificate signed by that CA.
    """
    return grpc.ssl_server_credentials(
        [(key_file.read_bytes(), cert_file.read_bytes())],
        root_certificates=_read(client_ca_file),
        require_client_auth=client_ca_file is not None,
    )


def channel_credentials(
    ca_file: Path | None = None, cert_file: Path | None = None, key_file: Path | None = None
) -> grpc.ChannelCredentials:
    """Client TLS: trust `ca_file` (default: the system roots); with cert and key, mTLS."""
    if (cert_file is None) != (key_file is None):
        raise ValueError("a client certificate needs both cert_file and key_file")
    return grpc.ssl_channel_credentials(
        root_certificates=_read(ca_file),
        private_key=_read(key_file),
        certificate_chain=_read(cert_file),
    )
