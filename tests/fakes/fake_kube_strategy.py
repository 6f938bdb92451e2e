"""What the apiserver's registry strategies do to a write, for the fake API server.

Pure functions, no state (``fake_kube`` is the store that calls them): what a create stores
(``new_object``, ``initialize``: server-owned metadata set, a pod's status reset), what a PUT
or PATCH stores (``updated``: server-owned and immutable metadata kept, a pod's status changed
only through its subresource, a secret's ``stringData`` folded into ``data``), and a pod's
graceful deletion (``deletion_grace``, ``mark_terminating``). Each write is validated
(``fake_kube_validation``, 422 Invalid) after its body was decoded (``fake_kube_schema``).
"""

from __future__ import annotations

import base64
import copy
import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

from tests.fakes.fake_kube_objects import JsonDict, Kind, bad_request
from tests.fakes.fake_kube_validation import (
    create_errors,
    label_errors,
    owner_reference_errors,
    pod_update_errors,
)

__all__ = [
    "DEFAULT_GRACE_SECONDS",
    "IMMUTABLE",
    "deletion_grace",
    "fold_string_data",
    "initialize",
    "keep_meta",
    "mark_terminating",
    "new_object",
    "pod_status_defaults",
    "timestamp",
    "updated",
]

# Server-managed metadata a write may not change (silently kept, as for uid in Kubernetes; an
# update can neither set nor clear a deletion).
IMMUTABLE = (
    "name",
    "namespace",
    "uid",
    "creationTimestamp",
    "generation",
    "deletionTimestamp",
    "deletionGracePeriodSeconds",
)
DEFAULT_GRACE_SECONDS = 30  # a pod spec's terminationGracePeriodSeconds, when it has none


def timestamp(moment: datetime | None = None) -> str:
    """A metav1.Time: RFC 3339, whole seconds, UTC."""
    return (moment or datetime.now(UTC)).strftime("%Y-%m-%dT%H:%M:%SZ")


def pod_status_defaults(status: Any) -> JsonDict:
    """A pod status as the apiserver serves it: Go's zero values for the container statuses'
    fields that are never omitted (lightkube's models require them)."""
    result: JsonDict = copy.deepcopy(status) if isinstance(status, dict) else {}
    zeros = {"image": "", "imageID": "", "ready": False, "restartCount": 0}
    for field in ("containerStatuses", "initContainerStatuses", "ephemeralContainerStatuses"):
        for entry in result.get(field) or []:
            if isinstance(entry, dict):
                entry.update({k: v for k, v in zeros.items() if k not in entry})
    return result


def fold_string_data(secret: JsonDict) -> None:
    """The apiserver merges a secret's write-only ``stringData`` into ``data`` (base64)."""
    string_data = secret.pop("stringData", None)
    if isinstance(string_data, dict):
        data = secret.setdefault("data", {})
        for key, value in string_data.items():
            data[key] = base64.b64encode(str(value).encode()).decode()


def keep_meta(meta: JsonDict, stored: JsonDict, fields: tuple[str, ...]) -> None:
    """Puts the stored values of `fields` back into `meta` (absent where they were absent)."""
    for field in fields:
        meta.pop(field, None)
        if field in stored["metadata"]:
            meta[field] = stored["metadata"][field]


def new_object(k: Kind, namespace: str, obj: JsonDict) -> JsonDict:
    """A copy of a create's body, checked against the URL, without server-owned metadata."""
    body = copy.deepcopy(obj)
    if not isinstance(body, dict) or not isinstance(body.setdefault("metadata", {}), dict):
        raise bad_request("the object must be a JSON object with object metadata")
    meta = body["metadata"]
    if meta.get("namespace", namespace) != namespace:
        raise bad_request(
            "the namespace of the provided object does not match the namespace sent on the request"
        )
    body["apiVersion"], body["kind"] = k.api_version, k.kind
    for server_owned in (*IMMUTABLE[2:], "resourceVersion"):
        meta.pop(server_owned, None)
    return body


