"""environment="kubernetes" and pods being deleted: a Terminating pod is never used.

A deleted pod stays, with a deletionTimestamp, until its kubelet has stopped it (for a node
that stopped answering: for good). Its status may still say Ready, and it keeps its labels:
only the deletionTimestamp tells a session it must not land there. The fake kubelet holds its
terminations (``hold_terminations``) so that the pods stay Terminating for as long as a test
needs.
"""

from __future__ import annotations

import asyncio

import pytest
from kube_support import (
    NAMESPACE,
    STUCK_IMAGE,
    FakeCluster,
    all_gone,
    eventually,
    provider,
    run,
)

from rlm_orchestrator.exceptions import SandboxError
from rlm_orchestrator.sandbox import SandboxSpec
from rlm_orchestrator.sandbox.kubernetes.pods import STATE, readiness

SPEC = SandboxSpec(session_id="s1", startup_timeout_seconds=20)


def idle_ready(cluster: FakeCluster) -> list[str]:
    return [
        p["metadata"]["name"]
        for p in cluster.pods()
        if p["metadata"]["labels"][STATE] == "idle" and readiness(p).ready
    ]


async def test_a_terminating_warm_pod_is_not_leased_a_new_pod_serves_the_session(
    fake_cluster: FakeCluster,
) -> None:
    kube = provider(fake_cluster, pool_size=1, pool_check_seconds=1000)
    try:
        await kube._start()
        await eventually(lambda: len(idle_ready(fake_cluster)) == 1)
        (doomed,) = idle_ready(fake_cluster)
        with fake_cluster.kubelet.hold_terminations():
            fake_cluster.api_server.delete("Pod", NAMESPACE, doomed)  # e.g. a node drain
            stored = fake_cluster.api_server.get("Pod", NAMESPACE, doomed)
            # Still labelled idle, still Ready by its status: only the deletion mark says no.
            assert stored["metadata"]["labels"][STATE] == "idle"
            assert stored["metadata"]["deletionTimestamp"]
            sandbox = await kube.acquire(SPEC)
            assert sandbox.provider_state != doomed, "the session landed on a Terminating pod"
            assert await run(sandbox.client, "print('fresh')") == "fresh\n"
            # Nor does the pool count it (its upkeep, woken by the acquire, replaced it).
            await eventually(lambda: len([p for p in idle_ready(fake_cluster) if p != doomed]) == 1)
            assert await kube.pool_ready() == 1
            await kube.release(sandbox)
    finally:
        await kube.aclose()
    await all_gone(fake_cluster)


async def test_a_pod_deleted_while_its_session_waits_fails_the_acquire_at_once(
    fake_cluster: FakeCluster,
) -> None:
    kube = provider(fake_cluster, image=STUCK_IMAGE)  # never ready: the session waits
    try:
        waiting = asyncio.create_task(kube.acquire(SPEC))
        await eventually(lambda: len(fake_cluster.pods()) == 1)
        (pod,) = fake_cluster.pods()
        with fake_cluster.kubelet.hold_terminations():  # Terminating, never DELETED meanwhile
            fake_cluster.api_server.delete("Pod", NAMESPACE, pod["metadata"]["name"])
            # At the deletion mark, not at the 20 s deadline ("not ready in time").
            with pytest.raises(SandboxError, match="cannot start: pod is being deleted"):
                await asyncio.wait_for(waiting, 10)
    finally:
        await kube.aclose()
    await all_gone(fake_cluster)
