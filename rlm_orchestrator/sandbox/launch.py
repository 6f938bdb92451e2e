"""How the sandbox agent is launched: its command line, its token variable, its pinned wheels.

Defined once for every backend that starts agents (local, Docker, Modal, the Kubernetes pods)
and checked against the deploy files that start them by hand (the fleet's Deployment, the
sandbox image): tests/test_launch.py, test_kubernetes_manifests.py, test_deploy_compose.py.

- `AgentLaunch` renders the flags of `python -m sandbox_agent` (sandbox_agent/__main__.py
  defines their meaning; a flag left at None is not passed: the agent's default applies).
- `TOKEN_ENV` is the one variable that holds the agents' bearer token: in an agent's
  environment (it reads it and removes it before user code runs) and in the orchestrator's
  (the fleet and Kubernetes providers read the token they send from it).
- `agent_wheels()` are the agent's runtime dependencies, pinned: the `agent` extra of
  pyproject.toml, which deploy/build-sandbox-image.sh reads too.
- `dial()` reaches an agent launched with a token and TLS (fleet, Kubernetes, Modal).
"""

from __future__ import annotations

import functools
import importlib.metadata
import os
import re
from dataclasses import dataclass, replace
from pathlib import Path

from rlm_orchestrator.exceptions import SandboxError
from rlm_orchestrator.sandbox.agent_client import AgentClient
from rlm_orchestrator.sandbox.base import SandboxSpec
from sandbox_agent import TOKEN_ENV

__all__ = [
    "AGENT_MODULE",
    "CONTAINER_STATE_DIR",
    "CONTAINER_WORKDIR",
    "MOUNTED_TLS_CERT",
    "MOUNTED_TLS_KEY",
    "TLS_MOUNT",
    "TOKEN_ENV",
    "AgentLaunch",
    "agent_wheels",
    "dial",
    "token_environment",
    "token_from_environment",
]

AGENT_MODULE = "sandbox_agent"  # `python -m sandbox_agent`, the sandbox image's entrypoint
# The layout of an agent's container (Docker, the Kubernetes pods and fleet): /work is its
# only writable place (a tmpfs or an in-memory emptyDir).
CONTAINER_WORKDIR = "/work/code"
CONTAINER_STATE_DIR = "/work/.state"
# Where the Kubernetes pods and fleet mount the agent's certificate (Secret rlm-agent-tls).
TLS_MOUNT = "/tls"
MOUNTED_TLS_CERT = f"{TLS_MOUNT}/tls.crt"
MOUNTED_TLS_KEY = f"{TLS_MOUNT}/tls.key"
DISTRIBUTION = "rlm-orchestrator"
AGENT_EXTRA = "agent"


def _number(value: float) -> str:
    """30.0 -> "30" (as the deploy files write it), 0.5 -> "0.5"."""
    if isinstance(value, int) or value.is_integer():
        return str(int(value))
    return repr(value)


