"""What a sandbox backend is: something that hands out agents and takes them back.

A provider either creates a sandbox per session (local process, Docker container, Modal
sandbox) or leases one from a running fleet; both fit `acquire` / `release`. Whatever the
backend, what comes back speaks the same gRPC protocol to the same agent.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

from rlm_orchestrator.config.limits import SandboxLimits
from rlm_orchestrator.sandbox.agent_client import AgentClient


class SandboxSpec(SandboxLimits):
    """What the orchestrator needs from one sandbox: its session, and its limits (defined,
    with their defaults and bounds, by SandboxLimits)."""

    session_id: str

    @classmethod
    def of(cls, session_id: str, limits: SandboxLimits) -> SandboxSpec:
        return cls(session_id=session_id, **limits.model_dump())


@dataclass
class Sandbox:
    """An acquired sandbox: a client connected to its agent, plus the provider's own state."""

    sandbox_id: str
    client: AgentClient
    spec: SandboxSpec
    provider_state: Any = field(default=None, repr=False)


@runtime_checkable
class SupportsReconcile(Protocol):
    """A provider that can find and remove what dead orchestrators left behind."""

    async def reconcile(self) -> int:
        """Remove orphaned sandboxes; returns how many."""
        ...


@runtime_checkable
class SupportsWarmUp(Protocol):
    """A provider with a warm pool, which a long-lived server fills when it starts."""

    async def warm_up(self) -> None: ...


@runtime_checkable
class SandboxProvider(Protocol):
    """A sandbox backend. Implementations must make `release` idempotent and leak-free."""

    name: str

    async def acquire(self, spec: SandboxSpec) -> Sandbox:
        """A ready sandbox (its agent answers health checks), or SandboxError."""
        ...

    async def release(self, sandbox: Sandbox) -> None:
        """Give the sandbox back: stop it, or return it to its fleet. Never raises."""
        ...

    async def aclose(self) -> None:
        """Release everything this provider still holds."""
        ...
