"""Who is calling: the tenant a call's bearer token belongs to.

Each tenant has a token of its own (`[[tenants]]` in the server's settings; `auth_token` is the
tenant "default"). The token interceptor has already refused calls whose token is nobody's;
the servicer then scopes what a call may see and touch to its tenant's own completions and
sessions (someone else's is NOT_FOUND, as if it did not exist), and admission counts each
tenant's share of the capacity. Without any token configured, every caller is one tenant,
"anonymous" (the server only listens on loopback then, unless told otherwise).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from rlm_orchestrator.service.settings import ServerSettings
from rlm_wire.auth import bearer_token, matches_any


@dataclass(frozen=True)
class Tenant:
    name: str
    # Its share of the server's capacity (None: up to the server's own limit).
    max_concurrent_completions: int | None = None
    max_sessions: int | None = None


ANONYMOUS = Tenant("anonymous")


class Tenants:
    """The server's tenants, by token."""

    def __init__(self, settings: ServerSettings) -> None:
        self._by_token: list[tuple[bytes, Tenant]] = []
        if settings.auth_token is not None:
            self._by_token.append(
                (settings.auth_token.get_secret_value().encode(), Tenant("default"))
            )
        for tenant in settings.tenants:
            entry = Tenant(tenant.name, tenant.max_concurrent_completions, tenant.max_sessions)
            self._by_token.append((tenant.token_value().encode(), entry))
        tokens = [token for token, _ in self._by_token]
        if len(set(tokens)) != len(tokens):
            raise ValueError("two tenants have the same token: each needs its own")

    def tokens(self) -> list[str]:
        """Every token the server accepts (empty: no authentication)."""
        return [token.decode() for token, _ in self._by_token]

    def identify(self, metadata: Iterable[tuple[str, Any]] | None) -> Tenant:
        if not self._by_token:
            return ANONYMOUS
        presented = bearer_token(metadata) or ""
        for token, tenant in self._by_token:
            if matches_any(presented, [token]):
                return tenant
        # Unreachable behind the token interceptor; refuse rather than guess.
        raise PermissionError("the call's token belongs to no tenant")
