"""Where the SDK turns gRPC statuses into exceptions, and answers in parts into one."""

from __future__ import annotations

import grpc

from rlm_orchestrator.convert.events import SHUTDOWN_METADATA_KEY
from rlm_orchestrator.exceptions import (
    AuthenticationError,
    ClientError,
    InvalidRequestError,
    NotFoundError,
    ResourceExhaustedError,
    ServerShutdownError,
    ServerUnavailableError,
)

# The statuses each ClientError subclass stands for (`codes`): the same the server's
# handlers raise them with.
_CODE_ERRORS: dict[str, type[ClientError]] = {
    code: error
    for error in (
        AuthenticationError,
        InvalidRequestError,
        NotFoundError,
        ResourceExhaustedError,
        ServerUnavailableError,
    )
    for code in error.codes
}


def rpc_error(exc: grpc.aio.AioRpcError) -> ClientError:
    """The one place where a gRPC status becomes one of our exceptions."""
    message = f"{exc.code().name}: {exc.details()}"
    trailing = exc.trailing_metadata() or ()
    if exc.code() == grpc.StatusCode.UNAVAILABLE and any(
        key == SHUTDOWN_METADATA_KEY for key, _ in trailing
    ):
        return ServerShutdownError(message)
    error_type = _CODE_ERRORS.get(exc.code().name, ClientError)
    return error_type(message, code=exc.code().name)


def joined(parts: list[str], expected_chars: int | None) -> str:
    """An answer sent in parts, whole again (ClientError when some went missing)."""
    text = "".join(parts)
    parts.clear()
    if expected_chars is not None and len(text) != expected_chars:
        raise ClientError(
            f"the answer arrived incomplete: {len(text)} of {expected_chars} characters",
            code="DATA_LOSS",
        )
    return text
