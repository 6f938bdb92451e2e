"""environment="kubernetes": a sandbox pod per session, against a fake cluster.

The provider's real client (lightkube) talks HTTP to the fake API server (kube_support.py);
the fake kubelet runs each pod as a real agent process on a loopback address of its own and
reports its status as a kubelet would. The semantics suite also runs this way (conftest).
"""

from __future__ import annotations

import asyncio
import json
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import yaml
from conftest import (
    ROOT_MODEL,
    SERVER_TOKEN,
    repl,
    server_config,
    start_server,
    stop_server,
)
from kube_support import (
    CRASHING_IMAGE,
    NAMESPACE,
    STUCK_IMAGE,
    TOKEN,
    FakeCluster,
    all_gone,
    eventually,
    provider,
    run,
)

from rlm_orchestrator.client import AsyncClient
from rlm_orchestrator.config import KubernetesConfig
from rlm_orchestrator.exceptions import SandboxError
from rlm_orchestrator.sandbox import SandboxSpec
from rlm_orchestrator.sandbox.kubernetes.ownership import LEASE_LABELS, micro_time
from rlm_orchestrator.sandbox.kubernetes.pods import (
    STATE,
    pod_spec,
    readiness,
    sandbox_pod,
)
from rlm_orchestrator.testing.scripted_lm import ScriptedLMServer

REPO = Path(__file__).resolve().parents[1]


SPEC = SandboxSpec(session_id="s1", startup_timeout_seconds=20)


async def test_a_session_gets_its_own_pod_which_is_deleted_after(
    fake_cluster: FakeCluster,
) -> None:
    kube = provider(fake_cluster)
    try:
        sandbox = await kube.acquire(SPEC)
        (pod,) = fake_cluster.pods()
        assert pod["metadata"]["labels"][STATE] == "leased"
        assert pod["metadata"]["annotations"]["rlm.sandbox/session"] == "s1"
        (lease,) = fake_cluster.leases()
        assert pod["metadata"]["ownerReferences"][0]["uid"] == lease["metadata"]["uid"]
        assert readiness(pod).ready
        # Over TLS with the token; the agent's own environment no longer holds it.
        assert await run(sandbox.client, "print(6 * 7)") == "42\n"
        environment = await run(sandbox.client, "import os; print(sorted(os.environ))")
        assert "RLM_AGENT_TOKEN" not in environment and TOKEN not in environment
        with fake_cluster.kubelet.hold_terminations():
            await kube.release(sandbox)
            # Deleted gracefully: Terminating, its agent still running, until the kubelet acts.
            (terminating,) = fake_cluster.pods()
            assert terminating["metadata"]["deletionGracePeriodSeconds"] == 5  # the pod spec's
            assert fake_cluster.kubelet.running_processes() == 1
        await all_gone(fake_cluster)
        await kube.release(sandbox)  # idempotent
    finally:
        await kube.aclose()
    assert fake_cluster.leases() == []


async def test_sessions_take_warm_pool_pods_and_the_pool_refills(
    fake_cluster: FakeCluster,
) -> None:
    kube = provider(fake_cluster, pool_size=2, pool_check_seconds=0.2)
    try:
        await kube.reconcile()
        await kube._start()

        def ready_idle() -> list[str]:
            return [
                p["metadata"]["name"]
                for p in fake_cluster.pods()
                if p["metadata"]["labels"][STATE] == "idle" and readiness(p).ready
            ]

        await eventually(lambda: len(ready_idle()) == 2)
        warm = set(ready_idle())
        sandbox = await kube.acquire(SPEC)
        assert sandbox.provider_state in warm, "a warm pod was not used"
        assert await run(sandbox.client, "print('warm')") == "warm\n"
        await eventually(lambda: len(ready_idle()) == 2)  # replenished
        await kube.release(sandbox)
    finally:
        await kube.aclose()
    # Its Lease deleted, its idle pods went with it (cascade).
    await eventually(lambda: fake_cluster.pods() == [] and fake_cluster.leases() == [])
    await eventually(lambda: fake_cluster.kubelet.running_processes() == 0)


