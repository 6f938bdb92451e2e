"""Sandbox backends behind one interface, chosen by name and imported lazily."""

from __future__ import annotations

from typing import Any

from rlm_orchestrator.exceptions import ConfigurationError
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


def create_provider(environment: str, options: dict[str, Any] | None = None) -> SandboxProvider:
    """The provider for `environment`, configured from its part of environment_kwargs."""
    options = options or {}
    if environment == "local":
        from rlm_orchestrator.sandbox.local import LocalProvider

        return LocalProvider.from_options(options)
    if environment == "docker":
        from rlm_orchestrator.sandbox.docker import DockerProvider

        return DockerProvider.from_options(options)
    if environment == "fleet":
        from rlm_orchestrator.sandbox.fleet import FleetProvider

        return FleetProvider.from_options(options)
    if environment == "modal":
        from rlm_orchestrator.sandbox.modal_provider import ModalProvider

        return ModalProvider.from_options(options)
    if environment == "kubernetes":
        from rlm_orchestrator.sandbox.kubernetes import KubernetesProvider

        return KubernetesProvider.from_options(options)
    raise ConfigurationError(
        f"unknown environment {environment!r}; available: 'local', 'docker', 'modal', 'fleet', "
        "'kubernetes'"
    )
