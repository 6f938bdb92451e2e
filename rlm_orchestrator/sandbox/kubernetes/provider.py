"""Kubernetes: a sandbox pod per session, created through the API, with a warm pool.

The orchestrator runs in the cluster and dials each pod's agent at `podIP:port` (TLS and the
agents' bearer token, which the pods get from a Secret by reference). A session takes an
idle pod of the warm pool with one patch guarded by the pod's resourceVersion (a 409 means
another orchestrator got it first: try the next), or creates a pod and waits for it to be
ready by watching it from the create's resourceVersion, failing fast on a pod that cannot
start. A pod serves one session and is deleted after it. Pods are owned by the
orchestrator's Lease (ownership.py), so nothing outlives a vanished orchestrator for long.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
from datetime import UTC, datetime

from rlm_orchestrator import telemetry
from rlm_orchestrator.config.backends import KubernetesConfig
from rlm_orchestrator.exceptions import SandboxError
from rlm_orchestrator.sandbox.agent_client import AgentClient
from rlm_orchestrator.sandbox.base import Sandbox, SandboxSpec
from rlm_orchestrator.sandbox.kubernetes.api import JsonObject, KubeApi, KubeApiError
from rlm_orchestrator.sandbox.kubernetes.ownership import (
    OwnerLease,
    parse_time,
    sweep_expired_leases,
)
from rlm_orchestrator.sandbox.kubernetes.pods import (
    LEASED_BY,
    OUR_LABELS,
    SESSION,
    STATE,
    TEMPLATE,
    pod_spec,
    readiness,
    sandbox_pod,
    template_hash,
)
from rlm_orchestrator.sandbox.launch import dial, token_from_environment
from rlm_orchestrator.sandbox.owner import orchestrator_id

log = logging.getLogger("rlm_orchestrator.sandbox.kubernetes")


class KubernetesProvider:
    name = "kubernetes"

    def __init__(self, options: KubernetesConfig | None = None, api: KubeApi | None = None) -> None:
        self.options = options or KubernetesConfig()
        self.holder = orchestrator_id()
        self._api = api
        self._owner: OwnerLease | None = None
        self._starting = asyncio.Lock()
        self._pool_task: asyncio.Task[None] | None = None
        self._pool_wakeup = asyncio.Event()
        self._live: dict[str, Sandbox] = {}
        self._pool_spec = pod_spec(self.options)
        self.pool_template = template_hash(self._pool_spec)

    @property
    def api(self) -> KubeApi:
        if self._api is None:
            from rlm_orchestrator.sandbox.kubernetes.api import LightkubeApi

            self._api = LightkubeApi(
                self.options.namespace,
                kubeconfig=self.options.kubeconfig,
                context=self.options.context,
            )
        return self._api

    async def _start(self) -> OwnerLease:
        async with self._starting:
            if self._owner is None:
                await self.reconcile()
                owner = OwnerLease(self.api, self.holder, self.options.lease_duration_seconds)
                await owner.create()
                owner.start_renewing(self._lease_lost)
                self._owner = owner
                if self.options.pool_size and self._pool_task is None:
                    self._pool_task = asyncio.create_task(self._maintain_pool())
            return self._owner

    async def reconcile(self) -> int:
        """Delete expired orchestrator Leases: Kubernetes then deletes their pods."""
        with telemetry.tracer().start_as_current_span("kubernetes.sweep"):
            swept = await sweep_expired_leases(
                self.api, self.holder, self.options.sweep_grace_seconds
            )
        return len(swept)

    async def warm_up(self) -> None:
        """Take this orchestrator's Lease and start keeping the warm pool (in the background)."""
        if self.options.pool_size:
            await self._start()

    async def _lease_lost(self, reason: str) -> None:
        log.error("%s: its sandbox pods are being deleted", reason)
        for sandbox in list(self._live.values()):
            sandbox.client.abort(f"the orchestrator's ownership of its pods was lost ({reason})")
        async with self._starting:
            self._owner = None  # the next acquire starts a new Lease

    # -- acquire / release ---------------------------------------------------------------

    async def acquire(self, spec: SandboxSpec) -> Sandbox:
        owner = await self._start()
        deadline = asyncio.get_running_loop().time() + spec.startup_timeout_seconds
        with telemetry.tracer().start_as_current_span("kubernetes.sandbox.acquire") as span:
            pod = None
            if self.options.pool_size and not spec.memory_limit_mb:
                pod = await self._lease_idle(owner, spec)
            span.set_attribute("rlm.sandbox.pooled", pod is not None)
            if pod is None:
                pod_manifest = sandbox_pod(
                    pod_spec(self.options, spec.memory_limit_mb or 0),
                    state="leased",
                    owner=owner.owner_reference(),
                    annotations=self._session_annotations(spec),
                )
                pod = await self.api.create("Pod", pod_manifest)
            self._pool_wakeup.set()
            name = pod["metadata"]["name"]
            span.set_attribute("k8s.pod.name", name)
            client: AgentClient | None = None
            try:
                ip = await self._wait_ready(pod, deadline)
                client = self._client(ip)
                await client.wait_ready(max(deadline - asyncio.get_running_loop().time(), 1.0))
            except BaseException:
                if client is not None:
                    await client.close()
                with contextlib.suppress(KubeApiError):
                    await self.api.delete("Pod", name)
                raise
        sandbox = Sandbox(f"k8s-{name}", client, spec, name)
        self._live[sandbox.sandbox_id] = sandbox
        return sandbox

    def _session_annotations(self, spec: SandboxSpec) -> dict[str, str]:
        return {SESSION: spec.session_id, LEASED_BY: self.holder}

    async def _lease_idle(self, owner: OwnerLease, spec: SandboxSpec) -> JsonObject | None:
        """An idle pool pod made ours by one guarded patch, or None when none is left."""
        now = datetime.now(UTC)
        candidates = [
            pod
            for pod in await self.api.list("Pod", self._idle_labels())
            if readiness(pod).failure is None and not self._too_old(pod, now)
        ]
        # Ready pods first; shuffled so that concurrent leasers rarely want the same one.
        random.shuffle(candidates)
        candidates.sort(key=lambda pod: not readiness(pod).ready)
        for pod in candidates:
            meta = pod["metadata"]
            try:
                return await self.api.patch(
                    "Pod",
                    meta["name"],
                    {
                        "metadata": {
                            "resourceVersion": meta["resourceVersion"],
                            "labels": {STATE: "leased"},
                            "annotations": self._session_annotations(spec),
                            "ownerReferences": [owner.owner_reference()],
                        }
                    },
                )
            except KubeApiError as exc:
                if not (exc.conflict or exc.not_found):
                    raise
        return None

    def _idle_labels(self) -> dict[str, str]:
        return {**OUR_LABELS, STATE: "idle", TEMPLATE: self.pool_template}

    def _too_old(self, pod: JsonObject, now: datetime) -> bool:
        created = parse_time(pod["metadata"].get("creationTimestamp"))
        return created is not None and (
            (now - created).total_seconds() > self.options.pool_max_idle_seconds
        )

    async def _wait_ready(self, pod: JsonObject, deadline: float) -> str:
        """The pod's IP once the kubelet's probe passes; SandboxError if it never will."""
        name = pod["metadata"]["name"]
        state = readiness(pod)
        try:
            async with asyncio.timeout_at(deadline):
                while True:
                    if state.ready and state.ip:
                        return state.ip
                    if state.failure:
                        raise SandboxError(f"sandbox pod {name} cannot start: {state.failure}")
                    events = self.api.watch(
                        "Pod", name=name, resource_version=pod["metadata"]["resourceVersion"]
                    )
                    try:
                        async with contextlib.aclosing(events):
                            async for event_type, pod in events:
                                if event_type == "DELETED":
                                    raise SandboxError(f"sandbox pod {name} was deleted")
                                state = readiness(pod)
                                if (state.ready and state.ip) or state.failure:
                                    break
                    except KubeApiError as exc:
                        if exc.status_code != 410:
                            raise
                        # Our resourceVersion was compacted away: read the pod afresh.
                        pod = await self.api.get("Pod", name)
                        state = readiness(pod)
        except TimeoutError:
            raise SandboxError(
                f"sandbox pod {name} was not ready in time ({state.summary}); raise "
                "startup_timeout_seconds, or check the image and the nodes' capacity"
            ) from None

    def _client(self, ip: str) -> AgentClient:
        o = self.options
        return dial(
            f"[{ip}]:{o.port}" if ":" in ip else f"{ip}:{o.port}",
            token=token_from_environment(o.token_env),
            tls=bool(o.tls_secret),
            ca_file=o.tls_ca_file,
            server_name=o.tls_server_name,
        )

    async def release(self, sandbox: Sandbox) -> None:
        if self._live.pop(sandbox.sandbox_id, None) is None:
            return
        with contextlib.suppress(Exception):
            await sandbox.client.close()
        # Never reused: the next session gets a pod no code has run in.
        with contextlib.suppress(KubeApiError):
            await self.api.delete("Pod", sandbox.provider_state)

    async def aclose(self) -> None:
        if self._pool_task is not None:
            self._pool_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._pool_task
            self._pool_task = None
        for sandbox in list(self._live.values()):
            await self.release(sandbox)
        if self._owner is not None:
            # Its idle pool pods go with it (pods leased by others are owned by them now).
            await self._owner.delete()
            self._owner = None
        if self._api is not None:
            await self._api.aclose()
            self._api = None

    # -- warm pool ----------------------------------------------------------------------

    async def _maintain_pool(self) -> None:
        while True:
            try:
                await self.fill_pool()
            except (KubeApiError, SandboxError) as exc:
                log.warning("warm pool upkeep failed: %s", exc)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._pool_wakeup.wait(), self.options.pool_check_seconds)
            self._pool_wakeup.clear()

    async def pool_ready(self) -> int:
        """How many idle pods of this pod template are ready to be leased now."""
        idle = await self.api.list("Pod", self._idle_labels())
        return sum(1 for pod in idle if readiness(pod).ready)

    async def fill_pool(self) -> int:
        """Retire stale idle pods and create what the pool lacks; returns how many created."""
        owner = self._owner
        if owner is None:
            return 0
        now = datetime.now(UTC)
        usable = 0
        for pod in await self.api.list("Pod", self._idle_labels()):
            if readiness(pod).failure is None and not self._too_old(pod, now):
                usable += 1
            else:
                await self._retire(pod)
        missing = max(self.options.pool_size - usable, 0)
        manifest = sandbox_pod(
            self._pool_spec, state="idle", owner=owner.owner_reference(), annotations={}
        )
        await asyncio.gather(*(self.api.create("Pod", manifest) for _ in range(missing)))
        return missing

    async def _retire(self, pod: JsonObject) -> None:
        """Delete an idle pod, unless a session leases it first (guarded by resourceVersion)."""
        meta = pod["metadata"]
        try:
            await self.api.patch(
                "Pod",
                meta["name"],
                {
                    "metadata": {
                        "resourceVersion": meta["resourceVersion"],
                        "labels": {STATE: "retiring"},
                    }
                },
            )
            await self.api.delete("Pod", meta["name"])
        except KubeApiError as exc:
            if not (exc.conflict or exc.not_found):
                raise
