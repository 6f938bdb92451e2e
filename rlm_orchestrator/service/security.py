"""Transport security of the orchestrator's services: the same implementation as the agent's
(`sandbox_agent.auth`), so that both sides check tokens and set up TLS identically."""

from sandbox_agent.auth import (
    DEFAULT_EXEMPT_SERVICES,
    INVALID_TOKEN,
    MISSING_TOKEN,
    BearerTokenInterceptor,
    bearer_metadata,
    channel_credentials,
    server_credentials,
)

__all__ = [
    "DEFAULT_EXEMPT_SERVICES",
    "INVALID_TOKEN",
    "MISSING_TOKEN",
    "BearerTokenInterceptor",
    "bearer_metadata",
    "channel_credentials",
    "server_credentials",
]
