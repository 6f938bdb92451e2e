"""A fleet of long-running agents, leased one session at a time.

Agents are found from a static list or a DNS name that resolves to many addresses (a
Kubernetes headless Service). Acquiring tries healthy agents, starting at a different one
each time so that sessions spread; an agent refuses a second lease, so two orchestrators
never share one. The lease is renewed while the session lives and expires by itself if the
orchestrator vanishes. An agent that cannot be reached is set aside for a while. Every call
uses TLS and the fleet's token (from the orchestrator's environment: never a sandbox's).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import socket
import time

from rlm_orchestrator.config.backends import FleetConfig
from rlm_orchestrator.exceptions import SandboxError
from rlm_orchestrator.sandbox.agent_client import AgentClient
from rlm_orchestrator.sandbox.base import Sandbox, SandboxSpec
from rlm_orchestrator.sandbox.launch import dial, token_from_environment
from rlm_orchestrator.sandbox.owner import orchestrator_id

log = logging.getLogger("rlm_orchestrator.sandbox.fleet")


class FleetProvider:
    name = "fleet"

    def __init__(self, options: FleetConfig | None = None) -> None:
        self.options = options or FleetConfig()
        self.holder = orchestrator_id()
        self._turn = itertools.count()
        self._unhealthy: dict[str, float] = {}
        self._renewals: dict[str, asyncio.Task[None]] = {}
        self._live: dict[str, Sandbox] = {}

    async def addresses(self) -> list[str]:
        found = list(self.options.agents)
        if self.options.dns:
            host, _, port = self.options.dns.rpartition(":")
            infos = await asyncio.get_running_loop().getaddrinfo(
                host, int(port), type=socket.SOCK_STREAM
            )
            found += sorted({f"{info[4][0]}:{port}" for info in infos})
        if not found:
            raise SandboxError(
                "the fleet has no agents: set environment_kwargs agents=[...] or dns"
            )
        return found

    def _client(self, address: str) -> AgentClient:
        o = self.options
        return dial(
            address,
            token=token_from_environment(o.token_env),
            tls=not o.insecure,
            ca_file=o.tls_ca_file,
            server_name=o.tls_server_name,
        )

    async def acquire(self, spec: SandboxSpec) -> Sandbox:
        addresses = await self.addresses()
        start = next(self._turn) % len(addresses)
        now = time.monotonic()
        ordered = addresses[start:] + addresses[:start]
        # Healthy agents first; set-aside ones only when nothing else is left.
        ordered.sort(key=lambda a: self._unhealthy.get(a, 0.0) > now)
        problems: list[str] = []
        for address in ordered:
            client = self._client(address)
            try:
                await client.wait_ready(self.options.connect_timeout_seconds)
                await client.lease(spec.session_id, self.holder, self.options.lease_ttl_seconds)
            except SandboxError as exc:
                await client.close()
                if "FAILED_PRECONDITION" not in str(exc):  # busy is healthy; silence is not
                    self._unhealthy[address] = time.monotonic() + self.options.unhealthy_seconds
                problems.append(f"{address}: {exc}")
                continue
            self._unhealthy.pop(address, None)
            sandbox = Sandbox(f"fleet-{address}-{client.lease_id[:8]}", client, spec, address)
            self._live[sandbox.sandbox_id] = sandbox
            self._renewals[sandbox.sandbox_id] = asyncio.create_task(self._renew(sandbox))
            return sandbox
        raise SandboxError("no fleet agent could be leased: " + "; ".join(problems))

    async def _renew(self, sandbox: Sandbox) -> None:
        while True:
            await asyncio.sleep(self.options.lease_ttl_seconds / 3)
            try:
                await sandbox.client.renew_lease(timeout=self.options.lease_ttl_seconds / 3)
            except SandboxError as exc:
                log.warning("lease of %s lost: %s", sandbox.provider_state, exc)
                self._unhealthy[sandbox.provider_state] = (
                    time.monotonic() + self.options.unhealthy_seconds
                )
                # An execution in flight on a cut-off agent would hang: fail it now.
                sandbox.client.abort(f"its lease could not be renewed ({exc})")
                return

    def is_unhealthy(self, address: str) -> bool:
        return self._unhealthy.get(address, 0.0) > time.monotonic()

    async def release(self, sandbox: Sandbox) -> None:
        if self._live.pop(sandbox.sandbox_id, None) is None:
            return
        renewal = self._renewals.pop(sandbox.sandbox_id, None)
        if renewal is not None:
            renewal.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await renewal
        with contextlib.suppress(SandboxError):
            # The agent resets itself; if it is gone, its lease expires anyway.
            await asyncio.wait_for(sandbox.client.release_lease(), 30)
        with contextlib.suppress(Exception):
            await sandbox.client.close()

    async def aclose(self) -> None:
        for sandbox in list(self._live.values()):
            await self.release(sandbox)
