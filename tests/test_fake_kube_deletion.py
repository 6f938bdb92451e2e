"""Graceful pod deletion in the fake API server and its kubelet, as in Kubernetes.

A pod a node runs is not removed by DELETE: it gets deletionTimestamp and
deletionGracePeriodSeconds, its kubelet sends SIGTERM, SIGKILL after the grace, reports the
exit, and deletes it again with grace 0; only then is it gone (watch: MODIFIED, ..., DELETED).
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import pytest

from tests.fakes.fake_kube import ApiError, FakeKubeApiServer
from tests.fakes.fake_kube_http import KubeRouter
from tests.fakes.fake_kubelet import STUBBORN, FakeKubelet

pytestmark = pytest.mark.timeout(30)

NS = "sandboxes"


def pod(name: str, node: str | None = "node-1", **spec: Any) -> dict[str, Any]:
    body: dict[str, Any] = {
        "metadata": {"name": name},
        "spec": {"containers": [{"name": "agent", "image": "stubborn:1"}], **spec},
    }
    if node:
        body["spec"]["nodeName"] = node
    return body


def events(watch: Any) -> list[tuple[str, dict[str, Any]]]:
    """What the watch has now (it is not waited for)."""
    seen = []
    while (event := watch.get(timeout=0)) is not None:
        seen.append((event["type"], event["object"]))
    return seen


def wait_for(check: Any, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.02)


def test_a_bound_pod_is_marked_and_goes_only_when_deleted_again_with_grace_zero() -> None:
    api = FakeKubeApiServer()
    terminating: list[str] = []
    api.on_terminate("Pod", lambda obj: terminating.append(obj["metadata"]["name"]))
    created = api.create("Pod", NS, pod("p", terminationGracePeriodSeconds=7))
    watch = api.watch("Pod", NS, resource_version=created["metadata"]["resourceVersion"])
    marked = api.delete("Pod", NS, "p")
    meta = marked["metadata"]
    assert meta["deletionGracePeriodSeconds"] == 7 and meta["deletionTimestamp"]
    assert meta["generation"] == 2 and terminating == ["p"]
    assert api.get("Pod", NS, "p") == marked  # still there, as GET shows it
    assert [(t, o["metadata"].get("deletionTimestamp")) for t, o in events(watch)] == [
        ("MODIFIED", meta["deletionTimestamp"])
    ]
    # Pending: a second delete changes nothing; an update can neither clear nor move it.
    assert api.delete("Pod", NS, "p") == marked and events(watch) == []
    unmark = {"metadata": {"deletionTimestamp": None, "labels": {"a": "b"}}}
    assert (
        api.patch("Pod", NS, "p", unmark)["metadata"]["deletionTimestamp"]
        == meta["deletionTimestamp"]
    )
    with pytest.raises(ApiError) as taken:
        api.create("Pod", NS, pod("p"))
    assert taken.value.reason == "AlreadyExists"
    # Only a shorter grace is taken; 0 removes it (what the kubelet sends once it stopped it).
    assert (
        api.delete("Pod", NS, "p", grace_period_seconds=9)["metadata"]["deletionGracePeriodSeconds"]
        == 7
    )
    shorter = api.delete("Pod", NS, "p", grace_period_seconds=2)
    assert shorter["metadata"]["deletionGracePeriodSeconds"] == 2
    api.delete("Pod", NS, "p", grace_period_seconds=0, preconditions={"uid": meta["uid"]})
    assert [t for t, _ in events(watch)] == ["MODIFIED", "MODIFIED", "DELETED"]
    with pytest.raises(ApiError) as missing:
        api.get("Pod", NS, "p")
    assert missing.value.code == 404
    assert terminating == ["p", "p"]  # its node was told of the shorter grace too


def test_the_grace_period_and_what_goes_at_once() -> None:
    api = FakeKubeApiServer()
    api.create("Pod", NS, pod("default"))
    assert api.delete("Pod", NS, "default")["metadata"]["deletionGracePeriodSeconds"] == 30
    # Over HTTP: gracePeriodSeconds from the query, or from a DeleteOptions body.
    router = KubeRouter(api)
    for name, query, body in (
        ("q", {"gracePeriodSeconds": "12"}, b""),
        ("b", {}, b'{"gracePeriodSeconds": 4}'),
    ):
        api.create("Pod", NS, pod(name, terminationGracePeriodSeconds=20))
        answer = router.handle("DELETE", f"/api/v1/namespaces/{NS}/pods/{name}", query, {}, body)
        assert answer.status == 200
        grace = json.loads(answer.body)["metadata"]["deletionGracePeriodSeconds"]
        assert grace == int(query.get("gracePeriodSeconds") or 4)
    bad = router.handle(
        "DELETE", f"/api/v1/namespaces/{NS}/pods/q", {"gracePeriodSeconds": "x"}, {}, b""
    )
    assert bad.status == 400
    # No node runs it (unscheduled, or finished): gone at once, as is any other kind.
    api.create("Pod", NS, pod("unscheduled", node=None))
    api.create("Pod", NS, pod("finished"))
    api.set_pod_status(NS, "finished", {"phase": "Failed"})
    api.create("Lease", NS, {"metadata": {"name": "l"}})
    for kind, name in (("Pod", "unscheduled"), ("Pod", "finished"), ("Lease", "l")):
        api.delete(kind, NS, name)
        with pytest.raises(ApiError):
            api.get(kind, NS, name)


def test_the_kubelet_sends_sigterm_then_sigkill_after_the_grace_then_deletes_the_pod(
    tmp_path: Path,
) -> None:
    api = FakeKubeApiServer()
    kubelet = FakeKubelet(api, tmp_path, images={"stubborn:1": STUBBORN})
    try:
        created = api.create("Pod", NS, pod("p", node=None, terminationGracePeriodSeconds=1))
        wait_for(lambda: kubelet.running_processes() == 1)
        wait_for(lambda: any(tmp_path.rglob("ignoring-sigterm")))  # SIGTERM is ignored from now
        bound = api.get("Pod", NS, "p")
        assert bound["spec"]["nodeName"] == kubelet.node_name  # scheduled: deleted gracefully
        watch = api.watch("Pod", NS, resource_version=created["metadata"]["resourceVersion"])
        asked = time.monotonic()
        api.delete("Pod", NS, "p")
        # It ignores SIGTERM: it runs on, and the pod stays, until the SIGKILL at the grace.
        assert kubelet.running_processes() == 1
        assert api.get("Pod", NS, "p")["metadata"]["deletionTimestamp"]
        wait_for(lambda: api.list("Pod", NS)[0] == [])
        assert time.monotonic() - asked >= 0.9  # not killed before its grace ran out
        assert kubelet.running_processes() == 0
        seen = events(watch)  # bound, ContainerCreating, Running, then its deletion:
        assert [t for t, _ in seen][-3:] == ["MODIFIED", "MODIFIED", "DELETED"]
        marked, exited, last = (o for _, o in seen[-3:])
        assert marked["metadata"]["deletionGracePeriodSeconds"] == 1
        assert "terminated" not in marked["status"]["containerStatuses"][0]["state"]
        state = exited["status"]["containerStatuses"][0]["state"]
        assert state["terminated"]["exitCode"] == 137  # 128 + SIGKILL: it did not stop itself
        assert last["status"] == exited["status"]
    finally:
        kubelet.close()


def test_held_terminations_leave_the_pod_terminating_and_running(tmp_path: Path) -> None:
    api = FakeKubeApiServer()
    kubelet = FakeKubelet(api, tmp_path, images={"stubborn:1": STUBBORN})
    try:
        api.create("Pod", NS, pod("p", node=None, terminationGracePeriodSeconds=1))
        wait_for(lambda: kubelet.running_processes() == 1)
        wait_for(lambda: any(tmp_path.rglob("ignoring-sigterm")))  # SIGTERM is ignored from now
        with kubelet.hold_terminations():
            api.delete("Pod", NS, "p")
            time.sleep(0.3)
            assert kubelet.running_processes() == 1
            assert api.get("Pod", NS, "p")["metadata"]["deletionTimestamp"]
        wait_for(lambda: api.list("Pod", NS)[0] == [])
        assert kubelet.running_processes() == 0
    finally:
        kubelet.close()