def initialize(k: Kind, body: JsonDict, namespace: str, name: str) -> JsonDict:
    """`body` (from ``new_object``) as created under `name`, or 422 Invalid."""
    if errors := create_errors(k, name, body):
        raise k.invalid(name, errors)
    meta = body["metadata"]
    meta.update(name=name, namespace=namespace, uid=str(uuid.uuid4()))
    meta["creationTimestamp"] = timestamp()
    if k.plural == "pods":
        meta["generation"] = 1
        body["status"] = {"phase": "Pending"}  # the pod strategy resets status on create
    if k.plural == "secrets":
        fold_string_data(body)
    return body


def updated(k: Kind, current: JsonDict, new: Any, subresource: str | None) -> JsonDict:
    """What a PUT or PATCH turning `current` into `new` stores, at `current`'s resourceVersion
    (so an unchanged object compares equal); 409 Conflict on a stale one, 422 Invalid."""
    name = current["metadata"]["name"]
    if not isinstance(new, dict) or not isinstance(new.setdefault("metadata", {}), dict):
        raise bad_request("the object must be a JSON object with object metadata")
    wanted = new["metadata"].get("resourceVersion")
    if wanted and wanted != current["metadata"]["resourceVersion"]:
        raise k.conflict(name)
    if subresource == "status":
        result = copy.deepcopy(current)
        result["status"] = pod_status_defaults(new.get("status"))
    else:
        result = copy.deepcopy(new)
        meta = result["metadata"]
        keep_meta(meta, current, IMMUTABLE)
        result["apiVersion"], result["kind"] = k.api_version, k.kind
        errors = label_errors(meta.get("labels"))
        errors += owner_reference_errors(meta.get("ownerReferences"))
        if k.plural == "pods":
            result.pop("status", None)
            if "status" in current:  # status is a subresource: a normal write ignores it
                result["status"] = copy.deepcopy(current["status"])
            old_spec, new_spec = current.get("spec") or {}, result.get("spec") or {}
            errors += pod_update_errors(old_spec, new_spec)
            if old_spec != new_spec:
                meta["generation"] = int(meta.get("generation") or 0) + 1
        if k.plural == "secrets":
            fold_string_data(result)
        if errors:
            raise k.invalid(name, errors)
    result["metadata"]["resourceVersion"] = current["metadata"]["resourceVersion"]
    return result


def deletion_grace(k: Kind, obj: JsonDict, requested: int | None) -> int | None:
    """The grace period of a deletion (0: remove it now), or None when there is nothing to do
    (a deletion already pending, ending no later), as ``rest.BeforeDelete`` and the pod
    strategy's ``CheckGracefulDelete`` decide: only pods are deleted gracefully; a pending
    deletion may only be shortened; otherwise the request's period, else the spec's
    terminationGracePeriodSeconds (else 30), and none for a pod no node runs (unscheduled,
    or finished)."""
    if k.plural != "pods":
        return 0
    pending = obj["metadata"].get("deletionGracePeriodSeconds")
    if pending is not None:
        if pending == 0 or (requested is not None and requested < pending):
            return max(requested or 0, 0)
        return None
    spec, status = obj.get("spec") or {}, obj.get("status") or {}
    if not spec.get("nodeName") or status.get("phase") in ("Failed", "Succeeded"):
        return 0
    if requested is not None:
        return max(requested, 0)
    grace = spec.get("terminationGracePeriodSeconds")
    return DEFAULT_GRACE_SECONDS if grace is None else max(int(grace), 0)


def mark_terminating(obj: JsonDict, grace: int) -> JsonDict:
    """`obj` with a graceful deletion's mark: deletionTimestamp (when the grace ends) and
    deletionGracePeriodSeconds; its generation bumped the first time."""
    result = copy.deepcopy(obj)
    meta = result["metadata"]
    if meta.get("deletionTimestamp") is None and meta.get("generation"):
        meta["generation"] += 1
    meta["deletionTimestamp"] = timestamp(datetime.now(UTC) + timedelta(seconds=grace))
    meta["deletionGracePeriodSeconds"] = grace
    return result