async def test_twenty_concurrent_leasers_never_share_a_pod(fake_cluster: FakeCluster) -> None:
    """Five idle pods, twenty orchestrators leasing at once: five winners, five distinct pods."""
    filler = provider(fake_cluster, image=STUCK_IMAGE, pool_size=5, pool_check_seconds=1000)
    leasers = [provider(fake_cluster, image=STUCK_IMAGE) for _ in range(20)]
    try:
        for n, kube in enumerate(leasers):
            kube.holder = f"orchestrator-{n}"
        await filler._start()
        # The pool is filled by hand below, between rounds: no upkeep task racing it.
        assert filler._pool_task is not None
        filler._pool_task.cancel()
        owners = [await kube._start() for kube in leasers]
        for rounds in range(3):
            await filler.fill_pool()

            def idle() -> set[str]:
                return {
                    p["metadata"]["name"]
                    for p in fake_cluster.pods()
                    if p["metadata"]["labels"][STATE] == "idle"
                }

            await eventually(lambda: len(idle()) == 5)
            pool = idle()
            results = await asyncio.gather(
                *(
                    kube._lease_idle(owner, SandboxSpec(session_id=f"r{rounds}-{n}"))
                    for n, (kube, owner) in enumerate(zip(leasers, owners, strict=True))
                )
            )
            won = [r for r in results if r is not None]
            names = [r["metadata"]["name"] for r in won]
            assert len(won) == 5 and set(names) == pool, names
            for pod in won:
                stored = fake_cluster.api_server.get("Pod", NAMESPACE, pod["metadata"]["name"])
                # The winner's session and Lease are on the pod; nobody else's.
                assert stored["metadata"]["annotations"] == pod["metadata"]["annotations"]
                assert stored["metadata"]["ownerReferences"] == pod["metadata"]["ownerReferences"]
                fake_cluster.api_server.delete("Pod", NAMESPACE, pod["metadata"]["name"])
    finally:
        for kube in [filler, *leasers]:
            await kube.aclose()
    await all_gone(fake_cluster)


async def test_an_image_that_cannot_be_pulled_fails_fast_and_clearly(
    fake_cluster: FakeCluster,
) -> None:
    kube = provider(fake_cluster, image="registry.invalid/rlm-sandbox:nope")
    try:
        # "cannot start": failed on the pod's state, not at the deadline ("not ready in time").
        with pytest.raises(SandboxError, match="cannot start: ImagePullBackOff"):
            await kube.acquire(SPEC)
        await all_gone(fake_cluster)  # the failed pod was deleted
    finally:
        await kube.aclose()


async def test_a_missing_secret_is_a_container_config_error(fake_cluster: FakeCluster) -> None:
    kube = provider(fake_cluster, token_secret="no-such-secret")
    try:
        with pytest.raises(SandboxError, match='CreateContainerConfigError: secret "no-such'):
            await kube.acquire(SPEC)
        await all_gone(fake_cluster)
    finally:
        await kube.aclose()


async def test_an_agent_that_exits_at_start_fails_the_acquire_at_once(
    fake_cluster: FakeCluster,
) -> None:
    kube = provider(fake_cluster, image=CRASHING_IMAGE)
    try:
        with pytest.raises(SandboxError, match=r"cannot start: agent exited \(Error, code 3\)"):
            await kube.acquire(SPEC)
        await all_gone(fake_cluster)
    finally:
        await kube.aclose()


async def test_a_pod_that_never_gets_ready_fails_at_the_deadline(
    fake_cluster: FakeCluster,
) -> None:
    kube = provider(fake_cluster, image=STUCK_IMAGE)
    try:
        spec = SandboxSpec(session_id="s1", startup_timeout_seconds=1.5)
        with pytest.raises(SandboxError, match=r"not ready in time \(phase Pending; waiting: "):
            await kube.acquire(spec)
        await all_gone(fake_cluster)
    finally:
        await kube.aclose()


