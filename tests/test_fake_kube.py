"""The fake Kubernetes API server, through the real lightkube client.

Most tests run twice: over the in-process httpx2 MockTransport and over the real HTTP server.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import threading
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx2
import psutil
import pytest

lightkube = pytest.importorskip("lightkube")

from lightkube import ApiError as LightkubeError  # noqa: E402
from lightkube import AsyncClient, KubeConfig  # noqa: E402
from lightkube.resources.coordination_v1 import Lease  # noqa: E402
from lightkube.resources.core_v1 import Pod, PodStatus, Secret  # noqa: E402
from lightkube.types import CascadeType, PatchType  # noqa: E402

from tests.fakes.fake_kube import (  # noqa: E402
    JSON_PATCH,
    ApiError,
    AuditEntry,
    FakeKubeApiServer,
)
from tests.fakes.fake_kube_http import (  # noqa: E402
    FakeKubeHttpServer,
    KubeRouter,
    fake_kube_config,
    fake_kube_transport,
)
from tests.fakes.fake_kube_patch import (  # noqa: E402
    PatchTestFailed,
    json_patch,
    merge_patch,
)
from tests.fakes.fake_kube_selectors import FieldSelector, LabelSelector  # noqa: E402

pytestmark = pytest.mark.timeout(30)

NS = "sandboxes"
STEP = 5  # seconds: any single call slower than this means the fake hangs


@dataclass
class Kube:
    api: FakeKubeApiServer
    client: AsyncClient
    http: FakeKubeHttpServer | None = None


@pytest.fixture(params=["mock", "http"])
async def kube(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Kube]:
    api = FakeKubeApiServer(history_limit=20)
    if request.param == "mock":
        transport = fake_kube_transport(api, token="fake-token")
        client = AsyncClient(config=fake_kube_config(namespace=NS), transport=transport)
        try:
            yield Kube(api, client)
        finally:
            await client.close()
        return
    with FakeKubeHttpServer(api) as server:
        config = KubeConfig.from_file(server.write_kubeconfig(tmp_path / "kubeconfig", NS))
        client = AsyncClient(config=config, trust_env=False)
        try:
            yield Kube(api, client, server)
        finally:
            await client.close()


def pod(name: str = "", generate: str = "", **labels: str) -> Any:
    meta: dict[str, Any] = {"labels": labels}
    meta.update({"name": name} if name else {"generateName": generate})
    containers = [{"name": "agent", "image": "rlm-sandbox:1"}]
    return Pod.from_dict({"metadata": meta, "spec": {"containers": containers}})


def owned_by(owner: Any, name: str) -> Any:
    made = pod(name)
    ref = {"apiVersion": "coordination.k8s.io/v1", "kind": "Lease"}
    ref.update(name=owner.metadata.name, uid=owner.metadata.uid)
    made.metadata.ownerReferences = [ref]
    return made


async def step(awaitable: Any) -> Any:
    return await asyncio.wait_for(awaitable, STEP)


async def names(kube: Kube, **kwargs: Any) -> list[str]:
    listing: Any = kube.client.list(Pod, **kwargs)
    return [p.metadata.name async for p in listing]


def watching(kube: Kube, res: Any, **kwargs: Any) -> Any:
    """lightkube's watch (an async generator), closed when the block ends."""
    events: Any = kube.client.watch(res, **kwargs)
    return contextlib.aclosing(events)


async def pump(events: Any, queue: asyncio.Queue[Any]) -> None:
    async for event_type, obj in events:
        await queue.put((event_type, obj.metadata.name, obj.metadata.resourceVersion))


