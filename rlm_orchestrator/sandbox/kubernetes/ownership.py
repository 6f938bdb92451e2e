"""Who owns the sandbox pods: one coordination.k8s.io Lease per orchestrator.

Every pod an orchestrator creates or leases names its Lease as owner, so deleting the Lease
makes Kubernetes' garbage collector delete the pods. The orchestrator renews its Lease while
it lives; any orchestrator starting up deletes the Leases that have expired (their holders
are gone) and the pods go with them. A renewal is guarded by the Lease's resourceVersion: if
another orchestrator has taken an expired Lease over to delete it, the holder finds out at
its next renewal instead of writing over the takeover. `activeDeadlineSeconds` bounds every
pod even if no orchestrator ever starts again.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime, timedelta
from typing import Any

from rlm_orchestrator.sandbox.kubernetes.api import JsonObject, KubeApi, KubeApiError
from rlm_orchestrator.sandbox.kubernetes.pods import MANAGED_BY, OUR_LABELS, ROLE

log = logging.getLogger("rlm_orchestrator.sandbox.kubernetes")

LEASE_LABELS = {MANAGED_BY: OUR_LABELS[MANAGED_BY], ROLE: "orchestrator"}


def micro_time(moment: datetime) -> str:
    """Kubernetes' MicroTime: RFC 3339 with microseconds, in UTC."""
    return moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def parse_time(value: Any) -> datetime | None:
    if isinstance(value, datetime):
        return value if value.tzinfo else value.replace(tzinfo=UTC)
    if not value:
        return None
    return datetime.fromisoformat(str(value).replace("Z", "+00:00"))


def lease_expired(lease: JsonObject, now: datetime, grace_seconds: float) -> bool:
    """Not renewed for its duration plus a grace (for clock skew between orchestrators)."""
    spec = lease.get("spec") or {}
    renewed = parse_time(spec.get("renewTime")) or parse_time(spec.get("acquireTime"))
    if renewed is None:
        renewed = parse_time(lease.get("metadata", {}).get("creationTimestamp"))
    if renewed is None:
        return False
    duration = float(spec.get("leaseDurationSeconds") or 0)
    return now > renewed + timedelta(seconds=duration + grace_seconds)


class OwnerLease:
    """This orchestrator's Lease: created on start, renewed, deleted (with its pods) on close."""

    def __init__(self, api: KubeApi, holder: str, duration_seconds: int) -> None:
        self.api = api
        self.holder = holder
        self.duration_seconds = duration_seconds
        self.name = ""
        self.uid = ""
        self._resource_version = ""
        self._renewal: asyncio.Task[None] | None = None

    async def create(self) -> None:
        now = micro_time(datetime.now(UTC))
        created = await self.api.create(
            "Lease",
            {
                "apiVersion": "coordination.k8s.io/v1",
                "kind": "Lease",
                "metadata": {"generateName": "rlm-orchestrator-", "labels": dict(LEASE_LABELS)},
                "spec": {
                    "holderIdentity": self.holder,
                    "leaseDurationSeconds": self.duration_seconds,
                    "acquireTime": now,
                    "renewTime": now,
                },
            },
        )
        self.name = created["metadata"]["name"]
        self.uid = created["metadata"]["uid"]
        self._resource_version = created["metadata"]["resourceVersion"]

    def owner_reference(self) -> JsonObject:
        # controller=True: no ReplicaSet with an overlapping selector may adopt the pod.
        return {
            "apiVersion": "coordination.k8s.io/v1",
            "kind": "Lease",
            "name": self.name,
            "uid": self.uid,
            "controller": True,
            "blockOwnerDeletion": False,
        }

    async def renew(self) -> None:
        """Raises KubeApiError; `conflict` or `not_found` means the Lease is lost."""
        renewed = await self.api.patch(
            "Lease",
            self.name,
            {
                "metadata": {"resourceVersion": self._resource_version},
                "spec": {"renewTime": micro_time(datetime.now(UTC))},
            },
        )
        self._resource_version = renewed["metadata"]["resourceVersion"]

    def start_renewing(self, on_lost: Callable[[str], Awaitable[None]]) -> None:
        self._renewal = asyncio.create_task(self._renew_forever(on_lost))

    async def _renew_forever(self, on_lost: Callable[[str], Awaitable[None]]) -> None:
        while True:
            await asyncio.sleep(self.duration_seconds / 3)
            try:
                await self.renew()
            except KubeApiError as exc:
                if exc.conflict or exc.not_found:
                    await on_lost(f"Lease {self.name} was taken over or deleted ({exc})")
                    return
                # A blip of the API server: two more tries before the Lease can expire.
                log.warning("renewal of Lease %s failed: %s", self.name, exc)

    async def delete(self) -> None:
        """Stop renewing and delete the Lease: the pods it owns are deleted with it."""
        if self._renewal is not None:
            self._renewal.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._renewal
            self._renewal = None
        if self.name:
            with contextlib.suppress(KubeApiError):
                await self.api.delete("Lease", self.name)


async def sweep_expired_leases(api: KubeApi, reaper: str, grace_seconds: float) -> list[str]:
    """Delete the expired orchestrator Leases (and so their pods); returns their names.

    Each is first taken over (holderIdentity := reaper, guarded by its resourceVersion): a
    holder that was only slow then loses its next renewal cleanly instead of renewing a Lease
    that is about to be deleted, and two sweepers never both act on one Lease.
    """
    now = datetime.now(UTC)
    swept = []
    for lease in await api.list("Lease", LEASE_LABELS):
        if not lease_expired(lease, now, grace_seconds):
            continue
        meta = lease["metadata"]
        try:
            await api.patch(
                "Lease",
                meta["name"],
                {
                    "metadata": {"resourceVersion": meta["resourceVersion"]},
                    "spec": {"holderIdentity": f"reaped-by:{reaper}"},
                },
            )
            await api.delete("Lease", meta["name"])
        except KubeApiError as exc:
            if exc.conflict or exc.not_found:
                continue  # renewed, or another orchestrator swept it first
            raise
        log.info(
            "deleted expired Lease %s of %s", meta["name"], lease["spec"].get("holderIdentity")
        )
        swept.append(meta["name"])
    return swept
