"""The fake Kubernetes API server's kinds and errors.

- ``ApiError``: a refused request, rendered as the apiserver's ``Status`` body.
- ``FieldError``: one cause of a 422 Invalid, worded as the apiserver's ``field.Error``.
- ``Kind`` and ``KINDS``: Pods, coordination.k8s.io Leases and Secrets.

What is checked on a write is in ``fake_kube_schema`` (decoding, 400) and
``fake_kube_validation`` (validation, 422); what a write does, in ``fake_kube_strategy``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

__all__ = [
    "KINDS",
    "ApiError",
    "FieldError",
    "JsonDict",
    "Kind",
    "bad_request",
    "kind_of",
    "no_such_resource",
]

JsonDict = dict[str, Any]


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


def go_value(value: Any) -> str:
    """A value as ``field.Error`` prints it: strings quoted, numbers and booleans bare, null,
    anything else as JSON."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return str(value)
    if value is None:
        return "null"
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False)


@dataclass(frozen=True)
class FieldError:
    """One ``field.Error``: `reason` is its type (``FieldValueInvalid``...), `body` what
    ``ErrorBody()`` says (``Invalid value: "x": why``), `field` its path."""

    reason: str
    field: str
    body: str

    @classmethod
    def invalid(cls, field: str, value: Any, detail: str) -> FieldError:
        return cls("FieldValueInvalid", field, f"Invalid value: {go_value(value)}: {detail}")

    @classmethod
    def required(cls, field: str, detail: str = "") -> FieldError:
        return cls("FieldValueRequired", field, f"Required value: {detail}".rstrip(": "))

    @classmethod
    def duplicate(cls, field: str, value: Any) -> FieldError:
        return cls("FieldValueDuplicate", field, f"Duplicate value: {go_value(value)}")

    @classmethod
    def forbidden(cls, field: str, detail: str) -> FieldError:
        return cls("FieldValueForbidden", field, f"Forbidden: {detail}")

    def __str__(self) -> str:
        return f"{self.field}: {self.body}"

    def cause(self) -> JsonDict:
        return {"reason": self.reason, "message": self.body, "field": self.field}


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

    def invalid(self, name: str, errors: list[FieldError]) -> ApiError:
        """422 Invalid as ``errors.NewInvalid`` words it: the group-qualified kind, the errors
        (bracketed when more than one), and one cause per error."""
        text = str(errors[0]) if len(errors) == 1 else f"[{', '.join(map(str, errors))}]"
        group_kind = f"{self.kind}.{self.group}" if self.group else self.kind
        details: JsonDict = {"name": name, "group": self.group, "kind": self.kind}
        if not self.group:
            del details["group"]  # omitempty
        details["causes"] = [error.cause() for error in errors]
        return ApiError(422, "Invalid", f'{group_kind} "{name}" is invalid: {text}', details)


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