async def test_create_get_list_with_selectors(kube: Kube) -> None:
    made = [await step(kube.client.create(pod(f"p{n}", app=app))) for n, app in enumerate("aab")]
    versions = [int(p.metadata.resourceVersion) for p in made]
    assert versions == sorted(versions) and len(set(versions)) == 3
    assert made[0].status.phase == "Pending" and made[0].metadata.namespace == NS
    got = await step(kube.client.get(Pod, "p1"))
    assert got.metadata.uid == made[1].metadata.uid and got.metadata.creationTimestamp
    assert await names(kube, labels={"app": "a"}) == ["p0", "p1"]
    assert await names(kube, labels={"app": lightkube.operators.not_equal("a")}) == ["p2"]
    assert await names(kube, labels={"app": lightkube.operators.in_(["b", "c"])}) == ["p2"]
    assert await names(kube, labels={"app": lightkube.operators.not_in(["a"])}) == ["p2"]
    assert await names(kube, labels={"app": None}) == ["p0", "p1", "p2"]
    assert await names(kube, labels={"other": lightkube.operators.not_exists()}) == [
        "p0",
        "p1",
        "p2",
    ]
    assert await names(kube, fields={"metadata.name": "p2"}) == ["p2"]
    assert (
        await names(kube, fields={"status.phase": lightkube.operators.not_equal("Pending")}) == []
    )
    listing = kube.client.list(Pod)
    assert [p async for p in listing] and listing.resourceVersion == kube.api.resource_version
    with pytest.raises(LightkubeError) as missing:
        await step(kube.client.get(Pod, "nope"))
    assert (missing.value.status.code, missing.value.status.reason) == (404, "NotFound")
    with pytest.raises(LightkubeError) as taken:
        await step(kube.client.create(pod("p0")))
    assert (taken.value.status.code, taken.value.status.reason) == (409, "AlreadyExists")
    with pytest.raises(LightkubeError) as bad:
        await step(names(kube, fields={"spec.hostname": "x"}))
    assert bad.value.status.code == 400


async def test_generate_name_and_validation(kube: Kube) -> None:
    made = await step(kube.client.create(pod(generate="rlm-sbx-")))
    assert made.metadata.name.startswith("rlm-sbx-") and len(made.metadata.name) == 13
    assert made.metadata.generateName == "rlm-sbx-"
    for invalid in (pod("Upper_Case"), pod("ok", app="not valid!")):
        with pytest.raises(LightkubeError) as refused:
            await step(kube.client.create(invalid))
        assert (refused.value.status.code, refused.value.status.reason) == (422, "Invalid")
    secret = Secret.from_dict({"metadata": {"name": "s"}, "stringData": {"token": "t0k"}})
    created = await step(kube.client.create(secret))
    assert created.data == {"token": "dDBr"} and created.stringData is None


async def test_stale_resource_version_is_a_conflict(kube: Kube) -> None:
    created = await step(kube.client.create(pod("p", app="a")))
    rv = created.metadata.resourceVersion
    fresh = {"metadata": {"resourceVersion": rv, "labels": {"app": "b"}}}
    patched = await step(kube.client.patch(Pod, "p", fresh, patch_type=PatchType.MERGE))
    assert int(patched.metadata.resourceVersion) > int(rv) and patched.metadata.labels["app"] == "b"
    with pytest.raises(LightkubeError) as stale:
        await step(kube.client.patch(Pod, "p", fresh, patch_type=PatchType.MERGE))
    assert (stale.value.status.code, stale.value.status.reason) == (409, "Conflict")
    assert 'on pods "p": the object has been modified' in str(stale.value.status.message)
    # A no-op patch writes nothing; a failed JSON-patch test is 422 Invalid, as in Kubernetes.
    same = await step(kube.client.patch(Pod, "p", {"metadata": {"labels": {"app": "b"}}}))
    assert same.metadata.resourceVersion == patched.metadata.resourceVersion
    test_rv = [{"op": "test", "path": "/metadata/resourceVersion", "value": rv}]
    with pytest.raises(LightkubeError) as failed:
        await step(kube.client.patch(Pod, "p", test_rv, patch_type=PatchType.JSON))
    assert failed.value.status.code == 422
    ops = [{"op": "add", "path": "/metadata/annotations", "value": {"k": "v"}}]
    patched = await step(kube.client.patch(Pod, "p", ops, patch_type=PatchType.JSON))
    assert patched.metadata.annotations == {"k": "v"}


