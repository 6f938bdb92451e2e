"""Transport security shared by the agent and the orchestrator: bearer token, TLS, mTLS.

The token travels as `authorization: Bearer <token>` call metadata. Health checks and
reflection stay open by default so that probes and tooling need no secret. The token is never
logged.
"""

from __future__ import annotations

import hmac
import logging
from collections.abc import Awaitable, Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import grpc

from rlm_wire.status import Unauthenticated, abort

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


def bearer_metadata(token: str) -> tuple[tuple[str, str], ...]:
    """Call metadata carrying `token`, for `stub.Method(request, metadata=...)`."""
    return ((AUTHORIZATION, f"Bearer {token}"),)


def _service_of(method: str) -> str:
    """'/pkg.Service/Method' -> 'pkg.Service'."""
    return method.lstrip("/").rpartition("/")[0]


def _refusal(message: str) -> grpc.RpcMethodHandler:
    """A handler that fails the call with UNAUTHENTICATED at once, reading nothing.

    Always a stream-stream handler, whatever the method's kind: grpc-python reads (and holds in
    memory) the request of a unary-request handler before calling it, up to the message size
    limit, while a stream-request handler starts before any message. The client cannot tell
    (the kinds look the same on the wire), and unknown methods look like known ones.

    Measured (grpc 1.85, 40 anonymous calls each sending a 16 MiB message, the server in its
    own process): reading the first message before refusing took the server's RSS up by
    ~500 MB (streams) and ~1 GB (unary); refusing at once, by 2-26 MB, and every call got
    UNAUTHENTICATED on the wire. (What is left is gRPC's own read-ahead on streams not read yet,
    which HTTP/2 BDP probing lets grow to megabytes per stream: the orchestrator server turns
    it off, see its `http2_bdp_probe` setting.) One client-side caveat: grpc.aio's client may report
    INTERNAL "Internal error from Core" instead, when a message of its own was still being
    sent as the status arrived (its failed write overwrites the status; 15-50% of bidi calls
    that write at once). The sync client always reports the status, and so does our SDK,
    which waits for the server's initial metadata before it writes.
    """

    async def refuse(_requests: object, context: grpc.aio.ServicerContext) -> None:
        await abort(context, Unauthenticated(message).status())

    return grpc.stream_stream_rpc_method_handler(refuse)


def bearer_token(metadata: Iterable[tuple[str, Any]] | None) -> str | None:
    """The token of the call's `authorization: Bearer <token>` metadata, if any."""
    for key, value in metadata or ():
        scheme, _, credentials = str(value).strip().partition(" ")
        if key.lower() == AUTHORIZATION and scheme.lower() == BEARER:
            return credentials.strip()
    return None


def matches_any(presented: str, tokens: Sequence[bytes]) -> bool:
    """Compared with every token, each in constant time: the time says nothing of which."""
    encoded = presented.encode()
    return sum(hmac.compare_digest(encoded, token) for token in tokens) > 0


class BearerTokenInterceptor(grpc.aio.ServerInterceptor):  # type: ignore[misc]
    """Refuses calls without `authorization: Bearer <token>` (UNAUTHENTICATED).

    `token` is the one token accepted, or several (a server's tenants each have their own).
    Calls to `exempt_services` (full service names) pass without a token.
    """

    def __init__(
        self, token: str | Sequence[str], exempt_services: Iterable[str] = DEFAULT_EXEMPT_SERVICES
    ) -> None:
        tokens = [token] if isinstance(token, str) else list(token)
        if not tokens or not all(tokens):
            raise ValueError("the bearer token must not be empty")
        self._tokens = [t.encode() for t in tokens]
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
        if len(values) != 1 or not matches_any(tokens[0], self._tokens):
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
        # Decided on the call's metadata alone: nothing from a stranger is read, let alone parsed.
        problem = self._check(handler_call_details.invocation_metadata)
        if problem is None:
            return await continuation(handler_call_details)
        log.warning("refused %s: %s", method, problem)
        return _refusal(problem)


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
