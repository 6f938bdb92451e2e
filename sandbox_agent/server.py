"""The agent's gRPC server: the Sandbox service, health, reflection, keepalive, shutdown."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from rlm_wire.auth import BearerTokenInterceptor, server_credentials
from rlm_wire.decoding import InvalidMessageInterceptor
from rlm_wire.v1 import sandbox_pb2, sandbox_pb2_grpc
from sandbox_agent.executor import Executor, ExecutorConfig
from sandbox_agent.lease import LeaseKeeper
from sandbox_agent.orphan import OrphanWatch
from sandbox_agent.service import SandboxService

log = logging.getLogger("sandbox_agent")

SERVICE_NAME = sandbox_pb2.DESCRIPTOR.services_by_name["Sandbox"].full_name
MAX_MESSAGE_BYTES = 64 * 1024 * 1024


# The orchestrator pings every 20 s on long executions; allow it (and no more often than 10 s),
# or the server answers GOAWAY too_many_pings and the stream dies.
class ListenError(OSError):
    """The agent's address cannot be bound (in use: no SO_REUSEPORT, see SERVER_OPTIONS)."""


SERVER_OPTIONS = [
    # No SO_REUSEPORT (gRPC's default): a port in use is refused, not shared with its owner.
    ("grpc.so_reuseport", 0),
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    ("grpc.keepalive_time_ms", 30_000),
    ("grpc.keepalive_timeout_ms", 10_000),
    ("grpc.http2.min_ping_interval_without_data_ms", 10_000),
    ("grpc.http2.max_pings_without_data", 0),
    ("grpc.keepalive_permit_without_calls", 1),
]


@dataclass
class AgentConfig:
    listen: str  # "unix:/path/agent.sock" or "host:port"
    executor: ExecutorConfig
    shutdown_grace_seconds: float = 5.0
    # Required as `authorization: Bearer <token>` on every call but health checks, when set:
    # an agent reachable from a network (a Modal tunnel, a fleet) must not serve strangers.
    token: str | None = None
    # TLS certificate chain and key (PEM files), for TCP listeners.
    tls_cert: Path | None = None
    tls_key: Path | None = None
    # Server reflection costs ~12 MB of RSS per agent (measured): opt-in, for debugging with
    # grpcurl. The orchestrator, the agent's only client, does not need it.
    reflection: bool = False
    # Fleet mode: leased by one session at a time, reset between sessions.
    fleet: bool = False
    lease_ttl_seconds: float = 60.0
    # A second, plaintext listener serving grpc.health.v1 only: what the kubelet's built-in
    # `grpc:` probe can dial (it speaks no TLS), while the Sandbox service stays TLS-only.
    health_listen: str | None = None
    # Stop by itself once no orchestrator has held an Attach stream for this long (0 = never):
    # an orphaned container or remote sandbox does not run unsupervised.
    orphan_timeout_seconds: float = 0.0
    # Permissions of a unix socket: 0o666 when the directory is what keeps others out (a
    # container's agent runs as nobody, its orchestrator as another user); 0o600 when the
    # agent runs as the orchestrator's own user (local sandboxes).
    socket_mode: int = 0o666


class Agent:
    """An executor behind a grpc.aio server, started and stopped as one."""

    def __init__(self, config: AgentConfig, on_orphaned: Callable[[], None] = lambda: None) -> None:
        self.config = config
        self.orphans = OrphanWatch(config.orphan_timeout_seconds, on_orphaned)
        self.executor = Executor(config.executor)
        interceptors = [BearerTokenInterceptor(config.token)] if config.token else []
        interceptors.append(InvalidMessageInterceptor())  # after the token check: INVALID_ARGUMENT
        self.server = grpc.aio.server(interceptors=interceptors, options=SERVER_OPTIONS)
        self.health = health.aio.HealthServicer()
        self.health_server: grpc.aio.Server | None = None
        self.port = 0
        self.leases = LeaseKeeper(self.executor, config.lease_ttl_seconds) if config.fleet else None
        self.service: SandboxService | None = None

    async def start(self) -> None:
        self.service = service = SandboxService(self.executor, self.leases, self.orphans)
        sandbox_pb2_grpc.add_SandboxServicer_to_server(service, self.server)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        if self.config.reflection:
            from grpc_reflection.v1alpha import reflection

            reflection.enable_server_reflection(
                (SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME), self.server
            )
        try:
            if self.config.tls_cert and self.config.tls_key:
                credentials = server_credentials(self.config.tls_cert, self.config.tls_key)
                self.port = self.server.add_secure_port(self.config.listen, credentials)
            else:
                self.port = self.server.add_insecure_port(self.config.listen)
        except RuntimeError:  # grpc: "Failed to bind to address ..."
            raise ListenError(
                f"could not listen on {self.config.listen}: address in use, or not this host's"
            ) from None
        if self.port == 0 and not self.config.listen.startswith("unix:"):
            raise ListenError(f"could not listen on {self.config.listen}: address already in use")
        if self.config.health_listen:
            # No interceptor: health carries no secrets, and the kubelet sends no token.
            self.health_server = grpc.aio.server(options=SERVER_OPTIONS)
            health_pb2_grpc.add_HealthServicer_to_server(self.health, self.health_server)
            if self.health_server.add_insecure_port(self.config.health_listen) == 0:
                raise OSError(f"could not listen on {self.config.health_listen}")
        # The worker starts (another process) while the server does; it is up before the server
        # reports SERVING: ready means ready to run code.
        worker = asyncio.create_task(self.executor.start(), name="worker-start")
        try:
            await self.server.start()
        finally:
            await worker
        if self.leases is not None:
            self.leases.start()
        self.orphans.start()
        if self.health_server is not None:
            await self.health_server.start()
        if self.config.listen.startswith("unix:"):
            os.chmod(self.config.listen.removeprefix("unix:"), self.config.socket_mode)
        for name in ("", SERVICE_NAME):
            await self.health.set(name, health_pb2.HealthCheckResponse.SERVING)

    async def stop(self) -> None:
        await self.orphans.stop()
        await self.health.enter_graceful_shutdown()
        if self.leases is not None:
            await self.leases.stop()
        if self.health_server is not None:
            await self.health_server.stop(0)
        if self.service is not None:
            self.service.end_idle_streams()  # a kept-open Execute stream has nothing to finish
        await self.server.stop(self.config.shutdown_grace_seconds)
        await self.executor.close()


async def run_until_signalled(config: AgentConfig) -> None:
    stop = asyncio.Event()
    agent = Agent(config, on_orphaned=stop.set)
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    try:
        await agent.start()
        address = config.listen if config.listen.startswith("unix:") else f"port {agent.port}"
        # Then what a local provider would otherwise ask at once (GetInfo): one call less.
        executor = agent.executor
        print(
            f"LISTENING {address}\nWORKER pid={executor.worker_pid} isolation={executor.isolation}",
            flush=True,
        )
        await stop.wait()
    finally:
        await agent.stop()
