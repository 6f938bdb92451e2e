"""An in-memory fake of the Kubernetes API server's storage and watch semantics, for tests.

``FakeKubeApiServer`` holds namespaced Pods, coordination.k8s.io Leases and Secrets as plain
JSON dicts, and answers the calls behind the REST verbs (``fake_kube_http`` puts the real
lightkube client in front of it, over an httpx2 ``MockTransport`` or a real HTTP server).
It is thread-safe (one lock) and usable from any thread and any asyncio loop.

What it models, as the apiserver does:

- one global resourceVersion counter, bumped once per write (a no-op patch writes nothing);
  ``uid``, ``creationTimestamp``, ``generateName``; 409 AlreadyExists; a pod's status reset to
  ``Pending`` on create; a secret's ``stringData`` folded into ``data``;
- every body decoded against the kind's schema first (``fake_kube_schema``: 400 BadRequest
  for wrong types, unparsable quantities and times, unknown fields under
  ``fieldValidation=Strict``; dropped with a warning under Warn), then validated
  (``fake_kube_validation``: 422 Invalid with the apiserver's causes for names, labels, owner
  references and containers);
- get and list with label and field selectors (``fake_kube_selectors``); lists carry the
  current resourceVersion (``limit``/``continue`` paging is not modelled: one page);
- merge, "strategic" and JSON patches (``fake_kube_patch``), and PUT, with
  ``metadata.resourceVersion`` as an optimistic-concurrency precondition (409 Conflict);
  immutable metadata is kept; a pod's status changes only through its status subresource (or
  ``set_pod_status``), its spec only in ``containers[*].image``/``initContainers[*].image``
  and a smaller activeDeadlineSeconds (422 Invalid otherwise; ``fake_kube_objects``);
- delete with preconditions and propagationPolicy, and the garbage collector's cascade through
  ``metadata.ownerReferences`` (Foreground deletes dependents first, Background right after,
  Orphan drops the owner reference; a dependent with another live owner survives, minus the
  reference), all synchronous;
- graceful deletion of pods a node runs (``spec.nodeName`` set, not finished): the delete
  only sets ``deletionTimestamp`` and ``deletionGracePeriodSeconds`` (the request's
  gracePeriodSeconds, else the spec's terminationGracePeriodSeconds, else 30) and runs the
  ``on_terminate`` hooks (the kubelet's cue); the pod goes when its kubelet deletes it again
  with grace 0 (``fake_kubelet`` does, once the processes exited). A second delete may only
  shorten the grace. Other kinds, and unscheduled or finished pods, go at once;
- watches replaying a bounded history, with 410 Expired beyond it (``fake_kube_watch``).

What it deliberately does not model: finalizers (a Foreground owner does not wait for its
terminating dependents), admission, RBAC enforcement (requests are only recorded in
``audit_log``), namespaces as objects (every namespace exists), server-side apply and
managedFields, strategic-merge list semantics, dry runs, watch bookmarks, and every controller
(nothing runs a pod: tests do, through the ``on_create``/``on_terminate``/``on_delete`` hooks,
which run outside the lock in the thread that made the write).

Direct calls validate as ``fieldValidation=Strict`` (a test's typo is an error); over HTTP the
default is the apiserver's, Warn.
"""

from __future__ import annotations

import copy
import random
import threading
from collections.abc import Callable
from typing import Any

from tests.fakes import fake_kube_selectors as sel
from tests.fakes.fake_kube_audit import AuditEntry
from tests.fakes.fake_kube_audit import Hook as Hook  # re-exported: public here
from tests.fakes.fake_kube_deletion import Deletion, Dicts, Objects, key
from tests.fakes.fake_kube_objects import (
    KINDS,
    ApiError,
    JsonDict,
    Kind,
    bad_request,
    kind_of,
    no_such_resource,
)
from tests.fakes.fake_kube_patch import (
    JSON_PATCH,
    MERGE_PATCH,
    STRATEGIC_MERGE_PATCH,
    patcher,
)
from tests.fakes.fake_kube_schema import decode
from tests.fakes.fake_kube_strategy import (
    IMMUTABLE,
    initialize,
    keep_meta,
    new_object,
    pod_status_defaults,
    updated,
)
from tests.fakes.fake_kube_watch import Event, EventHistory, Watch

