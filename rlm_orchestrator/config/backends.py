"""One configuration per sandbox backend, told apart by `type` (environment_kwargs' own keys).

Each is strict: an unknown key or a value out of range is refused where it is given
(`RLM(...)`, `run`'s settings, the server's config), not when a sandbox starts. The limits
every backend shares (exec_timeout_seconds, ...) are `SandboxLimits` (limits.py). Defined here,
not in the providers' modules, so that validating a configuration imports no provider (nor
docker, modal or lightkube).
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from sandbox_agent import TOKEN_ENV
from sandbox_agent.limits import DEFAULT_MAX_PROCESSES, DEFAULT_TMP_SIZE_MB, NOBODY_UID

# memory_limit_mb of a local sandbox that sets none: its worker's address space (RLIMIT_AS).
LOCAL_MEMORY_LIMIT_MB = 2048

Port = Annotated[int, Field(gt=0, lt=65536)]


class _Backend(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class LocalConfig(_Backend):
    """An agent process per sandbox on this machine, its worker in a jail of namespaces."""

    type: Literal["local"] = "local"
    python: str = sys.executable
    temp_dir: str | None = None
    # "auto": jail the worker where the kernel allows it, and warn on every acquire where it
    # does not; "required": SandboxError where it does not; "off": never (trusted code only).
    isolation: Literal["auto", "required", "off"] = "auto"
    # Processes and threads of one sandbox, all included (RLIMIT_NPROC of its user namespace).
    max_processes: int = Field(default=DEFAULT_MAX_PROCESSES, ge=8)
    # The jail's /tmp (a tmpfs: it counts as memory).
    tmp_size_mb: int = Field(default=DEFAULT_TMP_SIZE_MB, ge=1)
    # Who user code is outside the jail when the orchestrator runs as root (nobody).
    sandbox_uid: int = Field(default=NOBODY_UID, ge=1)
    # "fork": agents and workers are forked from a template that has imported them (a few
    # ms per sandbox); "spawn": a fresh `python -m sandbox_agent` per sandbox (~200 ms).
    start_method: Literal["fork", "spawn"] = "fork"
    # Sandboxes kept started and idle (each ~10 MB), so that acquiring one takes no start.
    warm_pool_size: int = Field(default=0, ge=0)
    warm_max_idle_seconds: float = Field(default=300.0, gt=0)


class DockerConfig(_Backend):
    """A locked-down container per sandbox on this machine's Docker engine."""

    type: Literal["docker"] = "docker"
    image: str = "rlm-sandbox:latest"
    memory_mb: int = Field(default=512, ge=64)
    cpus: float = Field(default=1.0, gt=0)
    pids_limit: int = Field(default=128, ge=8)
    work_tmpfs_mb: int = Field(default=256, ge=16)
    max_concurrent_starts: int = Field(default=4, ge=1)
    # Containers kept started and idle, so that acquiring one does not pay the start.
    warm_pool_size: int = Field(default=0, ge=0)
    warm_max_idle_seconds: float = Field(default=300.0, gt=0)
    # A container older than this is removed by any orchestrator's reconcile pass.
    container_ttl_seconds: float = Field(default=6 * 3600.0, gt=0)
    reconcile_interval_seconds: float = Field(default=60.0, gt=0)
    # The agent stops by itself (and its container with it) once this orchestrator has been
    # gone for this long; 0 = only reconcile passes remove orphans.
    orphan_timeout_seconds: float = Field(default=60.0, ge=0)


class ModalConfig(_Backend):
    """A Modal Sandbox per sandbox, its agent dialled through a tunnel."""

    type: Literal["modal"] = "modal"
    app_name: str = "rlm-sandboxes"
    port: Port = 50051
    tunnel_mode: Literal["h2", "tcp"] = "h2"
    timeout_seconds: int = Field(default=3600, ge=10)
    # An open tunnel connection keeps a sandbox alive: an orphan is reaped after this.
    idle_timeout_seconds: int = Field(default=300, ge=10)
    # Sooner than that, our agent stops by itself once this orchestrator's Attach stream has
    # been gone this long (0 = rely on idle_timeout_seconds alone).
    orphan_timeout_seconds: float = Field(default=60.0, ge=0)
    cpu: float = Field(default=1.0, gt=0)
    memory_mb: int = Field(default=1024, ge=128)
    region: str | None = None
    max_concurrent_creates: int = Field(default=4, ge=1)
    creates_per_second: float = Field(default=4.0, gt=0)
    create_attempts: int = Field(default=5, ge=1)
    # Bound on each control-plane call (Modal's client would otherwise retry for a minute).
    control_timeout_seconds: float = Field(default=20.0, gt=0)
    # CA for the tunnel's TLS (default: the system roots); tests use their own CA.
    tls_ca_file: Path | None = None


