"""`rlm-orchestrator serve`: one grpc.aio server for the Orchestrator and LMRouter services.

Also on it: grpc.health.v1 (SERVING once the router is ready; NOT_SERVING while draining) and
server reflection. Shutdown (SIGTERM / SIGINT) stops accepting, lets running completions
finish within the grace period, ends the rest with a SERVER_SHUTDOWN failure that reaches their
clients before the server stops, cuts what is still open with UNAVAILABLE, and releases every
sandbox.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import ipaddress
import logging
import signal
from typing import Any

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from rlm_orchestrator import budget, lm_keys, telemetry
from rlm_orchestrator.config.backends import LocalConfig
from rlm_orchestrator.config.journal import open_store
from rlm_orchestrator.exceptions import ConfigurationError
from rlm_orchestrator.router import LMRouter
from rlm_orchestrator.sandbox import (
    SandboxProvider,
    SupportsReconcile,
    SupportsWarmUp,
    create_provider,
)
from rlm_orchestrator.sandbox.limits import SandboxPool
from rlm_orchestrator.service import durable_service
from rlm_orchestrator.service.durable import Durability
from rlm_orchestrator.service.listen import AddressInUseError, bind, check_port_free
from rlm_orchestrator.service.orchestrator_service import OrchestratorService
from rlm_orchestrator.service.router_service import add_router_service
from rlm_orchestrator.service.settings import ServerSettings
from rlm_orchestrator.service.tenants import Tenants
from rlm_orchestrator.service.viewer import viewer_server
from rlm_orchestrator.ui.app import ViewerServer
from rlm_wire.auth import BearerTokenInterceptor, server_credentials
from rlm_wire.decoding import InvalidMessageInterceptor
from rlm_wire.v1 import lm_router_pb2, orchestrator_pb2, orchestrator_pb2_grpc

log = logging.getLogger("rlm_orchestrator.service")

ORCHESTRATOR = orchestrator_pb2.DESCRIPTOR.services_by_name["Orchestrator"].full_name
LM_ROUTER = lm_router_pb2.DESCRIPTOR.services_by_name["LMRouter"].full_name
# 16 MiB messages: contexts travel in 1 MiB chunks, so only a misbehaving client gets near it.
MAX_MESSAGE_BYTES = 16 * 1024 * 1024
SESSION_REAP_INTERVAL = 30.0
SERVER_OPTIONS = [
    # gRPC sets SO_REUSEPORT by default: a second server on a port in use would bind it too and
    # take half the calls. Off, binding a used port fails ("address already in use").
    ("grpc.so_reuseport", 0),
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    # Completions stream for minutes with long silences: ping idle clients to notice dead
    # ones, and let clients ping us every 10 s without a GOAWAY (too_many_pings).
    ("grpc.keepalive_time_ms", 60_000),
    ("grpc.keepalive_timeout_ms", 20_000),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.min_ping_interval_without_data_ms", 10_000),
    ("grpc.http2.max_pings_without_data", 0),
]


def server_options(settings: ServerSettings) -> list[tuple[str, int]]:
    """SERVER_OPTIONS, and HTTP/2 flow control as the settings say (`http2_bdp_probe`)."""
    return [*SERVER_OPTIONS, ("grpc.http2.bdp_probe", int(settings.http2_bdp_probe))]


def build_router(settings: ServerSettings) -> LMRouter:
    if not settings.models:
        raise ConfigurationError("the server needs at least one model ([[models]] in its config)")
    configs = {m.name: m.client_config() for m in settings.models}
    root = configs[settings.root_model or settings.models[0].name]
    sub = configs[settings.sub_model] if settings.sub_model else root
    others = [sub] + [c for name, c in configs.items() if c is not sub]
    for config in configs.values():  # a model that cannot be called is refused at start
        if reason := lm_keys.missing_key(config):
            raise ConfigurationError(reason)
    return LMRouter(root, others)


UNISOLATED = (
    "local sandboxes would run tenants' code without isolation ({why}): it could read the "
    "server's environment (model keys, the auth token), its memory and its files. Enable "
    "unprivileged user namespaces (sysctl user.max_user_namespaces=10000, and "
    "kernel.unprivileged_userns_clone=1 on kernels that have it; a container's seccomp "
    'profile blocks them), or set environment = "docker", or accept the risk with '
    "allow_unisolated_sandboxes = true"
)


UNAUTHENTICATED = (
    "the server would listen on {listen} with no authentication: anyone who can reach it could "
    "run code and spend its model keys. Set auth_token (or RLM_SERVER_AUTH_TOKEN), or [tls] "
    "client_ca_file for client certificates, or listen on a loopback address, or accept the "
    "risk with allow_unauthenticated = true"
)


def _is_loopback(listen: str) -> bool:
    if listen.startswith("unix:"):
        return True  # the socket file's permissions decide who connects
    host = listen.rsplit(":", 1)[0].strip("[]")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # a host name: it may resolve to anything


def check_authentication(settings: ServerSettings) -> None:
    """Refuses a listener reachable from other machines that would authenticate nobody."""
    if settings.allow_unauthenticated or settings.auth_token is not None or settings.tenants:
        return
    if settings.tls is not None and settings.tls.client_ca_file is not None:
        return
    if not _is_loopback(settings.listen):
        raise ConfigurationError(UNAUTHENTICATED.format(listen=settings.listen))


async def _sandbox_provider(settings: ServerSettings) -> SandboxProvider:
    """The configured provider; `local` sandboxes must isolate their code unless the operator
    opted out (then every acquire that cannot isolate logs a warning)."""
    backend = settings.sandbox.backend
    if not isinstance(backend, LocalConfig):
        return create_provider(backend)
    from rlm_orchestrator.sandbox.local import ISOLATED, LocalProvider

    guarded = not settings.allow_unisolated_sandboxes
    if guarded:
        if backend.isolation == "off":
            raise ConfigurationError(UNISOLATED.format(why='environment_kwargs isolation = "off"'))
        # Every sandbox fails closed, not only the first.
        backend = backend.model_copy(update={"isolation": "required"})
    provider = LocalProvider(backend)
    isolation = await provider.check_isolation()
    if isolation != ISOLATED:
        if guarded:
            raise ConfigurationError(UNISOLATED.format(why=isolation))
        log.warning("local sandboxes are NOT isolated (%s): allowed by the settings", isolation)
    return provider


class OrchestratorServer:
    """The server and what it owns (router, sandbox provider, sessions), as one lifecycle."""

    def __init__(self, settings: ServerSettings) -> None:
        self.settings = settings
        self.port = 0
        self._server: grpc.aio.Server | None = None
        self._health = health.aio.HealthServicer()
        self._provider: SandboxProvider | None = None
        self._service: OrchestratorService | None = None
        self._reaper: asyncio.Task[None] | None = None
        self._leases: asyncio.Task[None] | None = None
        self._router: LMRouter | None = None
        self.viewer: ViewerServer | None = None

    async def start(self) -> int:
        telemetry.configure(metrics_listen=self.settings.metrics_listen)
        # Refusals first (no authentication beyond loopback, unisolated sandboxes): they come
        # before seconds of imports.
        check_authentication(self.settings)
        check_port_free(self.settings.listen)
        viewer = viewer_server(self.settings)  # its refusals before the slow start too
        self._provider = await _sandbox_provider(self.settings)
        router = self._router = build_router(self.settings)
        await router.prepare()
        # A budget its models cannot be held to: said once here, and to each request that has one.
        default_cost = self.settings.limit_default("max_cost")
        if reason := budget.unenforceable(default_cost, router.models.values()):
            log.warning("the requests' default %s", reason)
        if isinstance(self._provider, SupportsReconcile):
            # What a previous orchestrator on this machine left behind goes first.
            removed = await self._provider.reconcile()
            if removed:
                log.warning("removed %d orphaned sandbox(es) at start", removed)
        if isinstance(self._provider, SupportsWarmUp):
            await self._provider.warm_up()  # a no-op without a pool
        pool = SandboxPool(self._provider, self.settings.max_sandboxes)
        tenants = Tenants(self.settings)
        durability = await _durability(self.settings)
        self._service = OrchestratorService(self.settings, router, pool, tenants, durability)
        tokens = tenants.tokens()
        # The token check first, on metadata alone; undecodable messages (INVALID_ARGUMENT)
        # innermost, on the servicers' own handlers.
        interceptors: list[Any] = [BearerTokenInterceptor(tokens)] if tokens else []
        if telemetry.enabled():
            # RPC spans, and the caller's W3C trace context read from the call's metadata: a
            # completion's trace continues the client's.
            from opentelemetry.instrumentation.grpc import aio_server_interceptor

            interceptors.append(aio_server_interceptor())  # type: ignore[no-untyped-call]
        interceptors.append(InvalidMessageInterceptor())
        server = grpc.aio.server(interceptors=interceptors, options=server_options(self.settings))
        orchestrator_pb2_grpc.add_OrchestratorServicer_to_server(self._service, server)
        add_router_service(server, router)
        health_pb2_grpc.add_HealthServicer_to_server(self._health, server)
        reflection.enable_server_reflection(
            (ORCHESTRATOR, LM_ROUTER, health.SERVICE_NAME, reflection.SERVICE_NAME), server
        )
        tls = self.settings.tls
        if tls is not None:
            credentials = server_credentials(tls.cert_file, tls.key_file, tls.client_ca_file)
            self.port = bind(server, self.settings.listen, credentials)
        else:
            self.port = bind(server, self.settings.listen)
        await server.start()
        self._server = server
        if viewer is not None:
            try:
                await viewer.start()
            except OSError as exc:
                raise AddressInUseError(viewer.listen, exc.strerror or str(exc)) from None
            self.viewer = viewer
        for name in ("", ORCHESTRATOR, LM_ROUTER):
            await self._health.set(name, health_pb2.HealthCheckResponse.SERVING)
        self._reaper = asyncio.create_task(self._reap_sessions())
        if durability is not None:
            service = self._service

            async def resume(*taken: Any) -> None:
                await durable_service.resume(service, *taken)

            # Renewing its leases, and taking over what dead servers left, from now on.
            self._leases = asyncio.create_task(durability.keep_leases(resume))
        return self.port

    async def _reap_sessions(self) -> None:
        assert self._service is not None
        while True:
            await asyncio.sleep(SESSION_REAP_INTERVAL)
            try:
                await self._service.reap_idle_sessions()
            except Exception:  # a failed release must not stop later reaping
                log.exception("reaping idle sessions failed")

    async def stop(self) -> None:
        """Graceful and idempotent: drain, cancel what is left, release every sandbox."""
        if self._service is not None:
            self._service.accepting = False  # before health says NOT_SERVING: no new work
        if self._reaper is not None:
            self._reaper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._reaper
            self._reaper = None
        if self.viewer is not None:
            await self.viewer.stop()
            self.viewer = None
        await self._health.enter_graceful_shutdown()
        if self._leases is not None:
            self._leases.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._leases
            self._leases = None
        if self._service is not None:
            await self._service.drain(self.settings.shutdown_grace_seconds)
            if self._service.durability is not None:
                await self._service.durability.aclose()
                self._service.durability = None
        if self._server is not None:
            await self._server.stop(1.0)
            self._server = None
        if self._provider is not None:
            await self._provider.aclose()
            self._provider = None
        if self._router is not None:
            await self._router.finish_callbacks()  # its HTTP connections
            self._router = None


async def _durability(settings: ServerSettings) -> Durability | None:
    """The journal, opened, and what its retention drops at start."""
    if settings.journal is None:
        return None
    store = await open_store(settings.journal)
    journal = settings.journal
    pruned = await store.prune(max_age_seconds=journal.max_age_seconds, max_bytes=journal.max_bytes)
    if pruned:
        log.info("journal: %d ended completion(s) past retention deleted", pruned)
    return Durability(journal, store)


async def serve(settings: ServerSettings) -> None:
    """Run until SIGTERM or SIGINT."""
    server = OrchestratorServer(settings)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    try:
        port = await server.start()
        # What start imported and built lives as long as the process: out of the cyclic
        # GC's full collections, which otherwise walk it all every few thousand LM calls
        # (with litellm loaded, ~400k objects: ~250 ms of CPU each time).
        gc.collect()
        gc.freeze()
        host = settings.listen.rsplit(":", 1)[0]
        print(f"LISTENING {host}:{port}", flush=True)
        if server.viewer is not None:
            print(f"VIEWER {server.viewer.url}", flush=True)
        await stop.wait()
        log.warning(
            "shutting down: %d completion(s) running",
            len(server._service.running) if server._service else 0,
        )
    finally:
        await server.stop()
