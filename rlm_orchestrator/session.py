"""A sandbox and what has been loaded into it, for one completion or a persistent session.

It remembers what it loaded (contexts, histories) so that, when its sandbox is lost, it can
move to a new one and load everything again.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from rlm_orchestrator.sandbox import Sandbox


@dataclass
class SessionState:
    """A sandbox and what has been loaded into it; lives across completions when persistent."""

    sandbox: Sandbox
    context_count: int = 0
    history_count: int = 0
    # Gives the lost sandbox back (best effort) and a new one: set by the runner.
    replace: Callable[[Sandbox], Awaitable[Sandbox]] | None = None
    loaded: list[tuple[str, Any, str]] = field(default_factory=list)

    async def _load(self, name: str, value: Any, alias: str) -> None:
        await self.sandbox.client.load_value(name, value, alias)
        self.loaded.append((name, value, alias))

    async def add_context(self, context: Any) -> None:
        index = self.context_count
        await self._load(f"context_{index}", context, "context" if index == 0 else "")
        self.context_count += 1

    async def add_history(self, messages: list[dict[str, Any]]) -> None:
        index = self.history_count
        await self._load(f"history_{index}", messages, "history" if index == 0 else "")
        self.history_count += 1

    async def recover(self) -> None:
        """Move to a new sandbox (the old one was lost) and load everything again."""
        assert self.replace is not None
        self.sandbox = await self.replace(self.sandbox)
        for name, value, alias in self.loaded:
            await self.sandbox.client.load_value(name, value, alias)
