"""Docker sandboxes: one locked-down container per session, on this machine's engine.

The container has no network at all (`network_mode=none`): the orchestrator reaches the agent
through a unix socket in a bind-mounted directory, and `llm_query` rides that connection. It
runs as nobody, on a read-only root with a tmpfs work dir, with every capability dropped,
no-new-privileges, and pids / memory / CPU limits. Every container carries labels (owner,
orchestrator, session, expiry) so that a reconcile pass can remove what a dead orchestrator
left behind, and its agent stops by itself `orphan_timeout_seconds` after this orchestrator's
Attach stream ends (the process died): an orphan does not run unsupervised until then. The
Docker SDK blocks: every call goes through a thread.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import shutil
import socket
import tempfile
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rlm_orchestrator import telemetry
from rlm_orchestrator.config.backends import DockerConfig
from rlm_orchestrator.exceptions import SandboxError
from rlm_orchestrator.sandbox.agent_client import AgentClient
from rlm_orchestrator.sandbox.base import Sandbox, SandboxSpec
from rlm_orchestrator.sandbox.launch import CONTAINER_STATE_DIR, CONTAINER_WORKDIR, AgentLaunch
from rlm_orchestrator.sandbox.owner import orchestrator_id, owner_gone
from rlm_orchestrator.telemetry import metrics
from sandbox_agent.limits import NOBODY_UID

log = logging.getLogger("rlm_orchestrator.sandbox.docker")
MANAGED = "rlm.managed"
NOBODY = NOBODY_UID
OWNER_ENV = "RLM_SANDBOX_OWNER"


async def _uncancellable(run: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """Create a container even if cancelled meanwhile, and then remove it: a cancelled
    `to_thread` would leave the thread to create a container that nobody knows about."""
    creating = asyncio.ensure_future(asyncio.to_thread(run, *args, **kwargs))
    try:
        return await asyncio.shield(creating)
    except asyncio.CancelledError:
        with contextlib.suppress(Exception):
            created = await creating
            await asyncio.to_thread(created.remove, force=True)
        raise


@dataclass
class _Container:
    container: Any
    root: Path
    started: float
    # Held (attached) while the container waits in the warm pool.
    client: AgentClient | None = None


def _lock_socket_dir(sock_dir: Path) -> None:
    """Once the agent has bound its socket, the container may no longer write to the directory
    (files on the host disk outside its tmpfs cap, or removing its own socket), whatever user
    this orchestrator runs as. Connecting needs only the socket's own permission."""
    if sock_dir.stat().st_uid != os.geteuid():
        os.chown(sock_dir, os.geteuid(), os.getegid())  # root gave it to the container's user
    sock_dir.chmod(0o755)


