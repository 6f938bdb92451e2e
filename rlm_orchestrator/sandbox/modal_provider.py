"""Modal sandboxes: one Modal Sandbox per session running our agent, dialled through a tunnel.

The sandbox has no egress (`outbound_cidr_allowlist=[]`); its agent listens on a port Modal
exposes through an HTTP/2 TLS tunnel (`h2_ports`: gRPC needs h2 ALPN) or, with
`tunnel_mode="tcp"`, a plain TCP one. The tunnel is public, so every sandbox gets a random
bearer token (a Modal secret the agent reads and removes from its environment) that every call
must carry. Creates are capped and paced, and retried when Modal throttles them. `modal` is
imported on first use; calls to its control plane are bounded in time, so an unreachable
Modal fails fast with the fix instead of hanging. Refused credentials, a refused create and an
agent that exits at start each fail with a SandboxError that says which.
"""

from __future__ import annotations

import asyncio
import contextlib
import secrets
import time
from pathlib import Path
from typing import Any

import rlm_wire
from rlm_orchestrator import telemetry
from rlm_orchestrator.config.backends import ModalConfig
from rlm_orchestrator.exceptions import SandboxError
from rlm_orchestrator.sandbox.agent_client import AgentClient
from rlm_orchestrator.sandbox.base import Sandbox, SandboxSpec
from rlm_orchestrator.sandbox.launch import (
    AGENT_MODULE,
    AgentLaunch,
    agent_wheels,
    dial,
    token_environment,
)
from rlm_orchestrator.sandbox.owner import orchestrator_id, owner_gone

UNREACHABLE_HELP = (
    "check MODAL_TOKEN_ID / MODAL_TOKEN_SECRET (`modal token new`), MODAL_SERVER_URL and the "
    "network; `environment='local'` or `'docker'` need no Modal account"
)


def _not_for_the_agent(path: Path) -> bool:
    """Modal's filter of rlm_wire's files (`path` relative to the package): all but the agent's."""
    return path.as_posix() not in rlm_wire.AGENT_FILES