async def test_pod_status_and_spec_rules(kube: Kube) -> None:
    await step(kube.client.create(pod("p")))
    ignored = {"status": {"phase": "Running"}, "metadata": {"uid": "forged", "name": "other"}}
    patched = await step(kube.client.patch(Pod, "p", ignored, patch_type=PatchType.MERGE))
    assert patched.status.phase == "Pending" and patched.metadata.name == "p"
    assert patched.metadata.uid != "forged"
    running = {"status": {"phase": "Running", "podIP": "10.0.0.7"}}
    patched = await step(kube.client.patch(PodStatus, "p", running, patch_type=PatchType.MERGE))
    assert patched.status.phase == "Running"
    assert (await names(kube, fields={"status.phase": "Running"})) == ["p"]
    image = {"spec": {"containers": [{"name": "agent", "image": "rlm-sandbox:2"}]}}
    patched = await step(kube.client.patch(Pod, "p", image, patch_type=PatchType.MERGE))
    assert patched.spec.containers[0].image == "rlm-sandbox:2" and patched.metadata.generation == 2
    for spec in ({"restartPolicy": "Always"}, {"activeDeadlineSeconds": -1}):
        with pytest.raises(LightkubeError) as forbidden:
            await step(kube.client.patch(Pod, "p", {"spec": spec}, patch_type=PatchType.MERGE))
        assert forbidden.value.status.code == 422
    shorter = {"spec": {"activeDeadlineSeconds": 60}}
    await step(kube.client.patch(Pod, "p", shorter, patch_type=PatchType.MERGE))
    with pytest.raises(LightkubeError) as apply:
        await step(kube.client.apply(pod("p"), field_manager="me"))
    assert (apply.value.status.code, apply.value.status.reason) == (415, "UnsupportedMediaType")


async def test_deleting_a_lease_cascades_to_the_pods_it_owns(kube: Kube) -> None:
    deleted_by_hook: list[str] = []
    kube.api.on_delete("Pod", lambda obj: deleted_by_hook.append(obj["metadata"]["name"]))
    lease = await step(kube.client.create(Lease.from_dict({"metadata": {"name": "owner"}})))
    other = await step(kube.client.create(Lease.from_dict({"metadata": {"name": "other"}})))
    for name in ("a", "b"):
        await step(kube.client.create(owned_by(lease, name)))
    shared = owned_by(lease, "shared")
    shared.metadata.ownerReferences += owned_by(other, "x").metadata.ownerReferences
    await step(kube.client.create(shared))
    await step(kube.client.create(pod("bystander")))
    await step(kube.client.delete(Lease, "owner", cascade=CascadeType.BACKGROUND))
    # A dependent with another live owner stays, minus the reference to the deleted one.
    assert await names(kube) == ["bystander", "shared"]
    assert sorted(deleted_by_hook) == ["a", "b"]
    kept = await step(kube.client.get(Pod, "shared"))
    assert [ref.uid for ref in kept.metadata.ownerReferences] == [other.metadata.uid]
    with pytest.raises(LightkubeError) as gone:
        await step(kube.client.delete(Lease, "owner"))
    assert gone.value.status.code == 404
    # Orphan keeps the dependents and drops their owner reference.
    await step(kube.client.delete(Lease, "other", cascade=CascadeType.ORPHAN))
    kept = await step(kube.client.get(Pod, "shared"))
    assert kept.metadata.ownerReferences is None


async def test_foreground_deletion_order_and_preconditions() -> None:
    api = FakeKubeApiServer()
    lease = api.create("Lease", NS, {"metadata": {"name": "l"}})
    ref = {"apiVersion": "coordination.k8s.io/v1", "kind": "Lease", "name": "l"}
    ref["uid"] = lease["metadata"]["uid"]
    for name in ("a", "b"):
        api.create(
            "Pod", NS, {**pod(name).to_dict(), "metadata": {"name": name, "ownerReferences": [ref]}}
        )
    watch = api.watch("Lease", NS), api.watch("Pod", NS, resource_version=api.resource_version)
    with pytest.raises(ApiError) as mismatch:
        api.delete("Lease", NS, "l", preconditions={"uid": "someone-else"})
    assert mismatch.value.code == 409 and "Precondition failed: UID" in mismatch.value.message
    last = api.delete("Lease", NS, "l", propagation_policy="Foreground")
    pod_events = [watch[1].get(timeout=0) for _ in range(2)]
    assert [(e["type"], e["object"]["metadata"]["name"]) for e in pod_events if e] == [
        ("DELETED", "a"),
        ("DELETED", "b"),
    ]
    # Foreground: the dependents went first, so the owner's DELETED has the highest version.
    rvs = [int(e["object"]["metadata"]["resourceVersion"]) for e in pod_events if e]
    assert int(last["metadata"]["resourceVersion"]) > max(rvs)
    lease_events = [e["type"] for e in [watch[0].get(timeout=0), watch[0].get(timeout=0)] if e]
    assert lease_events == ["ADDED", "DELETED"]
    for w in watch:
        w.close()
        assert w.done