@dataclass(frozen=True, kw_only=True)
class AgentLaunch:
    """One agent's command line. Only what is set is passed."""

    listen: str  # unix:/path or HOST:PORT
    workdir: str | None = None
    state_dir: str | None = None
    # A session's default output cap (each Execute call carries its own cap and timeout).
    max_output_chars: int | None = None
    memory_limit_mb: int = 0  # 0: no address-space limit (the flag is not passed)
    # The worker's jail of namespaces (local sandboxes; a container needs none).
    isolation: str | None = None
    max_processes: int | None = None
    tmp_size_mb: int | None = None
    sandbox_uid: int | None = None
    # Who may reach it: its unix socket's mode, the token through a pipe, TLS.
    socket_mode: int | None = None
    token_fd: int | None = None
    tls_cert: str | None = None
    tls_key: str | None = None
    health_listen: str | None = None  # plaintext, grpc.health.v1 only (the kubelet's probe)
    # When it stops by itself: its orchestrator's process ends, or no Attach stream for long.
    parent_pid: int | None = None
    orphan_timeout_seconds: float | None = None
    # Fleet mode: leased by one session at a time.
    fleet: bool = False
    lease_ttl_seconds: float | None = None
    reflection: bool = False  # gRPC server reflection (debugging with grpcurl; ~12 MB)

    def __post_init__(self) -> None:
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ValueError("tls_cert and tls_key go together")

    def for_session(self, spec: SandboxSpec, default_memory_limit_mb: int = 0) -> AgentLaunch:
        """With a session's limits; its memory limit (0: none), else the backend's default."""
        return replace(
            self,
            max_output_chars=spec.max_output_chars,
            memory_limit_mb=spec.memory_limit_or(default_memory_limit_mb),
        )

    def args(self) -> list[str]:
        """The flags (for an image whose entrypoint is the agent)."""
        flags: list[tuple[str, str | None]] = [
            ("--lease-ttl", _optional(self.lease_ttl_seconds)),
            ("--listen", self.listen),
            ("--health-listen", self.health_listen),
            ("--workdir", self.workdir),
            ("--state-dir", self.state_dir),
            ("--tls-cert", self.tls_cert),
            ("--tls-key", self.tls_key),
            ("--max-output-chars", _optional(self.max_output_chars)),
            ("--memory-limit-mb", _optional(self.memory_limit_mb or None)),
            ("--isolation", self.isolation),
            ("--max-processes", _optional(self.max_processes)),
            ("--tmp-size-mb", _optional(self.tmp_size_mb)),
            ("--sandbox-uid", _optional(self.sandbox_uid)),
            ("--socket-mode", None if self.socket_mode is None else f"{self.socket_mode:o}"),
            ("--token-fd", _optional(self.token_fd)),
            ("--parent-pid", _optional(self.parent_pid)),
            ("--orphan-timeout", _optional(self.orphan_timeout_seconds)),
        ]
        rendered = ["--fleet"] if self.fleet else []
        rendered += ["--reflection"] if self.reflection else []
        for flag, value in flags:
            if value is not None:
                rendered += [flag, value]
        return rendered

    def argv(self, python: str = "python") -> list[str]:
        """The whole command: `python -m sandbox_agent` and the flags."""
        return [python, "-m", AGENT_MODULE, *self.args()]


def _optional(value: float | None) -> str | None:
    return None if value is None else _number(value)


def token_environment(token: str) -> dict[str, str]:
    """The agent's environment entry for its bearer token."""
    return {TOKEN_ENV: token}


def token_from_environment(token_env: str = TOKEN_ENV) -> str | None:
    """The agents' token as this orchestrator holds it (fleet, Kubernetes): never a sandbox's."""
    return os.environ.get(token_env) or None


def dial(
    address: str,
    *,
    token: str | None,
    tls: bool,
    ca_file: Path | None = None,
    server_name: str | None = None,
) -> AgentClient:
    """A client of an agent that requires `token` (None: send none) and, with `tls`, serves a
    certificate checked against `ca_file` (None: the system roots) under `server_name`."""
    from rlm_wire.auth import bearer_metadata, channel_credentials

    metadata = bearer_metadata(token) if token else ()
    if not tls:
        return AgentClient(address, metadata=metadata)
    return AgentClient(
        address,
        credentials=channel_credentials(ca_file),
        metadata=metadata,
        tls_server_name=server_name,
    )


@functools.cache
def agent_wheels() -> tuple[str, ...]:
    """The agent's pinned runtime dependencies (`name==version`), from the installed package's
    metadata: the `agent` extra of pyproject.toml."""
    try:
        requirements = importlib.metadata.requires(DISTRIBUTION) or []
    except importlib.metadata.PackageNotFoundError as exc:
        raise SandboxError(
            f"the agent's pinned wheels are read from the installed {DISTRIBUTION} package "
            "(its `agent` extra): install it (`pip install -e .` in a checkout)"
        ) from exc
    marker = re.compile(rf"""extra\s*==\s*["']{AGENT_EXTRA}["']""")
    wheels = tuple(
        requirement.split(";")[0].replace(" ", "")
        for requirement in requirements
        if ";" in requirement and marker.search(requirement.split(";", 1)[1])
    )
    if not wheels:
        raise SandboxError(f"the installed {DISTRIBUTION} has no `{AGENT_EXTRA}` extra")
    return wheels