async def test_a_vanished_orchestrators_pods_are_deleted_by_the_next_ones_sweep(
    fake_cluster: FakeCluster,
) -> None:
    gone = provider(fake_cluster, pool_size=1, pool_check_seconds=0.2)
    sandbox = await gone.acquire(SPEC)
    await eventually(lambda: len(fake_cluster.pods()) == 2)  # its session's pod + its pool
    # It vanishes: no more renewals, nothing cleaned up. Time passes beyond its Lease.
    assert gone._owner is not None and gone._owner._renewal is not None
    gone._owner._renewal.cancel()
    assert gone._pool_task is not None
    gone._pool_task.cancel()
    await sandbox.client.close()
    (lease,) = fake_cluster.leases()
    stale = micro_time(datetime.now(UTC) - timedelta(minutes=10))
    fake_cluster.api_server.patch(
        "Lease", NAMESPACE, lease["metadata"]["name"], {"spec": {"renewTime": stale}}
    )
    successor = provider(fake_cluster)
    try:
        assert await successor.reconcile() == 1
        await all_gone(fake_cluster)
        assert fake_cluster.kubelet.running_processes() == 0
        # Had it only been slow, its next renewal fails: the Lease was taken over and deleted.
        with pytest.raises(SandboxError) as lost:
            await gone._owner.renew()
        assert "404" in str(lost.value) or "409" in str(lost.value)
        # A live orchestrator's Lease is left alone.
        await successor._start()
        bystander = provider(fake_cluster)
        assert await bystander.reconcile() == 0
        await bystander.aclose()
    finally:
        await successor.aclose()
        gone._live.clear()
        gone._owner = None
        await gone.aclose()
    assert fake_cluster.leases() == []


# -- what the provider asks of the API: valid pods, exactly the RBAC it is granted ---------


def test_every_pod_the_provider_builds_validates_strictly() -> None:
    kubernetes_validate = pytest.importorskip("kubernetes_validate")
    version = kubernetes_validate.latest_version()
    variants: list[dict[str, Any]] = [
        {},
        {"runtime_class": "gvisor", "node_selector": {"pool": "sandboxes"}},
        {"tolerations": [{"key": "sandbox", "operator": "Exists", "effect": "NoSchedule"}]},
        {"tls_secret": None, "token_secret": None, "image_pull_policy": "Always"},
    ]
    owner = {"apiVersion": "coordination.k8s.io/v1", "kind": "Lease", "name": "l", "uid": "u"}
    for variant in variants:
        options = KubernetesConfig.model_validate(variant)
        for memory in (0, 512):
            for state in ("idle", "leased"):
                pod = sandbox_pod(
                    pod_spec(options, memory), state=state, owner=owner, annotations={}
                )
                kubernetes_validate.validate(pod, version, strict=True)
                spec = pod["spec"]
                assert spec["automountServiceAccountToken"] is False
                assert spec["enableServiceLinks"] is False
                assert spec["activeDeadlineSeconds"] == options.active_deadline_seconds
                (container,) = spec["containers"]
                assert container["securityContext"]["capabilities"] == {"drop": ["ALL"]}
                assert container["securityContext"]["readOnlyRootFilesystem"] is True
                assert container["readinessProbe"]["grpc"] == {"port": options.health_port}


async def test_the_pods_and_leases_sent_to_the_api_validate_strictly(
    fake_cluster: FakeCluster,
) -> None:
    kubernetes_validate = pytest.importorskip("kubernetes_validate")
    version = kubernetes_validate.latest_version()
    kube = provider(fake_cluster, pool_size=1, runtime_class="gvisor")
    try:
        sandbox = await kube.acquire(SPEC)
        objects = fake_cluster.pods() + fake_cluster.leases()
        assert len(objects) >= 2
        for obj in objects:
            kubernetes_validate.validate(obj, version, strict=True)
        await kube.release(sandbox)
    finally:
        await kube.aclose()