async def test_watch_from_a_version_sees_changes_live_in_order(kube: Kube) -> None:
    await step(kube.client.create(pod("before")))
    since = kube.api.resource_version
    queue: asyncio.Queue[Any] = asyncio.Queue()
    async with watching(kube, Pod, resource_version=since) as events:
        task = asyncio.create_task(pump(events, queue))
        try:
            created = await step(kube.client.create(pod("p")))
            assert await step(queue.get()) == ("ADDED", "p", created.metadata.resourceVersion)
            patched = await step(kube.client.patch(Pod, "p", {"metadata": {"labels": {"x": "1"}}}))
            assert await step(queue.get()) == ("MODIFIED", "p", patched.metadata.resourceVersion)
            running = {"phase": "Running", "containerStatuses": [{"name": "agent"}]}
            kube.api.set_pod_status(NS, "p", running)  # as a kubelet would
            assert (await step(queue.get()))[:2] == ("MODIFIED", "p")
            status = (await step(kube.client.get(Pod, "p"))).status
            assert (
                status.containerStatuses[0].imageID == "" and not status.containerStatuses[0].ready
            )
            await step(kube.client.delete(Pod, "p"))
            event_type, name, rv = await step(queue.get())
            assert (event_type, name) == ("DELETED", "p") and rv == kube.api.resource_version
            assert queue.empty()
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task


async def test_watch_resumes_after_the_server_timeout(kube: Kube) -> None:
    since = kube.api.resource_version
    queue: asyncio.Queue[Any] = asyncio.Queue()
    async with watching(kube, Pod, resource_version=since, server_timeout=1) as events:
        task = asyncio.create_task(pump(events, queue))
        try:
            await step(kube.client.create(pod("first")))
            assert (await step(queue.get()))[:2] == ("ADDED", "first")
            await asyncio.sleep(1.2)  # the server ended the stream; lightkube asked again
            await step(kube.client.create(pod("second")))
            assert (await step(queue.get()))[:2] == ("ADDED", "second")
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
    watches = [entry for entry in kube.api.audit_log if entry.verb == "watch"]
    assert len(watches) >= 2


async def test_watch_from_a_too_old_version_gets_410(kube: Kube) -> None:
    for n in range(25):  # history_limit is 20
        kube.api.create("Secret", NS, {"metadata": {"name": f"s{n}"}})
    with pytest.raises(LightkubeError) as expired:
        async with watching(kube, Secret, resource_version="1") as events:
            await step(events.__anext__())
    assert (expired.value.status.code, expired.value.status.reason) == (410, "Expired")
    # A version still in the history replays what came after it.
    async with watching(kube, Secret, resource_version="23") as events:
        replayed = [(await step(events.__anext__()))[1].metadata.name for _ in range(2)]
    assert replayed == ["s23", "s24"]


async def test_a_label_watch_sees_pods_leave_and_enter_the_selection(kube: Kube) -> None:
    await step(kube.client.create(pod("p", app="a")))
    await step(kube.client.create(pod("q", app="b")))
    queue: asyncio.Queue[Any] = asyncio.Queue()
    async with watching(kube, Pod, labels={"app": "a"}) as events:
        task = asyncio.create_task(pump(events, queue))
        try:
            assert (await step(queue.get()))[:2] == ("ADDED", "p")  # the current state first
            relabel = await step(
                kube.client.patch(Pod, "p", {"metadata": {"labels": {"app": "b"}}})
            )
            assert await step(queue.get()) == ("DELETED", "p", relabel.metadata.resourceVersion)
            await step(kube.client.patch(Pod, "q", {"metadata": {"labels": {"x": "y"}}}))
            await step(kube.client.patch(Pod, "q", {"metadata": {"labels": {"app": "a"}}}))
            assert (await step(queue.get()))[:2] == ("ADDED", "q")
            await step(kube.client.delete(Pod, "q"))
            assert (await step(queue.get()))[:2] == ("DELETED", "q")
            assert queue.empty()
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task


