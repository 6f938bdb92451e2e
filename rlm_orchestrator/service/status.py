"""Where the orchestrator server's exceptions become gRPC statuses.

The Orchestrator and LMRouter handlers refuse a call by raising an RLMError, most often the
ClientError subclass the SDK will raise for it, with the status it stands for
(`NotFoundError`, `ResourceExhaustedError`, `ServerShutdownError`).
`@maps_rlm_errors` on each servicer (the agent's decorator, `rlm_wire/status.py`, given
this mapping) ends the call with the error's `code` and its message as the details; a
ServerShutdownError adds the trailing metadata by which the SDK tells a shutdown from another
UNAVAILABLE. Anything else (a bug) is left to gRPC: UNKNOWN.
"""

from __future__ import annotations

import grpc

from rlm_orchestrator.convert.events import SHUTDOWN_METADATA_KEY
from rlm_orchestrator.exceptions import RLMError, ServerShutdownError
from rlm_wire.status import Status, maps_errors

SHUTDOWN_METADATA = ((SHUTDOWN_METADATA_KEY, "1"),)


def rlm_status(exc: BaseException) -> Status | None:
    """The status an RLMError ends its call with; None for anything else."""
    if not isinstance(exc, RLMError):
        return None
    code = grpc.StatusCode.__members__.get(exc.code, grpc.StatusCode.UNKNOWN)
    metadata = SHUTDOWN_METADATA if isinstance(exc, ServerShutdownError) else ()
    return Status(code, str(exc), metadata)


maps_rlm_errors = maps_errors(rlm_status)
