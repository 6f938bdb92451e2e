"""The fake Kubernetes API server's kinds and errors, and what it checks and fills in on writes.

Pure functions, no state (``fake_kube`` is the store that calls them):

- ``ApiError``: a refused request, rendered as the apiserver's ``Status`` body.
- ``Kind`` and ``KINDS``: Pods, coordination.k8s.io Leases and Secrets.
- The checks: DNS-1123 names, label syntax, a pod's required containers, and which pod spec
  fields an update may change (a simplified ``ValidatePodUpdate``).
- What the apiserver's registry strategies do to a create (``new_object``, ``initialize``) and
  to a PUT or PATCH (``updated``): server-owned and immutable metadata kept, a pod's status
  reset on create and changed only through its subresource, a secret's ``stringData`` folded.
"""

from __future__ import annotations

import base64
import copy
import re
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

__all__ = [
    "IMMUTABLE",
    "KINDS",
    "ApiError",
    "JsonDict",
    "Kind",
    "bad_request",
    "create_problems",
    "fold_string_data",
    "initialize",
    "keep_meta",
    "kind_of",
    "label_problems",
    "name_problem",
    "new_object",
    "no_such_resource",
    "pod_spec_problems",
    "pod_status_defaults",
    "updated",
]

JsonDict = dict[str, Any]
# Server-managed metadata a write may not change (silently kept, as for uid in Kubernetes).
IMMUTABLE = ("name", "namespace", "uid", "creationTimestamp", "generation")


class ApiError(Exception):
    """A refused request: `code` is the HTTP status, `reason` the Kubernetes StatusReason."""

    def __init__(self, code: int, reason: str, message: str, details: JsonDict | None = None):
        super().__init__(f"{code} {reason}: {message}")
        self.code, self.reason, self.message, self.details = code, reason, message, details

    def status(self) -> JsonDict:
        """The error as the apiserver's ``Status`` body."""
        body: JsonDict = {"kind": "Status", "apiVersion": "v1", "metadata": {}}
        body.update(status="Failure", message=self.message, reason=self.reason, code=self.code)
        if self.details:
            body["details"] = self.details
        return body


def bad_request(message: str) -> ApiError:
    return ApiError(400, "BadRequest", message)


def no_such_resource() -> ApiError:
    """404 for a path (or subresource) the server does not serve at all."""
    return ApiError(404, "NotFound", "the server could not find the requested resource")


@dataclass(frozen=True)
class Kind:
    kind: str
    group: str
    version: str
    plural: str
    field_labels: frozenset[str]  # the paths a field selector may use

    @property
    def api_version(self) -> str:
        return f"{self.group}/{self.version}" if self.group else self.version

    @property
    def qualified(self) -> str:
        """How error messages name the resource: ``pods``, ``leases.coordination.k8s.io``."""
        return f"{self.plural}.{self.group}" if self.group else self.plural

    def not_found(self, name: str) -> ApiError:
        details = {"name": name, "group": self.group, "kind": self.plural}
        return ApiError(404, "NotFound", f'{self.qualified} "{name}" not found', details)

    def conflict(self, name: str, why: str | None = None) -> ApiError:
        why = why or (
            "the object has been modified; please apply your changes to the latest version and "
            "try again"
        )
        message = f'Operation cannot be fulfilled on {self.qualified} "{name}": {why}'
        return ApiError(409, "Conflict", message, {"name": name, "kind": self.plural})

    def invalid(self, name: str, problems: list[str]) -> ApiError:
        text = problems[0] if len(problems) == 1 else f"[{', '.join(problems)}]"
        message = f'{self.kind} "{name}" is invalid: {text}'
        return ApiError(422, "Invalid", message, {"name": name, "kind": self.kind})


_META = frozenset({"metadata.name", "metadata.namespace"})
_POD_FIELDS = {"spec.nodeName", "spec.restartPolicy", "spec.serviceAccountName", "status.phase"}
KINDS: dict[str, Kind] = {
    k.plural: k
    for k in (
        Kind("Pod", "", "v1", "pods", _META | _POD_FIELDS | {"status.podIP"}),
        Kind("Lease", "coordination.k8s.io", "v1", "leases", _META),
        Kind("Secret", "", "v1", "secrets", _META | {"type"}),
    )
}


def kind_of(kind: str | Kind) -> Kind:
    """A kind by its name or plural, any case: ``"Pod"``, ``"pods"``, ``"lease"``."""
    if isinstance(kind, Kind):
        return kind
    for known in KINDS.values():
        if kind.lower() in (known.kind.lower(), known.plural):
            return known
    raise ValueError(f"the fake API server has no kind {kind!r}")


# ---------------------------------------------------------------------------- validation
_DNS_SUBDOMAIN = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")
_LABEL_NAME = re.compile(r"^[A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?$")
_LABEL_VALUE = re.compile(r"^([A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?)?$")