async def test_the_audit_log_records_rbac_verbs_and_faults_can_be_injected(kube: Kube) -> None:
    kube.api.clear_audit_log()
    await step(kube.client.create(Lease.from_dict({"metadata": {"name": "l"}})))
    await step(kube.client.create(pod("p")))
    await step(kube.client.get(Pod, "p"))
    await names(kube)
    await step(kube.client.patch(Pod, "p", {"metadata": {"labels": {"a": "b"}}}))
    await step(kube.client.patch(PodStatus, "p", {"status": {"phase": "Running"}}))
    await step(kube.client.replace(await step(kube.client.get(Lease, "l"))))
    async with watching(kube, Pod, fields={"metadata.name": "p"}) as w:
        await step(w.__anext__())
    await step(kube.client.delete(Pod, "p"))
    await step(kube.client.deletecollection(Lease))
    log = kube.api.audit_log
    assert {entry.verb for entry in log} == {
        "create",
        "get",
        "list",
        "patch",
        "update",
        "watch",
        "delete",
        "deletecollection",
    }
    assert log[0] == AuditEntry("create", "coordination.k8s.io", "leases", NS, None)
    assert ("patch", "", "pods/status", NS, "p") in log
    assert log[-1] == ("deletecollection", "coordination.k8s.io", "leases", NS, None)
    kube.api.fail_next("create", "pods", 503, "ServiceUnavailable", "try later")
    with pytest.raises(LightkubeError) as injected:
        await step(kube.client.create(pod("p")))
    assert (injected.value.status.code, injected.value.status.message) == (503, "try later")
    await step(kube.client.create(pod("p")))  # only the next one failed


async def test_bad_token_and_unknown_paths(tmp_path: Path) -> None:
    with FakeKubeHttpServer() as server:
        config = KubeConfig.from_file(server.write_kubeconfig(tmp_path / "kc", token="wrong"))
        client = AsyncClient(config=config, trust_env=False)
        try:
            with pytest.raises(LightkubeError) as denied:
                await step(client.get(Pod, "p"))
            assert (denied.value.status.code, denied.value.status.reason) == (401, "Unauthorized")
        finally:
            await client.close()
        assert server.api.audit_log == []
        async with httpx2.AsyncClient(base_url=server.url, trust_env=False) as raw:
            auth = {"Authorization": "Bearer fake-token"}
            for path in ("/api/v1/namespaces/x/services", "/apis/apps/v1/namespaces/x/pods"):
                answer = await step(raw.get(path, headers=auth))
                assert answer.status_code == 404 and answer.json()["kind"] == "Status"
            answer = await step(raw.post("/api/v1/pods", headers=auth, content=b"{}"))
            assert answer.status_code == 405
            assert (await step(raw.get("/version", headers=auth))).json()["major"] == "1"


def test_delete_options_body_and_json_patch_content_type() -> None:
    api = FakeKubeApiServer()
    router = KubeRouter(api)
    made = api.create("Pod", NS, pod("p").to_dict())
    path = f"/api/v1/namespaces/{NS}/pods/p"
    ops = json.dumps([{"op": "replace", "path": "/metadata/labels", "value": {"a": "b"}}])
    patched = router.handle("PATCH", path, {}, {"Content-Type": JSON_PATCH}, ops.encode())
    assert patched.status == 200 and json.loads(patched.body)["metadata"]["labels"] == {"a": "b"}
    stale = {"preconditions": {"resourceVersion": made["metadata"]["resourceVersion"]}}
    refused = router.handle("DELETE", path, {}, {}, json.dumps(stale).encode())
    assert refused.status == 409 and json.loads(refused.body)["reason"] == "Conflict"
    fine = {"preconditions": {"uid": made["metadata"]["uid"]}, "propagationPolicy": "Foreground"}
    assert router.handle("DELETE", path, {}, {}, json.dumps(fine).encode()).status == 200
    assert api.list("Pod", NS)[0] == []


def test_store_watch_from_threads_hooks_and_update() -> None:
    api = FakeKubeApiServer()
    created: list[str] = []
    api.on_create("pods", lambda obj: created.append(obj["metadata"]["name"]))
    watch = api.watch("Pod", NS, label_selector="app in (x, y),!skip", timeout_seconds=0.5)
    seen: list[tuple[str, str]] = []

    def consume() -> None:
        seen.extend((e["type"], e["object"]["metadata"]["name"]) for e in watch)

    consumer = threading.Thread(target=consume)
    consumer.start()
    api.create("Pod", NS, pod("p", app="x").to_dict())
    api.create("Pod", NS, pod("q", app="x", skip="1").to_dict())
    api.create("Pod", "elsewhere", pod("r", app="x").to_dict())
    api.update("Pod", NS, "p", lambda obj: obj["metadata"]["labels"].update(app="y"))
    api.update("Pod", NS, "p", lambda obj: {**obj, "status": {"phase": "Succeeded"}})
    started = time.monotonic()
    consumer.join(5)
    assert 0.3 < time.monotonic() - started < 2 and watch.done  # ended at its timeout
    assert seen == [("ADDED", "p"), ("MODIFIED", "p"), ("MODIFIED", "p")]
    assert created == ["p", "q", "r"]
    assert api.get("Pod", NS, "p")["status"] == {"phase": "Succeeded"}
    lease = api.create("Lease", NS, {"metadata": {"name": "l"}})
    assert api.update("Lease", NS, "l", lambda obj: None) == lease  # no change: no write


