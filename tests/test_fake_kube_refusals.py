"""What the fake API server refuses, as a real one does: the status, the reason and the words.

Each refusal is sent over real HTTP as raw JSON (a typed client could not even send most of
them) and checked against the Status body: 400 BadRequest for a body that does not decode into
the kind's types, 422 Invalid with the causes field.Error gives. The messages are the
apiserver's (Go's json and time packages, resource.ParseQuantity, apimachinery validation).
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any

import httpx2
import pytest

from tests.fakes.fake_kube import ApiError, FakeKubeApiServer
from tests.fakes.fake_kube_http import FakeKubeHttpServer

pytestmark = pytest.mark.timeout(30)

NS = "sandboxes"
PODS = f"/api/v1/namespaces/{NS}/pods"
LEASES = f"/apis/coordination.k8s.io/v1/namespaces/{NS}/leases"
DNS_LABEL = (
    "a lowercase RFC 1123 label must consist of lower case alphanumeric characters or '-', and "
    "must start and end with an alphanumeric character (e.g. 'my-name',  or '123-abc', regex "
    "used for validation is '[a-z0-9]([-a-z0-9]*[a-z0-9])?')"
)
QUANTITY = (
    "quantities must match the regular expression '^([+-]?[0-9.]+)([eEinumkKMGTP]*[-+]?[0-9]*)$'"
)
LEASE_REF = {"apiVersion": "coordination.k8s.io/v1", "kind": "Lease", "name": "a", "uid": "u-a"}


def pod(name: str = "p", *containers: dict[str, Any], **meta: Any) -> dict[str, Any]:
    containers = containers or ({"name": "agent", "image": "rlm-sandbox:1"},)
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name, **meta},
        "spec": {"containers": list(containers)},
    }


def lease(name: str = "l", **spec: Any) -> dict[str, Any]:
    return {
        "apiVersion": "coordination.k8s.io/v1",
        "kind": "Lease",
        "metadata": {"name": name},
        "spec": spec,
    }


@pytest.fixture
async def http() -> AsyncIterator[tuple[httpx2.AsyncClient, FakeKubeApiServer]]:
    with FakeKubeHttpServer() as server:
        headers = {"Authorization": f"Bearer {server.token}"}
        async with httpx2.AsyncClient(
            base_url=server.url, headers=headers, trust_env=False
        ) as client:
            yield client, server.api


def refused(answer: httpx2.Response, code: int, reason: str) -> dict[str, Any]:
    """The Status body of a refusal, its shape checked (the fields a real one has)."""
    assert answer.status_code == code, answer.text
    status: dict[str, Any] = answer.json()
    assert (status["kind"], status["apiVersion"], status["status"]) == ("Status", "v1", "Failure")
    assert (status["code"], status["reason"]) == (code, reason)
    assert status["metadata"] == {}
    return status


def causes(status: dict[str, Any]) -> list[tuple[str, str, str]]:
    return [(c["reason"], c["field"], c["message"]) for c in status["details"]["causes"]]


# -- 400: the body does not decode into the kind's types ---------------------------------


@pytest.mark.parametrize(
    ("path", "body", "why"),
    [
        (
            LEASES,
            lease(leaseDurationSeconds="ten"),
            "json: cannot unmarshal string into Go struct field LeaseSpec.spec."
            "leaseDurationSeconds of type int32",
        ),
        (
            LEASES,
            lease(leaseDurationSeconds=2**31),
            "json: cannot unmarshal number 2147483648 into Go struct field LeaseSpec.spec."
            "leaseDurationSeconds of type int32",
        ),
        (
            PODS,
            {**pod(), "spec": [1]},
            "json: cannot unmarshal array into Go struct field Pod.spec of type v1.PodSpec",
        ),
        (
            PODS,
            pod("p", {"name": "agent", "image": "i", "resources": {"limits": {"memory": "lots"}}}),
            QUANTITY,
        ),
        (
            PODS,
            pod("p", {"name": "agent", "image": "i", "resources": {"requests": {"cpu": "1MM"}}}),
            "unable to parse quantity's suffix",
        ),
        (
            LEASES,
            lease(renewTime="2026-11-29T10:00:00Z"),
            'parsing time "2026-11-29T10:00:00Z" as "2006-01-02T15:04:05.000000Z07:00": cannot '
            'parse "Z" as ".000000"',
        ),
        (
            LEASES,
            lease(acquireTime="2026-11-29T10:00:00.123Z"),
            'parsing time "2026-11-29T10:00:00.123Z" as "2006-01-02T15:04:05.000000Z07:00": '
            'cannot parse ".123Z" as ".000000"',
        ),
        (
            LEASES,
            lease(renewTime=1764410400),
            "json: cannot unmarshal number into Go struct field LeaseSpec.spec.renewTime of "
            "type string",
        ),
    ],
    ids=[
        "int32-as-string",
        "int32-overflow",
        "struct-as-array",
        "quantity-lots",
        "quantity-suffix",
        "microtime-without-fraction",
        "microtime-milliseconds",
        "microtime-as-number",
    ],
)
async def test_a_body_that_does_not_decode_is_a_bad_request(
    http: Any, path: str, body: dict[str, Any], why: str
) -> None:
    client, api = http
    status = refused(await client.post(path, json=body), 400, "BadRequest")
    kind = body["kind"]
    assert status["message"] == f'{kind} in version "v1" cannot be handled as a {kind}: {why}'
    assert "details" not in status
    assert api.list(kind, NS)[0] == []


async def test_what_does_decode_is_stored_the_micro_time_with_its_six_digits(http: Any) -> None:
    client, _ = http
    body = lease(renewTime="2026-11-29T10:00:00.000000Z", leaseDurationSeconds=10)
    created = await client.post(LEASES, json=body)
    assert created.status_code == 201, created.text
    assert created.json()["spec"]["renewTime"] == "2026-11-29T10:00:00.000000Z"
    resources = {"limits": {"memory": "1Gi", "cpu": 0.5}, "requests": {"cpu": "250m"}}
    fine = pod("q", {"name": "agent", "image": "i", "resources": resources})
    assert (await client.post(PODS, json=fine)).status_code == 201


async def test_unknown_fields_are_refused_when_strict_dropped_with_a_warning_by_default(
    http: Any,
) -> None:
    client, api = http
    body = pod("p", {"name": "agent", "image": "i", "imagePullPolice": "Always"}, colour="red")
    strict = await client.post(PODS, params={"fieldValidation": "Strict"}, json=body)
    message = refused(strict, 400, "BadRequest")["message"]
    assert message == (
        'Pod in version "v1" cannot be handled as a Pod: strict decoding error: unknown field '
        '"metadata.colour", unknown field "spec.containers[0].imagePullPolice"'
    )
    assert api.list("Pod", NS)[0] == []
    warned = await client.post(PODS, json=body)  # the default: Warn
    assert warned.status_code == 201
    assert warned.headers.get_list("warning") == [
        '299 - "unknown field \\"metadata.colour\\""',
        '299 - "unknown field \\"spec.containers[0].imagePullPolice\\""',
    ]
    stored = api.get("Pod", NS, "p")
    assert "colour" not in stored["metadata"]
    assert "imagePullPolice" not in stored["spec"]["containers"][0]
    # Patches are decoded too (their result); Ignore drops silently.
    patch = {"spec": {"surprise": 1}}
    headers = {"Content-Type": "application/merge-patch+json"}
    ignored = await client.patch(
        f"{PODS}/p",
        params={"fieldValidation": "Ignore"},
        content=json.dumps(patch),
        headers=headers,
    )
    assert ignored.status_code == 200 and "warning" not in ignored.headers
    strict = await client.patch(
        f"{PODS}/p",
        params={"fieldValidation": "Strict"},
        content=json.dumps(patch),
        headers=headers,
    )
    assert 'unknown field "spec.surprise"' in refused(strict, 400, "BadRequest")["message"]
    # Direct calls (tests, the fake kubelet) are strict: a typo is an error, not a warning.
    with pytest.raises(ApiError) as typo:
        api.create("Lease", NS, {"metadata": {"name": "l"}, "spec": {"holder": "me"}})
    assert typo.value.code == 400 and 'unknown field "spec.holder"' in typo.value.message


# -- 422: decoded, but invalid -------------------------------------------------------------


async def test_an_invalid_container_name_is_invalid_with_its_cause(http: Any) -> None:
    client, _ = http
    body = pod("p", {"name": "Agent_1", "image": "i"})
    status = refused(await client.post(PODS, json=body), 422, "Invalid")
    cause = f'Invalid value: "Agent_1": {DNS_LABEL}'
    assert causes(status) == [("FieldValueInvalid", "spec.containers[0].name", cause)]
    assert status["message"] == f'Pod "p" is invalid: spec.containers[0].name: {cause}'
    assert status["details"]["name"] == "p" and status["details"]["kind"] == "Pod"
    assert "group" not in status["details"]  # the core group: omitted


async def test_duplicate_container_names_are_invalid(http: Any) -> None:
    client, _ = http
    body = pod("p", {"name": "agent", "image": "i"}, {"name": "agent", "image": "j"})
    body["spec"]["initContainers"] = [{"name": "agent", "image": "k"}]
    status = refused(await client.post(PODS, json=body), 422, "Invalid")
    assert causes(status) == [
        ("FieldValueDuplicate", "spec.containers[1].name", 'Duplicate value: "agent"'),
        ("FieldValueDuplicate", "spec.initContainers[0].name", 'Duplicate value: "agent"'),
    ]
    # Two errors: the message lists them in brackets, as an aggregate prints.
    assert status["message"].startswith(
        'Pod "p" is invalid: [spec.containers[1].name: Duplicate value: "agent", '
    )


async def test_two_controller_owner_references_are_invalid(http: Any) -> None:
    client, api = http
    refs = [
        {**LEASE_REF, "controller": True},
        {**LEASE_REF, "name": "b", "uid": "u-b", "controller": True},
    ]
    status = refused(await client.post(PODS, json=pod(ownerReferences=refs)), 422, "Invalid")
    ((reason, field, message),) = causes(status)
    assert (reason, field) == ("FieldValueInvalid", "metadata.ownerReferences")
    assert message.startswith('Invalid value: [{"apiVersion":"coordination.k8s.io/v1",')
    assert message.endswith(
        ': Only one reference can have Controller set to true. Found "true" in references for '
        "Lease/a and Lease/b"
    )
    # The same through a patch of a stored pod (what a lease of an idle pod sends).
    api.create("Pod", NS, pod("q", ownerReferences=refs[:1]))
    patch = {"metadata": {"ownerReferences": refs}}
    headers = {"Content-Type": "application/merge-patch+json"}
    answer = await client.patch(f"{PODS}/q", content=json.dumps(patch), headers=headers)
    assert causes(refused(answer, 422, "Invalid"))[0][1] == "metadata.ownerReferences"


@pytest.mark.parametrize(
    ("missing", "message"),
    [
        ("uid", 'Invalid value: "": uid must not be empty'),
        ("name", 'Invalid value: "": name must not be empty'),
        ("kind", 'Invalid value: "": kind must not be empty'),
        ("apiVersion", 'Invalid value: "": version must not be empty'),
    ],
)
async def test_an_owner_reference_without_uid_name_kind_or_version_is_invalid(
    http: Any, missing: str, message: str
) -> None:
    client, _ = http
    ref = {k: v for k, v in LEASE_REF.items() if k != missing}
    body = lease("l")
    body["metadata"]["ownerReferences"] = [ref]
    status = refused(await client.post(LEASES, json=body), 422, "Invalid")
    field = f"metadata.ownerReferences.{missing}"  # no index: the apiserver names the list
    assert causes(status) == [("FieldValueInvalid", field, message)]
    assert status["message"] == f'Lease.coordination.k8s.io "l" is invalid: {field}: {message}'
    assert status["details"]["group"] == "coordination.k8s.io"
    assert status["details"]["kind"] == "Lease"


async def test_names_labels_and_required_fields_in_the_apiservers_words(http: Any) -> None:
    client, _ = http
    status = refused(await client.post(PODS, json=pod("Upper")), 422, "Invalid")
    ((_, field, message),) = causes(status)
    assert field == "metadata.name"
    assert message.startswith('Invalid value: "Upper": a lowercase RFC 1123 subdomain must')
    body = pod("p", {"name": "agent"}, labels={"app": "not valid!"})
    status = refused(await client.post(PODS, json=body), 422, "Invalid")
    found = causes(status)
    assert ("FieldValueRequired", "spec.containers[0].image", "Required value") in found
    (label,) = [message for _, field, message in found if field == "metadata.labels"]
    assert label.startswith('Invalid value: "not valid!": a valid label must be an empty string')
    nameless = {"apiVersion": "v1", "kind": "Secret", "metadata": {}}
    status = refused(
        await client.post(f"/api/v1/namespaces/{NS}/secrets", json=nameless), 422, "Invalid"
    )
    assert causes(status) == [
        (
            "FieldValueRequired",
            "metadata.name",
            "Required value: name or generateName is required",
        )
    ]