class FleetConfig(_Backend):
    """Long-running agents, leased one session at a time."""

    type: Literal["fleet"] = "fleet"
    # host:port of each agent, and/or a DNS name:port resolving to all of them.
    agents: list[str] = Field(default_factory=list)
    dns: str | None = None
    tls_ca_file: Path | None = None
    # The name the agents' certificate carries (they are dialled by address).
    tls_server_name: str | None = None
    insecure: bool = False  # plaintext: for a private network of your own only
    token_env: str = TOKEN_ENV  # the agents' token (the same variable the agents read)
    lease_ttl_seconds: float = Field(default=30.0, gt=1)
    unhealthy_seconds: float = Field(default=15.0, ge=0)
    connect_timeout_seconds: float = Field(default=3.0, gt=0)


class PodConfig(_Backend):
    """What the Kubernetes backend's sandbox pods look like."""

    image: str = "rlm-sandbox:latest"
    image_pull_policy: Literal["Always", "IfNotPresent", "Never"] = "IfNotPresent"
    # E.g. "gvisor" (deploy/kubernetes/overlays/gvisor); None: the cluster's default runtime.
    runtime_class: str | None = None
    service_account: str = "rlm-agent"
    port: Port = 50051
    health_port: Port = 50052
    cpu_request: str = "250m"
    cpu_limit: str = "1"
    memory_request: str = "256Mi"
    memory_limit: str = "1Gi"
    work_size_limit: str = "256Mi"
    # No pod outlives this, whatever happens to its orchestrator.
    active_deadline_seconds: int = Field(default=6 * 3600, ge=60)
    # Secrets the kubelet mounts (the orchestrator never reads or creates Secrets).
    tls_secret: str | None = "rlm-agent-tls"
    token_secret: str | None = "rlm-agent-token"
    token_secret_key: str = "token"
    node_selector: dict[str, str] = Field(default_factory=dict)
    tolerations: list[dict[str, Any]] = Field(default_factory=list)


class KubernetesConfig(PodConfig):
    """A sandbox pod per session, through the Kubernetes API, with a shared warm pool."""

    type: Literal["kubernetes"] = "kubernetes"
    namespace: str = "rlm-sandboxes"
    # None: the pod's service account in the cluster, else KUBECONFIG or ~/.kube/config.
    kubeconfig: Path | None = None
    context: str | None = None
    # Idle pods kept ready in the namespace (for this pod template), shared by orchestrators.
    pool_size: int = Field(default=0, ge=0)
    # An idle pod older than this is replaced (its activeDeadlineSeconds is ticking).
    pool_max_idle_seconds: float = Field(default=1800.0, gt=0)
    pool_check_seconds: float = Field(default=10.0, gt=0)
    lease_duration_seconds: int = Field(default=45, ge=5)
    # Added to a Lease's duration before another orchestrator may deem it expired (clock skew).
    sweep_grace_seconds: float = Field(default=30.0, ge=0)
    tls_ca_file: Path | None = None
    # The name the agents' certificate carries (they are dialled by pod IP).
    tls_server_name: str | None = "rlm-agent.rlm-sandboxes.svc"
    token_env: str = TOKEN_ENV  # the agents' token (the same variable the agents read)


# "The sandbox backend config": one of the above, chosen by `type` (the `environment` name).
SandboxBackend = Annotated[
    LocalConfig | DockerConfig | ModalConfig | FleetConfig | KubernetesConfig,
    Field(discriminator="type"),
]
BackendName = Literal["local", "docker", "modal", "fleet", "kubernetes"]
BACKENDS: dict[str, type[_Backend]] = {
    "local": LocalConfig,
    "docker": DockerConfig,
    "modal": ModalConfig,
    "fleet": FleetConfig,
    "kubernetes": KubernetesConfig,
}