class DockerProvider:
    """Starts the agent image per sandbox (or takes one from the warm pool)."""

    name = "docker"

    def __init__(self, options: DockerConfig | None = None, client: Any = None) -> None:
        self.options = options or DockerConfig()
        self._client = client
        self.host = socket.gethostname()
        self.orchestrator_id = orchestrator_id()
        self._starts = asyncio.Semaphore(self.options.max_concurrent_starts)
        self._live: dict[str, _Container] = {}
        self._pool: list[_Container] = []
        metrics.watch_warm_pool(self, "docker", lambda provider: len(provider._pool))
        self._maintenance: asyncio.Task[None] | None = None
        self._refilling = asyncio.Lock()

    async def _docker(self) -> Any:
        if self._client is None:
            import docker

            try:
                self._client = await asyncio.to_thread(docker.from_env)
                await asyncio.to_thread(self._client.ping)
            except Exception as exc:
                raise SandboxError(f"the Docker engine is not reachable: {exc}") from exc
        return self._client

    # -- acquire / release -----------------------------------------------------------------

    async def acquire(self, spec: SandboxSpec) -> Sandbox:
        await self._ensure_maintenance()
        if self.options.warm_pool_size:
            metrics.warm_pool_take("docker", bool(self._pool))
        while self._pool:
            pooled = self._pool.pop(0)
            client, pooled.client = pooled.client, None
            assert client is not None
            try:
                await client.wait_ready(2.0)
            except SandboxError:
                await client.close()
                await self._remove(pooled)
                continue
            return self._adopt(pooled, client, spec)
        container, client = await self._start(spec, session=spec.session_id)
        return self._adopt(container, client, spec)

    def _adopt(self, container: _Container, client: AgentClient, spec: SandboxSpec) -> Sandbox:
        sandbox = Sandbox(f"docker-{container.container.short_id}", client, spec, container)
        self._live[sandbox.sandbox_id] = container
        return sandbox

    async def release(self, sandbox: Sandbox) -> None:
        container = self._live.pop(sandbox.sandbox_id, None)
        with contextlib.suppress(Exception):
            await sandbox.client.close()
        if container is not None:
            await self._remove(container)

    async def aclose(self) -> None:
        if self._maintenance is not None:
            self._maintenance.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._maintenance
            self._maintenance = None
        pool, self._pool = self._pool, []
        live, self._live = list(self._live.values()), {}
        await asyncio.gather(*(self._remove(c) for c in pool + live))

    # -- containers --------------------------------------------------------------------------

    def _environment(self) -> dict[str, str]:
        # No secret ever: a home and temp dir in the tmpfs, and the owner label (as for
        # local sandboxes) so that a stray agent process can be traced back to its owner.
        owner = os.environ.get(OWNER_ENV) or self.orchestrator_id
        return {"HOME": "/work/code", "TMPDIR": "/work", OWNER_ENV: owner}

    def _labels(self, session: str, root: Path) -> dict[str, str]:
        return {
            "rlm.host-dir": str(root),
            MANAGED: "true",
            "rlm.owner": os.environ.get(OWNER_ENV) or self.orchestrator_id,
            "rlm.orchestrator": self.orchestrator_id,
            "rlm.session": session,
            "rlm.expires": str(int(time.time() + self.options.container_ttl_seconds)),
        }

    def command(self, spec: SandboxSpec) -> list[str]:
        """The agent's flags: the image's entrypoint is `python3 -m sandbox_agent`."""
        return (
            AgentLaunch(
                listen="unix:/sock/agent.sock",
                workdir=CONTAINER_WORKDIR,
                state_dir=CONTAINER_STATE_DIR,
                orphan_timeout_seconds=self.options.orphan_timeout_seconds,
            )
            .for_session(spec, self.options.memory_mb)
            .args()
        )

    async def _start(self, spec: SandboxSpec, session: str) -> tuple[_Container, AgentClient]:
        docker = await self._docker()
        o = self.options
        root = Path(await asyncio.to_thread(tempfile.mkdtemp, prefix="rlm-sbx-"))
        sock_dir = root / "sock"
        sock_dir.mkdir()
        if os.geteuid() == 0:
            os.chown(sock_dir, NOBODY, NOBODY)  # the agent (nobody) creates its socket here
        else:
            # Until the agent has bound (_lock_socket_dir); root stays 0o700: no other user
            # of this host can reach the socket.
            sock_dir.chmod(0o777)
        work_tmpfs = f"rw,size={o.work_tmpfs_mb}m,mode=1777,uid={NOBODY},gid={NOBODY}"
        entry: _Container | None = None
        client: AgentClient | None = None
        try:
            async with self._starts:
                container = await _uncancellable(
                    docker.containers.run,
                    o.image,
                    self.command(spec),
                    detach=True,
                    init=True,
                    name=f"rlm-sbx-{uuid.uuid4().hex[:12]}",
                    labels=self._labels(session, root),
                    network_mode="none",
                    read_only=True,
                    user=f"{NOBODY}:{NOBODY}",
                    tmpfs={"/work": work_tmpfs},
                    cap_drop=["ALL"],
                    security_opt=["no-new-privileges"],
                    pids_limit=o.pids_limit,
                    mem_limit=f"{o.memory_mb}m",
                    memswap_limit=f"{o.memory_mb}m",
                    nano_cpus=int(o.cpus * 1e9),
                    environment=self._environment(),
                    volumes={str(sock_dir): {"bind": "/sock", "mode": "rw"}},
                )
                entry = _Container(container, root, time.monotonic())
                client = AgentClient(f"unix:{sock_dir / 'agent.sock'}")
                await self._wait_ready(entry, client, spec.startup_timeout_seconds)
            # No user code has run yet: lock the directory before any does.
            await asyncio.to_thread(_lock_socket_dir, sock_dir)
            await client.attach(self.orchestrator_id)
            return entry, client
        except BaseException as exc:
            if client is not None:
                await client.close()
            if entry is not None:
                await self._remove(entry)
            else:
                await asyncio.to_thread(shutil.rmtree, root, True)
            if isinstance(exc, Exception) and not isinstance(exc, SandboxError):
                raise SandboxError(f"could not start a sandbox container: {exc}") from exc
            raise

    async def _wait_ready(self, entry: _Container, client: AgentClient, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                await client.wait_ready(min(1.0, max(0.1, deadline - time.monotonic())))
                return
            except SandboxError:
                await asyncio.to_thread(entry.container.reload)
                if entry.container.status in ("exited", "dead"):
                    logs = await asyncio.to_thread(entry.container.logs, tail=30)
                    raise SandboxError(
                        f"the sandbox container exited at start: {logs.decode(errors='replace')}"
                    ) from None
        raise SandboxError(f"the sandbox container was not ready after {timeout:g}s")

    async def _remove(self, entry: _Container) -> None:
        if entry.client is not None:
            with contextlib.suppress(Exception):
                await entry.client.close()
            entry.client = None
        with contextlib.suppress(Exception):
            await asyncio.to_thread(entry.container.remove, force=True)
        await asyncio.to_thread(shutil.rmtree, entry.root, True)

    # -- pool and reconcile ------------------------------------------------------------------

    async def _ensure_maintenance(self) -> None:
        if self._maintenance is None:
            await self.reconcile()
            self._maintenance = asyncio.create_task(self._maintain(), name="docker-maintenance")

    async def _maintain(self) -> None:
        last_reconcile = time.monotonic()
        while True:
            try:
                await self._refill_pool()
                if time.monotonic() - last_reconcile > self.options.reconcile_interval_seconds:
                    await self.reconcile()
                    last_reconcile = time.monotonic()
            except Exception:  # the engine may be briefly unavailable: try again later
                log.exception("docker sandbox maintenance failed")
            await asyncio.sleep(1.0)

    async def _refill_pool(self) -> None:
        async with self._refilling:  # maintenance and warm_up() must not both fill it
            await self._refill_pool_locked()

    async def _refill_pool_locked(self) -> None:
        now = time.monotonic()
        for stale in [
            c for c in self._pool if now - c.started > self.options.warm_max_idle_seconds
        ]:
            self._pool.remove(stale)
            await self._remove(stale)
        while len(self._pool) < self.options.warm_pool_size:
            entry, client = await self._start(SandboxSpec(session_id="pool"), session="pool")
            entry.client = client  # stays attached while the container waits in the pool
            self._pool.append(entry)

    async def warm_up(self) -> None:
        """Fill the warm pool now (and start its maintenance)."""
        await self._ensure_maintenance()
        await self._refill_pool()

    async def reconcile(self) -> int:
        """Remove managed containers that expired or whose orchestrator is gone."""
        with telemetry.tracer().start_as_current_span("rlm.sandbox.reconcile") as span:
            removed = await self._reconcile()
            span.set_attribute("rlm.sandbox.removed", removed)
            return removed

    async def _reconcile(self) -> int:
        docker = await self._docker()
        containers = await asyncio.to_thread(
            docker.containers.list,
            all=True,
            filters={"label": f"{MANAGED}=true"},
            ignore_removed=True,  # another orchestrator may be removing one meanwhile
        )
        removed = 0
        for container in containers:
            if self._orphaned(container.labels):
                with contextlib.suppress(Exception):
                    await asyncio.to_thread(container.remove, force=True)
                    removed += 1
                host_dir = container.labels.get("rlm.host-dir", "")
                ours = container.labels.get("rlm.orchestrator", "").startswith(f"{self.host}:")
                if ours and Path(host_dir).name.startswith("rlm-sbx-"):
                    # Its socket directory on this machine (never anything else of ours).
                    await asyncio.to_thread(shutil.rmtree, host_dir, True)
        return removed

    def _orphaned(self, labels: dict[str, str]) -> bool:
        if float(labels.get("rlm.expires", "0") or 0) < time.time():
            return True
        return owner_gone(labels.get("rlm.orchestrator", ""))