class ModalProvider:
    """Creates a Modal Sandbox per session and dials its agent through the tunnel."""

    name = "modal"

    def __init__(self, options: ModalConfig | None = None) -> None:
        self.options = options or ModalConfig()
        self.orchestrator_id = orchestrator_id()
        self._app: Any = None
        self._client: Any = None
        self._creates = asyncio.Semaphore(self.options.max_concurrent_creates)
        self._next_create = 0.0
        self._live: dict[str, Any] = {}

    async def _control(self, what: str, call: Any) -> Any:
        """One control-plane call, bounded in time, failing with what to fix."""
        try:
            async with asyncio.timeout(self.options.control_timeout_seconds):
                return await call
        except TimeoutError as exc:
            raise SandboxError(
                f"Modal did not answer ({what}) within {self.options.control_timeout_seconds:g}s: "
                f"{UNREACHABLE_HELP}"
            ) from exc

    async def _get_app(self) -> Any:
        if self._app is None:
            import modal

            try:
                # Modal's client, with the credentials of Modal's config: MODAL_TOKEN_ID and
                # MODAL_TOKEN_SECRET, else the active profile of ~/.modal.toml.
                client = await self._control("connecting", modal.Client.from_env.aio())
                lookup = modal.App.lookup.aio(
                    self.options.app_name, client=client, create_if_missing=True
                )
                self._app = await self._control("App.lookup", lookup)
            except SandboxError:
                raise
            except modal.exception.AuthError as exc:
                why = str(exc).rstrip(".")
                raise SandboxError(
                    f"Modal refused the credentials: {why}; check MODAL_TOKEN_ID / "
                    "MODAL_TOKEN_SECRET (`modal token new` makes a new token)"
                ) from exc
            except Exception as exc:
                raise SandboxError(
                    f"Modal refused the app lookup: {exc}; {UNREACHABLE_HELP}"
                ) from exc
            self._client = client
            await self.sweep_orphans()
        return self._app

    def image(self) -> Any:
        """A slim Debian with the agent's pinned wheels, our agent's source and, of the wire,
        only the files the agent imports (rlm_wire.AGENT_FILES)."""
        import modal

        return (
            modal.Image.debian_slim(python_version="3.11")
            .pip_install(*agent_wheels())
            .add_local_python_source(AGENT_MODULE)
            .add_local_python_source("rlm_wire", ignore=_not_for_the_agent)
        )

    def create_kwargs(self, spec: SandboxSpec, token: str) -> dict[str, Any]:
        """What we ask Modal for (tested: h2 tunnel, no egress, timeouts, tags, probe)."""
        import modal

        o = self.options
        ports: dict[str, list[int]] = (
            {"h2_ports": [o.port]} if o.tunnel_mode == "h2" else {"unencrypted_ports": [o.port]}
        )
        secret: dict[str, str | None] = {**token_environment(token)}
        return {
            "image": self.image(),
            "secrets": [modal.Secret.from_dict(secret)],
            "timeout": o.timeout_seconds,
            "idle_timeout": o.idle_timeout_seconds,
            "cpu": o.cpu,
            "memory": o.memory_mb,
            "region": o.region,
            "outbound_cidr_allowlist": [],
            "readiness_probe": modal.Probe.with_tcp(o.port),
            "tags": {"rlm.orchestrator": self.orchestrator_id, "rlm.session": spec.session_id},
            **ports,
        }

    def command(self, spec: SandboxSpec) -> list[str]:
        # Modal's root file system is writable: no /work mount, the agent's dirs go in /tmp.
        launch = AgentLaunch(
            listen=f"0.0.0.0:{self.options.port}",
            workdir="/tmp/rlm/work",
            state_dir="/tmp/rlm/state",
            orphan_timeout_seconds=self.options.orphan_timeout_seconds,
        )
        return launch.for_session(spec).argv("python")

    async def _create(self, spec: SandboxSpec, token: str) -> Any:
        import modal
        from modal.exception import ResourceExhaustedError

        app = await self._get_app()
        attempts, delay = self.options.create_attempts, 0.5
        for attempt in range(attempts):
            if attempt:  # throttled: wait longer each time
                await asyncio.sleep(delay)
                delay = min(delay * 2, 8.0)
            async with self._creates:
                # Pace creates: Modal rate-limits them (about 4/s by default).
                wait = self._next_create - time.monotonic()
                self._next_create = (
                    max(self._next_create, time.monotonic()) + 1 / self.options.creates_per_second
                )
                if wait > 0:
                    await asyncio.sleep(wait)
                try:
                    create = modal.Sandbox.create.aio(
                        *self.command(spec),
                        app=app,
                        client=self._client,
                        **self.create_kwargs(spec, token),
                    )
                    return await self._control("Sandbox.create", create)
                except ResourceExhaustedError:
                    continue
                except modal.exception.Error as exc:
                    raise SandboxError(f"Modal refused to create the sandbox: {exc}") from exc
        raise SandboxError(f"Modal throttled {attempts} sandbox creates in a row")

    async def acquire(self, spec: SandboxSpec) -> Sandbox:
        token = secrets.token_urlsafe(32)
        with telemetry.tracer().start_as_current_span("modal.sandbox.create"):
            sandbox = await self._create(spec, token)
        client: AgentClient | None = None
        try:
            tunnels = await self._control("Sandbox.tunnels", sandbox.tunnels.aio())
            tunnel = tunnels[self.options.port]
            client = self._agent_client(tunnel, token)
            await self._wait_ready(sandbox, client, spec.startup_timeout_seconds)
            await client.attach(self.orchestrator_id)
        except BaseException:
            if client is not None:
                await client.close()
            with contextlib.suppress(Exception):
                await self._control("Sandbox.terminate", sandbox.terminate.aio())
            raise
        handle = Sandbox(f"modal-{sandbox.object_id}", client, spec, sandbox)
        self._live[handle.sandbox_id] = sandbox
        return handle

    async def _wait_ready(self, sandbox: Any, client: AgentClient, timeout: float) -> None:
        """Until the agent is SERVING; a sandbox whose agent exits meanwhile fails at once."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                await client.wait_ready(min(1.0, max(0.1, deadline - time.monotonic())))
                return
            except SandboxError as exc:
                code = await self._control("Sandbox.poll", sandbox.poll.aio())
                if code is not None:
                    raise SandboxError(
                        f"the agent of Modal sandbox {sandbox.object_id} exited at start with "
                        f"code {code} (its output is in the sandbox's logs on Modal)"
                    ) from None
                if time.monotonic() >= deadline:
                    raise SandboxError(
                        f"the Modal sandbox's agent was not ready after {timeout:g}s ({exc})"
                    ) from None

    def _agent_client(self, tunnel: Any, token: str) -> AgentClient:
        # The h2 tunnel is TLS (Modal's edge terminates it); the tcp one relays plaintext.
        h2 = self.options.tunnel_mode == "h2"
        host, port = (tunnel.host, tunnel.port) if h2 else tunnel.tcp_socket
        return dial(f"{host}:{port}", token=token, tls=h2, ca_file=self.options.tls_ca_file)

    async def release(self, sandbox: Sandbox) -> None:
        modal_sandbox = self._live.pop(sandbox.sandbox_id, None)
        with contextlib.suppress(Exception):
            await sandbox.client.close()
        if modal_sandbox is not None:
            with contextlib.suppress(Exception):
                await self._control("Sandbox.terminate", modal_sandbox.terminate.aio())

    async def aclose(self) -> None:
        for sandbox_id in list(self._live):
            modal_sandbox = self._live.pop(sandbox_id)
            with contextlib.suppress(Exception):
                await self._control("Sandbox.terminate", modal_sandbox.terminate.aio())

    async def sweep_orphans(self) -> int:
        """Terminate our-tagged sandboxes whose orchestrator (on this host) is gone."""
        import modal

        swept = 0
        async for sandbox in modal.Sandbox.list.aio(app_id=self._app.app_id, client=self._client):
            tags = await self._control("Sandbox.get_tags", sandbox.get_tags.aio())
            if owner_gone(tags.get("rlm.orchestrator", "")):
                await self._control("Sandbox.terminate", sandbox.terminate.aio())
                swept += 1
        return swept
