"""Sandbox backends behind one interface, chosen by name and imported lazily."""

from __future__ import annotations

from rlm_orchestrator.config.backends import (
    DockerConfig,
    FleetConfig,
    LocalConfig,
    ModalConfig,
    SandboxBackend,
)
from rlm_orchestrator.sandbox.agent_client import AgentClient
from rlm_orchestrator.sandbox.base import (
    Sandbox,
    SandboxProvider,
    SandboxSpec,
    SupportsReconcile,
    SupportsWarmUp,
)
from rlm_orchestrator.sandbox.execution_stream import ExecutionReport, SubCallOutcome

__all__ = [
    "AgentClient",
    "ExecutionReport",
    "Sandbox",
    "SandboxProvider",
    "SandboxSpec",
    "SubCallOutcome",
    "SupportsReconcile",
    "SupportsWarmUp",
    "create_provider",
]


def create_provider(config: SandboxBackend) -> SandboxProvider:
    """The provider for a backend's config (its module imported only now)."""
    if isinstance(config, LocalConfig):
        from rlm_orchestrator.sandbox.local import LocalProvider

        return LocalProvider(config)
    if isinstance(config, DockerConfig):
        from rlm_orchestrator.sandbox.docker import DockerProvider

        return DockerProvider(config)
    if isinstance(config, FleetConfig):
        from rlm_orchestrator.sandbox.fleet import FleetProvider

        return FleetProvider(config)
    if isinstance(config, ModalConfig):
        from rlm_orchestrator.sandbox.modal_provider import ModalProvider

        return ModalProvider(config)
    from rlm_orchestrator.sandbox.kubernetes import KubernetesProvider

    return KubernetesProvider(config)
