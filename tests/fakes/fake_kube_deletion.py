"""Deletion in the fake Kubernetes API server: graceful for pods, and the garbage collector.

``Deletion`` is a base of ``FakeKubeApiServer`` (the store, ``fake_kube``), whose lock,
objects and commits it uses: delete and deletecollection with preconditions and
propagationPolicy; the garbage collector's cascade through ``metadata.ownerReferences``
(Foreground deletes dependents first, Background right after, Orphan drops the owner
reference; a dependent with another live owner survives, minus the reference), synchronous;
and the graceful deletion of pods a node runs (``fake_kube_strategy.deletion_grace``): marked
with a deletionTimestamp, the ``on_terminate`` hooks run, and gone when deleted again with
grace 0 (as a kubelet does once the pod's processes have exited).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any

from tests.fakes.fake_kube_audit import Instrumentation
from tests.fakes.fake_kube_objects import JsonDict, Kind, bad_request, kind_of
from tests.fakes.fake_kube_selectors import Selection
from tests.fakes.fake_kube_strategy import deletion_grace, mark_terminating

__all__ = ["Deletion", "Dicts", "Objects", "key"]

Objects = list[tuple[Kind, JsonDict]]
Dicts = list[JsonDict]

_POLICIES = ("Background", "Foreground", "Orphan")


def key(obj: JsonDict) -> tuple[str, str]:
    return obj["metadata"]["namespace"], obj["metadata"]["name"]


def _owner_refs(obj: JsonDict) -> list[Any]:
    meta = obj.get("metadata")
    return (meta.get("ownerReferences") if isinstance(meta, dict) else None) or []


def _owner_uids(obj: JsonDict) -> list[str]:
    return [str(ref.get("uid")) for ref in _owner_refs(obj) if isinstance(ref, dict)]


@dataclass
class _Deletions:
    """What one delete request did: objects removed, and pods marked for graceful deletion."""

    grace_seconds: int | None  # the request's gracePeriodSeconds
    deleted: Objects = field(default_factory=list)
    terminating: Objects = field(default_factory=list)


class Deletion(Instrumentation):
    """Delete and deletecollection, and the cascade; the store provides the storage."""

    _objects: dict[str, dict[tuple[str, str], JsonDict]]

    # The store's (called with the lock held).
    def _commit(self, k: Kind, event_type: str, obj: JsonDict, prev: JsonDict | None) -> JsonDict:
        raise NotImplementedError

    def _all(self, k: Kind) -> Dicts:
        raise NotImplementedError

    def _in_namespace(self, namespace: str) -> Objects:
        raise NotImplementedError

    def _require(self, k: Kind, namespace: str, name: str) -> JsonDict:
        raise NotImplementedError

    def delete(
        self,
        kind: str | Kind,
        namespace: str,
        name: str,
        *,
        propagation_policy: str | None = None,
        preconditions: JsonDict | None = None,
        grace_period_seconds: int | None = None,
    ) -> JsonDict:
        """Removes the object and cascades to its dependents, or (a pod a node runs) marks it
        for graceful deletion; returns its last state."""
        k, policy = kind_of(kind), self._policy(propagation_policy)
        done = _Deletions(grace_period_seconds)
        with self._lock:
            current = self._require(k, namespace, name)
            meta = current["metadata"]
            for field, label in (("uid", "UID"), ("resourceVersion", "ResourceVersion")):
                wanted = (preconditions or {}).get(field)
                if wanted and wanted != meta.get(field):
                    why = (
                        f"{label} in precondition: {wanted}, {label} in object meta: {meta[field]}"
                    )
                    raise k.conflict(name, f"Precondition failed: {why}")
            last = self._delete_locked(k, current, policy, done, set())
        self._run_hooks("terminate", done.terminating)
        self._run_hooks("delete", done.deleted)
        return last

    def delete_collection(
        self,
        kind: str | Kind,
        namespace: str | None,
        label_selector: str | None = None,
        field_selector: str | None = None,
        *,
        propagation_policy: str | None = None,
        grace_period_seconds: int | None = None,
    ) -> Dicts:
        k, policy = kind_of(kind), self._policy(propagation_policy)
        flt = Selection(k, namespace, label_selector, field_selector)
        done = _Deletions(grace_period_seconds)
        with self._lock:
            for obj in self._all(k):  # skipping any a cascade has deleted or changed since
                if flt.matches(obj) and self._objects[k.plural].get(key(obj)) is obj:
                    self._delete_locked(k, obj, policy, done, set())
        self._run_hooks("terminate", done.terminating)
        self._run_hooks("delete", done.deleted)
        gone = done.terminating + done.deleted
        return [obj for dk, obj in gone if dk is k and flt.matches(obj)]

    # ------------------------------------------------------------------ internals (lock held)
    def _delete_locked(
        self,
        k: Kind,
        obj: JsonDict,
        policy: str,
        done: _Deletions,
        going: set[str],
    ) -> JsonDict:
        """Deletes `obj` (or marks it, to be deleted gracefully) and, as the garbage collector
        would, its dependents (uids in `going` are being deleted further up: no cycles, and
        they count as gone). Only the request's own object gets its grace period."""
        grace = deletion_grace(k, obj, done.grace_seconds if not going else None)
        if grace is None:  # a deletion is pending already
            return copy.deepcopy(obj)
        if grace > 0:
            marked = self._commit(k, "MODIFIED", mark_terminating(obj, grace), obj)
            done.terminating.append((k, marked))
            return marked
        uid, namespace = obj["metadata"]["uid"], obj["metadata"]["namespace"]
        going.add(uid)
        dependents = [(dk, d) for dk, d in self._in_namespace(namespace) if uid in _owner_uids(d)]
        if policy == "Foreground":
            self._release(dependents, uid, policy, done, going)
        last = self._commit(k, "DELETED", obj, obj)
        done.deleted.append((k, last))
        if policy == "Background":
            self._release(dependents, uid, policy, done, going)
        if policy == "Orphan":
            for dk, dependent in dependents:
                self._drop_owner(dk, self._objects[dk.plural].get(key(dependent)), uid)
        return last

    def _release(
        self,
        dependents: Objects,
        owner_uid: str,
        policy: str,
        done: _Deletions,
        going: set[str],
    ) -> None:
        for dk, dependent in dependents:
            current = self._objects[dk.plural].get(key(dependent))
            if current is None or current["metadata"]["uid"] in going:
                continue
            live = {o["metadata"]["uid"] for _, o in self._in_namespace(key(current)[0])}
            others = [u for u in _owner_uids(current) if u != owner_uid and u not in going]
            if any(u in live for u in others):
                self._drop_owner(dk, current, owner_uid)
            else:
                self._delete_locked(dk, current, policy, done, going)

    def _drop_owner(self, k: Kind, obj: JsonDict | None, owner_uid: str) -> None:
        if obj is None:
            return
        result = copy.deepcopy(obj)
        refs = [r for r in _owner_refs(obj) if r.get("uid") != owner_uid]
        result["metadata"].pop("ownerReferences", None)
        if refs:
            result["metadata"]["ownerReferences"] = refs
        self._commit(k, "MODIFIED", result, obj)

    @staticmethod
    def _policy(policy: str | None) -> str:
        if policy not in (None, "", *_POLICIES):
            raise bad_request(f"unsupported propagationPolicy {policy!r}")
        return policy or "Background"
