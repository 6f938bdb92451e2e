"""What tests observe and steer of the fake Kubernetes API server, beside the API itself.

``FakeKubeApiServer`` inherits ``Instrumentation``: hooks run after a create, the start of a
graceful deletion, or a removal (outside the lock, in the thread that made the write: this is
how tests and the fake kubelet play the controllers), the audit log of the requests the HTTP
layer handled, and faults injected into the next request.
"""

from __future__ import annotations

import copy
import threading
from collections import defaultdict
from collections.abc import Callable
from typing import NamedTuple

from tests.fakes.fake_kube_objects import ApiError, JsonDict, Kind, kind_of

__all__ = ["AuditEntry", "Hook", "Instrumentation"]

Hook = Callable[[JsonDict], None]


class AuditEntry(NamedTuple):
    verb: str  # an RBAC verb: get, list, watch, create, patch, update, delete, deletecollection
    api_group: str
    resource: str  # "pods", or "pods/status" for the subresource, as in RBAC rules
    namespace: str | None  # None: across namespaces
    name: str | None  # None for collections and create (RBAC checks create by no name either)


_Audit = list[AuditEntry]


class Instrumentation:
    """Hooks, audit log and faults, guarded by `lock` (the store's)."""

    def __init__(self, lock: threading.Lock) -> None:
        self._lock = lock
        self._hooks: dict[tuple[str, str], list[Hook]] = defaultdict(list)
        self._audit: _Audit = []
        self._faults: list[tuple[str, str, ApiError]] = []

    def on_create(self, kind: str | Kind, callback: Hook) -> None:
        with self._lock:
            self._hooks["create", kind_of(kind).plural].append(callback)

    def on_terminate(self, kind: str | Kind, callback: Hook) -> None:
        """`callback` gets each object marked for graceful deletion (a pod a node runs): the
        node's cue to stop it and then delete it with grace 0."""
        with self._lock:
            self._hooks["terminate", kind_of(kind).plural].append(callback)

    def on_delete(self, kind: str | Kind, callback: Hook) -> None:
        """`callback` gets each object as it was when it was removed."""
        with self._lock:
            self._hooks["delete", kind_of(kind).plural].append(callback)

    @property
    def audit_log(self) -> _Audit:
        """Every request the HTTP layer handled (authenticated ones), in order."""
        with self._lock:
            return list(self._audit)

    def record(self, entry: AuditEntry) -> None:
        with self._lock:
            self._audit.append(entry)

    def clear_audit_log(self) -> None:
        with self._lock:
            self._audit.clear()

    def fail_next(
        self, verb: str, resource: str, code: int, reason: str, message: str | None = None
    ) -> None:
        """Makes the next HTTP request with this RBAC verb on `resource` ("pods",
        "pods/status", ...) fail with this status, before it reaches the store."""
        error = ApiError(code, reason, message or f"injected failure of {verb} {resource}")
        with self._lock:
            self._faults.append((verb, resource, error))

    def take_fault(self, verb: str, resource: str) -> ApiError | None:
        with self._lock:
            for i, (v, r, error) in enumerate(self._faults):
                if (v, r) == (verb, resource):
                    del self._faults[i]
                    return error
        return None

    def _run_hooks(self, action: str, written: list[tuple[Kind, JsonDict]]) -> None:
        for k, obj in written:
            with self._lock:
                callbacks = list(self._hooks[action, k.plural])
            for callback in callbacks:
                callback(copy.deepcopy(obj))
