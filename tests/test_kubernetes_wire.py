"""The provider's real Kubernetes client on the wire: what it sends, how it reads answers.

LightkubeApi runs over an httpx MockTransport that records every request and hands it to the
fake API server's REST layer, so the assertions are about real HTTP requests (methods, URLs,
query parameters, patch content types, bodies) and real responses (watch streams, Status
errors).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs

import httpx2
import pytest
import yaml

from rlm_orchestrator.sandbox.kubernetes.api import KubeApiError, LightkubeApi
from tests.fakes.fake_kube import FakeKubeApiServer
from tests.fakes.fake_kube_http import fake_kube_transport, kubeconfig_dict

NS = "sandboxes"
PODS = f"/api/v1/namespaces/{NS}/pods"
LEASES = f"/apis/coordination.k8s.io/v1/namespaces/{NS}/leases"


class Recording(httpx2.AsyncBaseTransport):
    def __init__(self, inner: httpx2.AsyncBaseTransport) -> None:
        self.inner = inner
        self.requests: list[httpx2.Request] = []

    async def handle_async_request(self, request: httpx2.Request) -> httpx2.Response:
        await request.aread()
        self.requests.append(request)
        return await self.inner.handle_async_request(request)

    def last(self) -> httpx2.Request:
        return self.requests[-1]


def query(request: httpx2.Request) -> dict[str, str]:
    return {k: v[0] for k, v in parse_qs(request.url.query.decode()).items()}


def pod(name: str = "p1", **labels: str) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name, "labels": labels},
        "spec": {"containers": [{"name": "agent", "image": "rlm-sandbox:latest"}]},
    }


@pytest.fixture
async def wire(tmp_path: Path) -> AsyncIterator[tuple[LightkubeApi, Recording, FakeKubeApiServer]]:
    server = FakeKubeApiServer()
    recording = Recording(fake_kube_transport(server, token="t0k"))
    kubeconfig = tmp_path / "kubeconfig"
    config = kubeconfig_dict("http://fake-kube.invalid", namespace=NS, token="t0k")
    kubeconfig.write_text(yaml.safe_dump(config))
    api = LightkubeApi(NS, kubeconfig=kubeconfig, transport=recording)
    yield api, recording, server
    await api.aclose()


async def test_create_get_list_urls_and_bodies(wire: Any) -> None:
    api, recording, _ = wire
    created = await api.create(
        "Pod", {**pod(), "metadata": {"generateName": "rlm-", "labels": {"a": "b"}}}
    )
    request = recording.last()
    assert (request.method, request.url.path) == ("POST", PODS)
    assert request.headers["authorization"] == "Bearer t0k"
    sent = json.loads(request.content)
    assert sent["metadata"]["generateName"] == "rlm-" and sent["kind"] == "Pod"
    name = created["metadata"]["name"]
    assert name.startswith("rlm-") and created["metadata"]["resourceVersion"]

    assert (await api.get("Pod", name))["metadata"]["uid"] == created["metadata"]["uid"]
    assert (recording.last().method, recording.last().url.path) == ("GET", f"{PODS}/{name}")

    await api.create("Pod", pod("other", a="c"))
    found = await api.list("Pod", {"a": "b"})
    assert [p["metadata"]["name"] for p in found] == [name]
    request = recording.last()
    assert (request.method, request.url.path) == ("GET", PODS)
    assert query(request)["labelSelector"] == "a=b"


async def test_patch_is_a_merge_patch_guarded_by_resource_version(wire: Any) -> None:
    api, recording, _ = wire
    created = await api.create("Pod", pod(state="idle"))
    rv = created["metadata"]["resourceVersion"]
    patch = {"metadata": {"resourceVersion": rv, "labels": {"state": "leased"}}}
    patched = await api.patch("Pod", "p1", patch)
    request = recording.last()
    assert (request.method, request.url.path) == ("PATCH", f"{PODS}/p1")
    assert request.headers["content-type"] == "application/merge-patch+json"
    assert json.loads(request.content) == patch
    assert patched["metadata"]["labels"] == {"state": "leased"}
    assert int(patched["metadata"]["resourceVersion"]) > int(rv)
    # The same precondition again is stale now: 409, which the provider reads as "taken".
    with pytest.raises(KubeApiError) as stale:
        await api.patch("Pod", "p1", patch)
    assert stale.value.conflict and stale.value.status_code == 409
    with pytest.raises(KubeApiError) as missing:
        await api.patch("Pod", "nope", {"metadata": {"labels": {"x": "y"}}})
    assert missing.value.not_found


async def test_delete_cascades_in_the_background(wire: Any) -> None:
    api, recording, server = wire
    lease = await api.create(
        "Lease",
        {
            "apiVersion": "coordination.k8s.io/v1",
            "kind": "Lease",
            "metadata": {"name": "owner"},
            "spec": {"holderIdentity": "me", "leaseDurationSeconds": 30},
        },
    )
    assert (recording.last().method, recording.last().url.path) == ("POST", LEASES)
    reference = {
        "apiVersion": "coordination.k8s.io/v1",
        "kind": "Lease",
        "name": "owner",
        "uid": lease["metadata"]["uid"],
        "controller": True,
    }
    owned = pod("owned")
    owned["metadata"]["ownerReferences"] = [reference]
    await api.create("Pod", owned)
    await api.patch("Lease", "owner", {"spec": {"renewTime": "2026-11-25T12:00:00.000000Z"}})
    assert recording.last().url.path == f"{LEASES}/owner"
    await api.delete("Lease", "owner")
    request = recording.last()
    assert (request.method, request.url.path) == ("DELETE", f"{LEASES}/owner")
    assert query(request)["propagationPolicy"] == "Background"
    assert await api.list("Pod", {}) == []  # the garbage collector took the owned pod
    with pytest.raises(KubeApiError) as gone:
        await api.delete("Lease", "owner")
    assert gone.value.not_found
    assert server.list("Lease", NS)[0] == []


async def test_a_lease_is_sent_with_six_digit_micro_times_even_at_a_whole_second(
    wire: Any,
) -> None:
    """The typed model holds a MicroTime as a datetime, which msgspec writes without a
    fraction when its microseconds are 0; the API server refuses that (400: a MicroTime has
    exactly six fractional digits), so one create in a million would fail."""
    api, recording, server = wire
    whole = "2026-11-29T10:00:00.000000Z"
    spec = {"holderIdentity": "me", "leaseDurationSeconds": 30}
    lease = {
        "apiVersion": "coordination.k8s.io/v1",
        "kind": "Lease",
        "metadata": {"name": "owner"},
        "spec": {**spec, "acquireTime": whole, "renewTime": whole},
    }
    await api.create("Lease", lease)
    sent = json.loads(recording.last().content)["spec"]
    assert (sent["acquireTime"], sent["renewTime"]) == (whole, whole)
    assert server.get("Lease", NS, "owner")["spec"]["renewTime"] == whole


async def test_watch_streams_one_pods_events_from_a_resource_version(wire: Any) -> None:
    api, recording, server = wire
    created = await api.create("Pod", pod())
    await api.create("Pod", pod("unrelated"))
    events: list[tuple[str, str]] = []

    async def follow() -> None:
        watch = api.watch("Pod", name="p1", resource_version=created["metadata"]["resourceVersion"])
        async with contextlib.aclosing(watch):
            async for event_type, obj in watch:
                events.append((event_type, obj["status"].get("phase", "")))
                if event_type == "DELETED":
                    return

    follower = asyncio.create_task(follow())
    await asyncio.sleep(0.1)
    server.set_pod_status(NS, "p1", {"phase": "Running", "podIP": "10.0.0.7"})
    server.delete("Pod", NS, "p1")
    await asyncio.wait_for(follower, 5)
    assert events == [("MODIFIED", "Running"), ("DELETED", "Running")]
    request = next(r for r in recording.requests if "watch" in query(r))
    assert (request.method, request.url.path) == ("GET", PODS)
    assert query(request) == {
        "watch": "true",
        "fieldSelector": "metadata.name=p1",
        "resourceVersion": created["metadata"]["resourceVersion"],
        "timeoutSeconds": str(LightkubeApi.WATCH_SERVER_TIMEOUT),
    }


async def test_a_compacted_resource_version_is_a_410(wire: Any) -> None:
    api, _, server = wire
    await api.create("Pod", pod())
    server.fail_next("watch", "pods", 410, "Expired")
    watch = api.watch("Pod", name="p1", resource_version="1")
    with pytest.raises(KubeApiError) as expired:
        async with contextlib.aclosing(watch):
            async for _ in watch:
                pass
    assert expired.value.status_code == 410


async def test_an_unreachable_api_server_is_a_clear_error(tmp_path: Path) -> None:
    with socket.socket() as closed:
        closed.bind(("127.0.0.1", 0))
        port = closed.getsockname()[1]
    kubeconfig = tmp_path / "kubeconfig"
    kubeconfig.write_text(yaml.safe_dump(kubeconfig_dict(f"http://127.0.0.1:{port}", NS)))
    api = LightkubeApi(NS, kubeconfig=kubeconfig)
    try:
        with pytest.raises(KubeApiError, match=r"list Pod: .*(ConnectError|connect)") as error:
            await api.list("Pod", {})
        assert error.value.status_code == 0
    finally:
        await api.aclose()