__all__ = [
    "JSON_PATCH",
    "KINDS",
    "MERGE_PATCH",
    "STRATEGIC_MERGE_PATCH",
    "ApiError",
    "AuditEntry",
    "FakeKubeApiServer",
    "Kind",
    "Watch",
    "kind_of",
]

_SUFFIX_ALPHABET = "bcdfghjklmnpqrstvwxz2456789"  # the apiserver's: no vowels, no words


# An alias: inside the store, `list` is a method's name.
Warnings = list[str]


def _sink(warnings: list[str] | None) -> list[str]:
    return warnings if warnings is not None else []


class FakeKubeApiServer(Deletion):
    """The store: objects, the resourceVersion counter, event history and watches (deletion
    and the garbage collector: ``Deletion``; hooks, audit log and fault injection:
    ``Instrumentation``)."""

    def __init__(self, *, history_limit: int = 1000) -> None:
        if history_limit < 1:
            raise ValueError("history_limit must be at least 1")
        super().__init__(threading.Lock())
        self._rv = 0
        self._objects: dict[str, dict[tuple[str, str], JsonDict]] = {p: {} for p in KINDS}
        self._history = EventHistory(self._lock, history_limit)

    @property
    def resource_version(self) -> str:
        with self._lock:
            return str(self._rv)

    # ------------------------------------------------------------------ reads
    def get(self, kind: str | Kind, namespace: str, name: str) -> JsonDict:
        k = kind_of(kind)
        with self._lock:
            return copy.deepcopy(self._require(k, namespace, name))

    def list(
        self,
        kind: str | Kind,
        namespace: str | None = None,
        label_selector: str | None = None,
        field_selector: str | None = None,
    ) -> tuple[Dicts, str]:
        """(items, the list's resourceVersion): every namespace when `namespace` is None."""
        k = kind_of(kind)
        flt = sel.Selection(k, namespace, label_selector, field_selector)
        with self._lock:
            return copy.deepcopy([o for o in self._all(k) if flt.matches(o)]), str(self._rv)

    def watch(
        self,
        kind: str | Kind,
        namespace: str | None = None,
        label_selector: str | None = None,
        field_selector: str | None = None,
        resource_version: str | None = None,
        timeout_seconds: float | None = None,
    ) -> Watch:
        """Events after `resource_version`; without one (or "0"), ADDED for every current match
        first. A version older than the history gets one ERROR event (410 Expired)."""
        k = kind_of(kind)
        flt = sel.Selection(k, namespace, label_selector, field_selector)
        with self._lock:
            return self._history.open(flt, self._all(k), resource_version, timeout_seconds or 0)

    def close_watches(self) -> None:
        """Ends every open watch (their streams end as at a server timeout)."""
        with self._lock:
            self._history.close_all()

    # ------------------------------------------------------------------ writes
    # `field_validation` and `warnings` (appended to) as in fake_kube_schema.decode.
    def create(
        self,
        kind: str | Kind,
        namespace: str,
        obj: JsonDict,
        *,
        field_validation: str = "Strict",
        warnings: Warnings | None = None,
    ) -> JsonDict:
        k = kind_of(kind)
        body = new_object(k, namespace, decode(k, obj, field_validation, _sink(warnings)))
        meta = body["metadata"]
        with self._lock:
            name = meta.get("name") or ""
            while not name and meta.get("generateName"):
                name = meta["generateName"] + "".join(random.choices(_SUFFIX_ALPHABET, k=5))
                name = "" if (namespace, name) in self._objects[k.plural] else name
            body = initialize(k, body, namespace, name)
            if (namespace, name) in self._objects[k.plural]:
                raise ApiError(409, "AlreadyExists", f'{k.qualified} "{name}" already exists')
            created = self._commit(k, "ADDED", body, None)
        self._run_hooks("create", [(k, created)])
        return created

    def patch(
        self,
        kind: str | Kind,
        namespace: str,
        name: str,
        patch: Any,
        content_type: str = MERGE_PATCH,
        *,
        subresource: str | None = None,
        field_validation: str = "Strict",
        warnings: Warnings | None = None,
    ) -> JsonDict:
        k = kind_of(kind)
        self._check_subresource(k, subresource)
        apply = patcher(patch, content_type)
        with self._lock:
            current = self._require(k, namespace, name)
            result = decode(k, apply(current), field_validation, _sink(warnings))
            return self._write(k, updated(k, current, result, subresource), current)

    def replace(
        self,
        kind: str | Kind,
        namespace: str,
        name: str,
        obj: JsonDict,
        *,
        subresource: str | None = None,
        field_validation: str = "Strict",
        warnings: Warnings | None = None,
    ) -> JsonDict:
        """PUT: the whole object; its resourceVersion, when set, is a precondition."""
        k = kind_of(kind)
        self._check_subresource(k, subresource)
        if not isinstance(obj, dict):
            raise bad_request("the object must be a JSON object")
        obj = decode(k, obj, field_validation, _sink(warnings))
        meta = obj.get("metadata")
        meta = meta if isinstance(meta, dict) else {}
        if meta.get("name", name) != name:
            message = f"the name of the object ({meta['name']}) does not match the name on the URL"
            raise bad_request(f"{message} ({name})")
        if meta.get("namespace", namespace) != namespace:
            message = "the namespace of the provided object does not match the request"
            raise bad_request(message)
        with self._lock:
            current = self._require(k, namespace, name)
            new = updated(k, current, copy.deepcopy(obj), subresource)
            return self._write(k, new, current)

    def set_pod_status(self, namespace: str, name: str, status: JsonDict) -> JsonDict:
        """Replaces a pod's status, as a kubelet does through the status subresource (no
        write if it is the same)."""
        status = pod_status_defaults(status)
        return self.update("pods", namespace, name, lambda pod: {**pod, "status": status})

    def update(
        self, kind: str | Kind, namespace: str, name: str, fn: Callable[[JsonDict], Any]
    ) -> JsonDict:
        """Stores `fn(copy)` (or the copy `fn` changed in place, if it returns None) as is:
        no validation, status included. `fn` runs outside the lock; retried on a conflict."""
        k = kind_of(kind)
        while True:
            current = self.get(k, namespace, name)
            draft = copy.deepcopy(current)
            result = fn(draft)
            result = copy.deepcopy(draft if result is None else result)
            with self._lock:
                stored = self._require(k, namespace, name)
                if stored["metadata"]["resourceVersion"] != current["metadata"]["resourceVersion"]:
                    continue
                kept = (*IMMUTABLE, "resourceVersion")
                keep_meta(result.setdefault("metadata", {}), stored, kept)
                return self._write(k, result, stored)

    # ------------------------------------------------------------------ internals (lock held)
    def _commit(self, k: Kind, event_type: str, obj: JsonDict, prev: JsonDict | None) -> JsonDict:
        """Stores (or, for DELETED, removes) `obj` at a new resourceVersion, and tells watches."""
        self._rv += 1
        obj = copy.deepcopy(obj)  # stored objects are never mutated: events share them
        obj["metadata"]["resourceVersion"] = str(self._rv)
        if event_type == "DELETED":
            self._objects[k.plural].pop(key(obj), None)
        else:
            self._objects[k.plural][key(obj)] = obj
        self._history.publish(Event(self._rv, k, event_type, obj, prev))
        return copy.deepcopy(obj)

    def _write(self, k: Kind, result: JsonDict, current: JsonDict) -> JsonDict:
        """Commits `result` over `current` (at its resourceVersion) unless nothing changed:
        then there is no write and no new resourceVersion."""
        if result == current:
            return copy.deepcopy(current)
        return self._commit(k, "MODIFIED", result, current)

    def _all(self, k: Kind) -> Dicts:
        """Every stored object of kind `k`, by namespace and name."""
        return [obj for _, obj in sorted(self._objects[k.plural].items())]

    def _in_namespace(self, namespace: str) -> Objects:
        return [
            (k, obj) for k in KINDS.values() for obj in self._all(k) if key(obj)[0] == namespace
        ]

    def _require(self, k: Kind, namespace: str, name: str) -> JsonDict:
        found = self._objects[k.plural].get((namespace, name))
        if found is None:
            raise k.not_found(name)
        return found

    @staticmethod
    def _check_subresource(k: Kind, subresource: str | None) -> None:
        if subresource not in (None, "status") or (subresource and k.plural != "pods"):
            raise no_such_resource()
