"""The Kubernetes REST API of the fake API server: requests to ``FakeKubeApiServer`` calls.

``KubeRouter.handle`` takes one request (method, path, query, headers, body) and answers with a
``KubeResponse``; ``fake_kube_http`` serves it in-process and over HTTP. Routes, for ``pods``,
``secrets`` (``/api/v1``) and ``leases`` (``/apis/coordination.k8s.io/v1``)::

    GET    .../namespaces/{ns}/{plural}            list; watch with ?watch=true|1
    POST   .../namespaces/{ns}/{plural}            create
    DELETE .../namespaces/{ns}/{plural}            deletecollection
    GET|PATCH|PUT|DELETE .../namespaces/{ns}/{plural}/{name}
    GET|PATCH|PUT .../namespaces/{ns}/pods/{name}/status
    GET    /api/v1/{plural}, /apis/.../{plural}     every namespace (list, watch)
    GET    /version, /api, /apis                    minimal discovery (lightkube needs none)

Every authenticated request is recorded in the store's ``audit_log`` as (RBAC verb, group,
resource, namespace, name), then may hit a fault from ``fail_next``. What lightkube 1.0.1
sends, which this layer accepts: delete as ``DELETE`` with query parameters
``propagationPolicy``, ``gracePeriodSeconds`` and ``dryRun``, and no body (a ``DeleteOptions``
body with ``preconditions``, ``propagationPolicy`` or ``gracePeriodSeconds`` is honoured
instead); create, update and patch with ``fieldValidation`` (Ignore, Warn, the default, or
Strict; each warning a ``Warning: 299 - "..."`` header) and ``fieldManager`` (ignored); patch
with the ``lightkube.types.PatchType`` value as Content-Type; watch as ``GET`` on the
collection with ``watch=true``, ``resourceVersion``, ``timeoutSeconds``, ``labelSelector``,
``fieldSelector``, reading one JSON event per line. Errors are ``Status`` bodies with
Content-Type exactly ``application/json`` (otherwise lightkube raises a bare httpx error
instead of ``ApiError``). Not modelled: ``dryRun`` (400), paging (``limit`` is ignored),
authentication other than one bearer token.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from tests.fakes.fake_kube import AuditEntry, FakeKubeApiServer, Watch
from tests.fakes.fake_kube_objects import (
    KINDS,
    ApiError,
    JsonDict,
    Kind,
    bad_request,
    no_such_resource,
)

__all__ = ["KubeResponse", "KubeRouter", "encode_event"]

# lightkube needs no discovery; these minimal answers are for other clients' first requests.
_LEASES = {"groupVersion": "coordination.k8s.io/v1", "version": "v1"}
_DISCOVERY: dict[str, JsonDict] = {
    "/version": {"major": "1", "minor": "33", "gitVersion": "v1.33.0-fake", "platform": "fake"},
    "/api": {"kind": "APIVersions", "versions": ["v1"]},
    "/apis": {
        "kind": "APIGroupList",
        "groups": [
            {"name": "coordination.k8s.io", "versions": [_LEASES], "preferredVersion": _LEASES}
        ],
    },
}


@dataclass
class KubeResponse:
    status: int
    body: bytes = b""
    watch: Watch | None = None  # when set, the body is this watch's events, one JSON per line
    content_type: str = "application/json"
    warnings: list[str] = field(default_factory=list)

    def headers(self) -> list[tuple[str, str]]:
        """Content-Type, and one Warning header per warning (as the apiserver quotes them)."""
        quoted = [w.replace("\\", "\\\\").replace('"', '\\"') for w in self.warnings]
        warnings = [("Warning", f'299 - "{text}"') for text in quoted]
        return [("Content-Type", self.content_type), *warnings]


def _compact(obj: Any) -> bytes:
    return json.dumps(obj, separators=(",", ":")).encode()


def _json(status: int, obj: Any, warnings: list[str] | None = None) -> KubeResponse:
    return KubeResponse(status, _compact(obj), warnings=list(warnings or []))


def encode_event(event: JsonDict) -> bytes:
    """One watch event as a line of the stream."""
    return _compact(event) + b"\n"


class KubeRouter:
    """Requests to store calls; `token`, when set, is the one bearer token accepted."""

    def __init__(self, server: FakeKubeApiServer, token: str | None = None) -> None:
        self.server, self.token = server, token

    def handle(
        self,
        method: str,
        path: str,
        query: Mapping[str, str],
        headers: Mapping[str, str],
        body: bytes,
    ) -> KubeResponse:
        """One request: `path` URL-decoded, `query` one value per parameter."""
        lowered = {k.lower(): v for k, v in headers.items()}
        if self.token is not None and lowered.get("authorization") != f"Bearer {self.token}":
            return _json(401, ApiError(401, "Unauthorized", "Unauthorized").status())
        try:
            return self._route(method.upper(), path, query, lowered, body)
        except ApiError as exc:
            return _json(exc.code, exc.status())
        except Exception as exc:  # a bug in the fake or in a test's hook: show it to the client
            error = ApiError(500, "InternalError", f"{type(exc).__name__}: {exc}")
            return _json(500, error.status())

    def _route(
        self, method: str, path: str, query: Mapping[str, str], headers: JsonDict, body: bytes
    ) -> KubeResponse:
        path = "/" + path.strip("/")
        if path in _DISCOVERY and method == "GET":
            return _json(200, _DISCOVERY[path])
        kind, namespace, name, sub = _parse_path(path)
        verb = _verb(method, namespace, name, sub, query)
        resource = f"{kind.plural}/{sub}" if sub else kind.plural
        self.server.record(AuditEntry(verb, kind.group, resource, namespace, name))
        if fault := self.server.take_fault(verb, resource):
            raise fault
        if query.get("dryRun"):
            raise bad_request("dryRun is not modelled by the fake API server")
        store, labels, fields = self.server, query.get("labelSelector"), query.get("fieldSelector")
        if verb == "list":
            return _json(200, _listing(kind, *store.list(kind, namespace, labels, fields)))
        if verb == "watch":
            since, timeout = query.get("resourceVersion"), _number(query, "timeoutSeconds")
            watch = store.watch(kind, namespace, labels, fields, since, timeout)
            return KubeResponse(200, watch=watch)
        assert namespace is not None  # _verb allows nothing else across namespaces
        if verb == "get":  # for .../status too: the apiserver answers with the whole pod
            assert name is not None
            return _json(200, store.get(kind, namespace, name))
        if verb in ("create", "patch", "update"):
            # The apiserver's default: unknown fields are dropped, each with a warning.
            mode = query.get("fieldValidation") or "Warn"
            content_type = headers.get("content-type", "")
            return self._write(verb, kind, namespace, name, sub, mode, content_type, _decode(body))
        options = _decode(body) if body.strip() else {}
        if not isinstance(options, dict):
            raise bad_request("DeleteOptions must be a JSON object")
        policy, grace = _propagation(query, options), _grace(query, options)
        if verb == "deletecollection" or name is None:
            gone = store.delete_collection(
                kind,
                namespace,
                labels,
                fields,
                propagation_policy=policy,
                grace_period_seconds=grace,
            )
            return _json(200, _listing(kind, gone, store.resource_version))
        deleted = store.delete(
            kind,
            namespace,
            name,
            propagation_policy=policy,
            preconditions=options.get("preconditions"),
            grace_period_seconds=grace,
        )
        return _json(200, deleted)

    def _write(
        self,
        verb: str,
        kind: Kind,
        namespace: str,
        name: str | None,
        sub: str | None,
        mode: str,
        content_type: str,
        obj: Any,
    ) -> KubeResponse:
        """A create, patch or update, its body decoded as `mode` (fieldValidation) says."""
        store, warnings = self.server, list[str]()
        if verb == "create":
            created = store.create(kind, namespace, obj, field_validation=mode, warnings=warnings)
            return _json(201, created, warnings)
        assert name is not None
        if verb == "patch":
            written = store.patch(
                kind,
                namespace,
                name,
                obj,
                content_type,
                subresource=sub,
                field_validation=mode,
                warnings=warnings,
            )
        else:
            written = store.replace(
                kind,
                namespace,
                name,
                obj,
                subresource=sub,
                field_validation=mode,
                warnings=warnings,
            )
        return _json(200, written, warnings)


def _listing(kind: Kind, items: list[JsonDict], rv: str) -> JsonDict:
    meta = {"resourceVersion": rv}
    return {
        "kind": f"{kind.kind}List",
        "apiVersion": kind.api_version,
        "metadata": meta,
        "items": items,
    }


def _parse_path(path: str) -> tuple[Kind, str | None, str | None, str | None]:
    """(kind, namespace, name, subresource) of a resource path; 404 for anything else."""
    parts = path.strip("/").split("/")
    if parts[:2] == ["api", "v1"]:
        group, rest = "", parts[2:]
    elif len(parts) >= 3 and parts[0] == "apis" and parts[2] == "v1":
        group, rest = parts[1], parts[3:]
    else:
        raise no_such_resource()
    namespace = None
    if len(rest) >= 3 and rest[0] == "namespaces":
        namespace, rest = rest[1], rest[2:]
    kind = KINDS.get(rest[0]) if rest else None
    across = namespace is None and len(rest) > 1  # only collections span namespaces
    if kind is None or kind.group != group or len(rest) > 3 or across:
        raise no_such_resource()
    name, sub = [*rest[1:], None, None][:2]
    if sub is not None and (sub != "status" or kind.plural != "pods"):
        raise no_such_resource()
    return kind, namespace, name, sub


def _verb(
    method: str, namespace: str | None, name: str | None, sub: str | None, query: Mapping[str, str]
) -> str:
    """The RBAC verb of a request, or 405 when the route has no such method."""
    if name is None:
        verbs = {"GET": "watch" if query.get("watch") in ("true", "1") else "list"}
        if namespace is not None:
            verbs.update(POST="create", DELETE="deletecollection")
    else:
        verbs = {"GET": "get", "PATCH": "patch", "PUT": "update"}
        if sub is None:
            verbs["DELETE"] = "delete"
    if method not in verbs:
        message = "the server does not allow this method on the requested resource"
        raise ApiError(405, "MethodNotAllowed", message)
    return verbs[method]


def _decode(body: bytes) -> Any:
    try:
        return json.loads(body)
    except ValueError as exc:
        raise bad_request(f"the body is no valid JSON: {exc}") from None


def _number(query: Mapping[str, str], key: str) -> float | None:
    value = query.get(key)
    if value is None or value == "":
        return None
    try:
        return float(value)
    except ValueError:
        raise bad_request(f"{key}: not a number: {value!r}") from None


def _grace(query: Mapping[str, str], options: JsonDict) -> int | None:
    """DeleteOptions.gracePeriodSeconds: from the body when it has one, else the query."""
    value: Any = options.get("gracePeriodSeconds", query.get("gracePeriodSeconds"))
    if value is None or value == "":
        return None
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    if isinstance(value, str) and value.lstrip("-").isdigit():
        return int(value)
    raise bad_request(f"gracePeriodSeconds: not an integer: {value!r}")


def _propagation(query: Mapping[str, str], options: JsonDict) -> str | None:
    policy = options.get("propagationPolicy") or query.get("propagationPolicy")
    orphan = options.get("orphanDependents") is True or query.get("orphanDependents") == "true"
    return "Orphan" if policy is None and orphan else policy