async def test_an_async_watch_is_woken_from_another_thread_and_closes() -> None:
    api = FakeKubeApiServer()
    watch = api.watch("Lease", NS)
    writer = threading.Timer(0.05, lambda: api.create("Lease", NS, {"metadata": {"name": "l"}}))
    writer.start()
    event = await step(watch.aget())
    assert event is not None and event["type"] == "ADDED"
    threading.Timer(0.05, watch.close).start()
    assert await step(watch.aget()) is None
    writer.join()


async def test_the_http_server_stops_cleanly_with_an_open_watch(tmp_path: Path) -> None:
    threads_before = set(threading.enumerate())
    server = FakeKubeHttpServer().start()
    port = server.port
    config = KubeConfig.from_file(server.write_kubeconfig(tmp_path / "kc", NS))
    client = AsyncClient(config=config, trust_env=False)
    queue: asyncio.Queue[Any] = asyncio.Queue()
    events: Any = client.watch(Pod)
    task = asyncio.create_task(pump(events, queue))
    await step(client.create(pod("p")))
    assert (await step(queue.get()))[:2] == ("ADDED", "p")
    assert set(threading.enumerate()) - threads_before
    stopped = time.monotonic()
    server.stop()
    assert time.monotonic() - stopped < 2
    # The stream ended; lightkube asked again and found nobody listening.
    with pytest.raises(httpx2.ConnectError):
        await step(task)
    await client.close()
    assert set(threading.enumerate()) - threads_before == set()
    ours = [
        c
        for c in psutil.Process().net_connections("tcp")
        if port in (c.laddr.port if c.laddr else None, c.raddr.port if c.raddr else None)
    ]
    assert ours == []


@pytest.mark.parametrize(
    ("selector", "labels", "expected"),
    [
        ("", {}, True),
        ("a=b", {"a": "b"}, True),
        ("a==b", {"a": "c"}, False),
        ("a!=b", {}, True),
        ("a in (x, y),b", {"a": "y", "b": ""}, True),
        ("a notin (x)", {}, True),
        ("!a", {"a": "1"}, False),
        ("a>3,a<10", {"a": "5"}, True),
        ("a>3", {"a": "x"}, False),
    ],
)
def test_label_selectors(selector: str, labels: dict[str, str], expected: bool) -> None:
    assert LabelSelector(selector).matches(labels) is expected


@pytest.mark.parametrize("bad", ["a in ()", "a b c", "a=b,,c", "=x", "a>b"])
def test_malformed_label_selectors(bad: str) -> None:
    with pytest.raises(ValueError):
        LabelSelector(bad)


def test_field_selectors_and_patches() -> None:
    obj = {"metadata": {"name": "p"}, "status": {"phase": "Running"}}
    fields = frozenset({"metadata.name", "status.phase"})
    assert FieldSelector("metadata.name=p,status.phase!=Failed", fields).matches(obj)
    assert not FieldSelector("status.phase==Pending", fields).matches(obj)
    with pytest.raises(ValueError, match="not supported"):
        FieldSelector("spec.nodeName=n", fields)
    assert merge_patch({"a": {"b": 1, "c": [1]}, "d": 1}, {"a": {"b": None, "c": [2]}}) == {
        "a": {"c": [2]},
        "d": 1,
    }
    doc = {"list": [1, 2], "x": {"y~/z": 1}}
    ops = [
        {"op": "add", "path": "/list/-", "value": 3},
        {"op": "remove", "path": "/list/0"},
        {"op": "move", "from": "/x/y~0~1z", "path": "/moved"},
        {"op": "copy", "from": "/list", "path": "/copy"},
        {"op": "test", "path": "/moved", "value": 1},
    ]
    assert json_patch(doc, ops) == {"list": [2, 3], "x": {}, "moved": 1, "copy": [2, 3]}
    assert doc == {"list": [1, 2], "x": {"y~/z": 1}}  # the input is untouched
    with pytest.raises(PatchTestFailed):
        json_patch(doc, [{"op": "test", "path": "/list/0", "value": 9}])
    with pytest.raises(ValueError):
        json_patch(doc, [{"op": "replace", "path": "/missing", "value": 1}])