def role_rules() -> set[tuple[str, str, str]]:
    rbac = REPO / "deploy" / "kubernetes" / "overlays" / "pod-per-session" / "rbac.yaml"
    (role,) = [d for d in yaml.safe_load_all(rbac.read_text()) if d["kind"] == "Role"]
    assert role["metadata"]["namespace"] == NAMESPACE
    return {
        (group, resource, verb)
        for rule in role["rules"]
        for group in rule["apiGroups"]
        for resource in rule["resources"]
        for verb in rule["verbs"]
    }


async def test_the_role_grants_exactly_the_verbs_the_provider_uses(
    fake_cluster: FakeCluster,
) -> None:
    """Every code path that talks to the API, once; then the audit log against the Role."""
    api = fake_cluster.api_server
    # A vanished orchestrator's Lease, for the sweep to take over and delete.
    api.create(
        "Lease",
        NAMESPACE,
        {
            "apiVersion": "coordination.k8s.io/v1",
            "kind": "Lease",
            "metadata": {"name": "gone", "labels": dict(LEASE_LABELS)},
            "spec": {
                "holderIdentity": "gone",
                "leaseDurationSeconds": 10,
                "renewTime": "2020-01-01T00:00:00.000000Z",
            },
        },
    )
    api.clear_audit_log()
    kube = provider(fake_cluster, pool_size=1, pool_check_seconds=0.2, lease_duration_seconds=5)
    try:
        # A watch whose resourceVersion was compacted away: the pod is read afresh.
        api.fail_next("watch", "pods", 410, "Expired")
        sandbox = await kube.acquire(SPEC)  # sweep, Lease, create, watch, get
        await kube.release(sandbox)
        await eventually(
            lambda: any(
                readiness(p).ready and p["metadata"]["labels"][STATE] == "idle"
                for p in fake_cluster.pods()
            )
        )
        sandbox = await kube.acquire(SandboxSpec(session_id="s2"))  # lease from the pool
        await kube.release(sandbox)
        assert kube._owner is not None
        await kube._owner.renew()
    finally:
        await kube.aclose()
    used = {(e.api_group, e.resource, e.verb) for e in api.audit_log}
    assert used == role_rules()
    assert not {verb for _, _, verb in used} & {"update", "deletecollection"}


async def test_an_orchestrator_that_loses_its_lease_aborts_its_sessions_and_takes_a_new_one(
    fake_cluster: FakeCluster,
) -> None:
    kube = provider(fake_cluster, lease_duration_seconds=5)
    try:
        sandbox = await kube.acquire(SPEC)
        (lease,) = fake_cluster.leases()
        running = asyncio.create_task(run(sandbox.client, "import time; time.sleep(30)"))
        await asyncio.sleep(0.2)
        # Another orchestrator deemed it expired and took it over (to delete it next).
        fake_cluster.api_server.patch(
            "Lease", NAMESPACE, lease["metadata"]["name"], {"spec": {"holderIdentity": "x"}}
        )
        with pytest.raises(SandboxError, match="ownership of its pods was lost"):
            await asyncio.wait_for(running, 10)  # failed at the next renewal, not in 30 s
        assert kube._owner is None
        await kube.release(sandbox)
        again = await kube.acquire(SandboxSpec(session_id="s2", startup_timeout_seconds=20))
        leases = [
            item
            for item in fake_cluster.leases()
            if item["metadata"]["uid"] != lease["metadata"]["uid"]
        ]
        (new_lease,) = leases  # the taken-over one is its taker's to delete
        assert new_lease["spec"]["holderIdentity"] == kube.holder
        assert await run(again.client, "print(2)") == "2\n"
        await kube.release(again)
    finally:
        await kube.aclose()