def name_problem(name: str) -> str | None:
    """Why `name` is no valid object name (a DNS-1123 subdomain), or None."""
    if len(name) <= 253 and _DNS_SUBDOMAIN.match(name):
        return None
    return (
        "a lowercase RFC 1123 subdomain must consist of lower case alphanumeric characters, "
        "'-' or '.', and must start and end with an alphanumeric character (at most 253)"
    )


def label_problems(labels: Any) -> list[str]:
    """What is wrong with `metadata.labels`, in the apiserver's words (empty: nothing)."""
    if labels is None:
        return []
    if not isinstance(labels, dict):
        return ["metadata.labels: Invalid value: must be a map of strings"]
    problems = []
    for key, value in labels.items():
        prefix, _, name = key.rpartition("/")
        if (prefix and name_problem(prefix)) or len(name) > 63 or not _LABEL_NAME.match(name):
            problems.append(f"metadata.labels: Invalid value: {key!r}: name part must be valid")
        if not isinstance(value, str) or len(value) > 63 or not _LABEL_VALUE.match(value):
            problems.append(
                f"metadata.labels: Invalid value: {value!r}: a valid label must be an empty "
                "string or consist of alphanumeric characters, '-', '_' or '.', and must start "
                "and end with an alphanumeric character (at most 63 characters)"
            )
    return problems


def create_problems(k: Kind, name: str, body: JsonDict) -> list[str]:
    """Why the apiserver would refuse to create `body` as `name` (422 Invalid)."""
    problems = label_problems((body.get("metadata") or {}).get("labels"))
    if not name:
        problems.insert(0, "metadata.name: Required value: name or generateName is required")
    elif why := name_problem(name):
        problems.insert(0, f'metadata.name: Invalid value: "{name}": {why}')
    if k.plural == "pods":
        containers = (body.get("spec") or {}).get("containers")
        if not isinstance(containers, list) or not containers:
            problems.append("spec.containers: Required value")
        for i, container in enumerate(containers or []):
            for field in ("name", "image"):
                if not (isinstance(container, dict) and container.get(field)):
                    problems.append(f"spec.containers[{i}].{field}: Required value")
    return problems


def pod_spec_problems(old: JsonDict, new: JsonDict) -> list[str]:
    """What a pod update may not change in the spec (a simplified ValidatePodUpdate)."""
    if new == old:
        return []
    probe = copy.deepcopy(new)  # the new spec with every allowed change undone
    for field in ("containers", "initContainers"):
        before, after = old.get(field) or [], probe.get(field) or []
        if isinstance(before, list) and isinstance(after, list) and len(before) == len(after):
            for b, a in zip(before, after, strict=True):
                if isinstance(b, dict) and isinstance(a, dict) and a.get("image"):
                    a["image"] = b.get("image")
    was, now = old.get("activeDeadlineSeconds"), new.get("activeDeadlineSeconds")
    if was != now:
        if not (isinstance(now, int) and now > 0 and (was is None or now <= was)):
            return ["spec.activeDeadlineSeconds: Invalid value: may only be set or decreased"]
        probe["activeDeadlineSeconds"] = was
        if was is None:
            del probe["activeDeadlineSeconds"]
    if probe != old:
        return [
            "spec: Forbidden: pod updates may not change fields other than "
            "`spec.containers[*].image`, `spec.initContainers[*].image` or "
            "`spec.activeDeadlineSeconds`"
        ]
    return []


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


# ---------------------------------------------------------------------------- strategies
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
    for server_owned in ("resourceVersion", "uid", "generation", "deletionTimestamp"):
        meta.pop(server_owned, None)
    return body


def initialize(k: Kind, body: JsonDict, namespace: str, name: str) -> JsonDict:
    """`body` (from ``new_object``) as created under `name`, or 422 Invalid."""
    if problems := create_problems(k, name, body):
        raise k.invalid(name, problems)
    meta = body["metadata"]
    meta.update(name=name, namespace=namespace, uid=str(uuid.uuid4()))
    meta["creationTimestamp"] = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
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
        raise k.invalid(name, ["the result is no object with object metadata"])
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
        problems = label_problems(meta.get("labels"))
        if k.plural == "pods":
            result.pop("status", None)
            if "status" in current:  # status is a subresource: a normal write ignores it
                result["status"] = copy.deepcopy(current["status"])
            old_spec, new_spec = current.get("spec") or {}, result.get("spec") or {}
            problems += pod_spec_problems(old_spec, new_spec)
            if old_spec != new_spec:
                meta["generation"] = int(meta.get("generation") or 0) + 1
        if k.plural == "secrets":
            fold_string_data(result)
        if problems:
            raise k.invalid(name, problems)
    result["metadata"]["resourceVersion"] = current["metadata"]["resourceVersion"]
    return result
