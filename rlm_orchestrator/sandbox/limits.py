"""Counting live sandboxes against a ceiling, for a server shared by tenants.

A `SandboxPool` wraps the server's provider and counts every sandbox it hands out: sessions',
completions', and those of their `rlm_query` children. Admission reserves a `SandboxSlot` for
a completion or a session when it is accepted (before any upload), so that its own sandbox is
never refused later; children take a slot when they start, and a child refused one fails as a
sub-call error (`SandboxLimitError` is a SandboxError, which the loop reports to the model)
rather than failing its parent. A slot comes back when its sandbox is released and its holder
has ended, whatever the order.
"""

from __future__ import annotations

from dataclasses import dataclass

from rlm_orchestrator.exceptions import SandboxError
from rlm_orchestrator.sandbox.base import Sandbox, SandboxProvider, SandboxSpec


class SandboxLimitError(SandboxError):
    """Every sandbox the server allows (`max_sandboxes`) is in use."""


@dataclass(eq=False)
class SandboxSlot:
    """A sandbox slot reserved for one holder (a completion or a session)."""

    occupied: bool = False  # its holder's sandbox is live on it
    closed: bool = False  # its holder has ended


class SandboxPool:
    """The server's provider, with at most `limit` sandboxes live at once."""

    def __init__(self, provider: SandboxProvider, limit: int) -> None:
        self.provider = provider
        self.name = provider.name
        self.limit = limit
        self._taken = 0  # open slots + closed slots still occupied + children's sandboxes
        self._owners: dict[int, tuple[Sandbox, SandboxSlot | None]] = {}

    @property
    def in_use(self) -> int:
        return self._taken

    def refusal(self) -> str:
        return (
            f"max_sandboxes={self.limit}: every sandbox of the server is in use "
            "(sessions, completions and their rlm_query children)"
        )

    def reserve(self) -> SandboxSlot | None:
        """A slot for a new holder, or None when none is left (synchronous: no race)."""
        if self._taken >= self.limit:
            return None
        self._taken += 1
        return SandboxSlot()

    def close(self, slot: SandboxSlot) -> None:
        """The holder ended (idempotent); its slot is free once its sandbox is released too."""
        if slot.closed:
            return
        slot.closed = True
        if not slot.occupied:
            self._taken -= 1

    def view(self, slot: SandboxSlot | None) -> SlotProvider:
        """The provider a holder's runner uses: its first sandbox goes on `slot`."""
        return SlotProvider(self, slot)

    async def acquire(self, spec: SandboxSpec, slot: SandboxSlot | None = None) -> Sandbox:
        owner: SandboxSlot | None
        if slot is not None and not slot.occupied and not slot.closed:
            slot.occupied = True
            owner = slot
        elif self._taken < self.limit:
            self._taken += 1
            owner = None
        else:
            raise SandboxLimitError(self.refusal())
        try:
            sandbox = await self.provider.acquire(spec)
        except BaseException:
            self._free(owner)
            raise
        self._owners[id(sandbox)] = (sandbox, owner)
        return sandbox

    async def release(self, sandbox: Sandbox) -> None:
        entry = self._owners.pop(id(sandbox), None)
        try:
            await self.provider.release(sandbox)
        finally:
            if entry is not None:
                self._free(entry[1])

    def _free(self, owner: SandboxSlot | None) -> None:
        if owner is None:
            self._taken -= 1
            return
        owner.occupied = False
        if owner.closed:
            self._taken -= 1

    async def aclose(self) -> None:
        await self.provider.aclose()


class SlotProvider:
    """A SandboxProvider over a pool, for one holder: its own sandbox on its reserved slot,
    any other (a child's) on a slot of its own, refused with SandboxLimitError when none is
    left. Closing it closes nothing: the pool's owner closes the provider."""

    def __init__(self, pool: SandboxPool, slot: SandboxSlot | None) -> None:
        self.pool = pool
        self.slot = slot
        self.name = pool.name

    async def acquire(self, spec: SandboxSpec) -> Sandbox:
        return await self.pool.acquire(spec, self.slot)

    async def release(self, sandbox: Sandbox) -> None:
        await self.pool.release(sandbox)

    async def aclose(self) -> None:
        return None