async def test_a_pod_past_its_active_deadline_fails_with_the_reason(
    fake_cluster: FakeCluster,
) -> None:
    """The kubelet's side of activeDeadlineSeconds (the provider sets hours, the minimum 60)."""
    kube = provider(fake_cluster)
    try:
        owner = await kube._start()
        manifest = sandbox_pod(
            {**pod_spec(kube.options), "activeDeadlineSeconds": 1},
            state="leased",
            owner=owner.owner_reference(),
            annotations={},
        )
        created = fake_cluster.api_server.create("Pod", NAMESPACE, manifest)
        name = created["metadata"]["name"]

        def state() -> Any:
            return readiness(fake_cluster.api_server.get("Pod", NAMESPACE, name))

        await eventually(lambda: state().failure is not None)
        assert "DeadlineExceeded" in state().failure
        await eventually(lambda: fake_cluster.kubelet.running_processes() == 0)
    finally:
        await kube.aclose()
    assert fake_cluster.pods() == []


async def test_a_server_keeps_a_warm_pool_and_a_killed_servers_pods_are_swept_next_start(
    fake_cluster: FakeCluster, lm: ScriptedLMServer, tmp_path: Path
) -> None:
    """`serve` with environment="kubernetes": the pool is filled at start, a session runs on
    a warm pod; after a kill -9 its pods stay, until the next orchestrator's start-up sweep."""

    def config(**extra: Any) -> Path:
        path = server_config(lm, tmp_path, environment="kubernetes")
        options = fake_cluster.options(lease_duration_seconds=5, sweep_grace_seconds=0, **extra)
        with path.open("a") as toml:
            toml.write("[environment_kwargs]\n")
            toml.writelines(f"{key} = {json.dumps(value)}\n" for key, value in options.items())
        return path

    def idle_ready() -> list[str]:
        return [
            p["metadata"]["name"]
            for p in fake_cluster.pods()
            if p["metadata"]["labels"][STATE] == "idle" and readiness(p).ready
        ]

    first = start_server(config(pool_size=1, pool_check_seconds=0.2))
    try:
        await eventually(lambda: len(idle_ready()) == 1, timeout=20)  # before any session
        (warm,) = idle_ready()
        lm.set_sequence(ROOT_MODEL, [repl("print(6 * 7)"), "FINAL(done)"])
        async with AsyncClient(first.address, token=SERVER_TOKEN) as client:
            assert (await client.completion("ctx")).response == "done"
        await eventually(  # used, deleted
            lambda: warm not in {p["metadata"]["name"] for p in fake_cluster.pods()}
        )
        await eventually(lambda: len(idle_ready()) == 1)  # refilled
        first.process.kill()  # vanishes: nothing cleaned up
        first.process.wait()
    finally:
        stop_server(first)
    assert len(fake_cluster.pods()) == 1
    (lease,) = fake_cluster.leases()
    # Time passes: its Lease is not renewed any more and expires.
    stale = micro_time(datetime.now(UTC) - timedelta(minutes=10))
    fake_cluster.api_server.patch(
        "Lease", NAMESPACE, lease["metadata"]["name"], {"spec": {"renewTime": stale}}
    )
    # The next orchestrator's start (what `serve` runs first: SupportsReconcile).
    successor = provider(fake_cluster)
    try:
        assert await successor.reconcile() == 1
        assert fake_cluster.leases() == []
        await all_gone(fake_cluster)
    finally:
        await successor.aclose()


async def test_a_missing_permission_says_which_role_to_apply(fake_cluster: FakeCluster) -> None:
    kube = provider(fake_cluster)
    try:
        fake_cluster.api_server.fail_next("create", "pods", 403, "Forbidden")
        with pytest.raises(SandboxError, match=r"403 Forbidden: create Pod: .*rbac\.yaml"):
            await kube.acquire(SPEC)
        assert fake_cluster.pods() == []
    finally:
        await kube.aclose()
