"""What the server admits: request limits under its ceilings, and calls under its capacity.

A request's limits (CompletionOptions) may be lowered, never raised above the server's
settings of the same names (`RequestRefused`, sent as INVALID_ARGUMENT). Capacity is counted
when a call is accepted, before any upload, and synchronously (no await between the check and
the count, so concurrent calls cannot both take the last slot): a `Ticket` holds a completion or
session slot, plus a sandbox slot when the call will need its own sandbox, until whatever ends
the call gives it back (`CapacityRefused`, sent as RESOURCE_EXHAUSTED, names the setting).
Each tenant (a token of its own) may also have a share: at most so many of the server's
completions and sessions at once.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from rlm_orchestrator.config.answer import ANSWER_CONVENTIONS, FINAL
from rlm_orchestrator.config.fences import code_fences
from rlm_orchestrator.exceptions import InvalidRequestError, ResourceExhaustedError
from rlm_orchestrator.loop import LoopSettings
from rlm_orchestrator.prompts import system_prompt_for
from rlm_orchestrator.sandbox.limits import SandboxPool, SandboxSlot
from rlm_orchestrator.service.settings import LIMIT_OPTIONS, ServerSettings
from rlm_orchestrator.service.tenants import Tenant
from rlm_wire.v1 import orchestrator_pb2 as pb


class RequestRefused(InvalidRequestError, ValueError):
    """A request asked for more than the server allows; the message names the ceiling."""


class CapacityRefused(ResourceExhaustedError):
    """No capacity left; the message names the setting and its value."""


@dataclass(frozen=True)
class RequestLimits:
    """A request's limits once defaults are applied and ceilings checked."""

    max_iterations: int
    max_depth: int
    exec_timeout_seconds: float
    timeout_seconds: float | None
    iteration_timeout_seconds: float | None
    max_cost: float | None


def request_limits(options: pb.CompletionOptions, settings: ServerSettings) -> RequestLimits:
    """The limits a request gets; RequestRefused when it asks for more than a ceiling (or
    names an answer convention that does not exist)."""
    values: dict[str, float | int | None] = {}
    for name in LIMIT_OPTIONS:
        if not options.HasField(name):  # type: ignore[arg-type]
            values[name] = settings.limit_default(name)
            continue
        value: float | int = getattr(options, name)
        if isinstance(value, float) and not (math.isfinite(value) and value > 0):
            raise RequestRefused(f"{name}={value} must be a positive number of seconds or USD")
        if name == "max_iterations" and value < 1:
            raise RequestRefused("max_iterations=0 must be at least 1")
        ceiling: float | int | None = getattr(settings, name)
        if ceiling is not None and value > ceiling:
            raise RequestRefused(
                f"{name}={value:g} is above the server's ceiling {name}={ceiling:g}"
            )
        values[name] = value
    if options.HasField("answer_convention") and (
        options.answer_convention not in ANSWER_CONVENTIONS
    ):
        raise RequestRefused(
            f"answer_convention={options.answer_convention!r} must be one of "
            + ", ".join(ANSWER_CONVENTIONS)
        )
    if options.code_fences:
        try:
            code_fences(list(options.code_fences))
        except ValueError as exc:
            raise RequestRefused(f"code_fences={list(options.code_fences)}: {exc}") from None
    return RequestLimits(**values)  # type: ignore[arg-type]


@dataclass(eq=False)
class Ticket:
    """What an accepted call holds until it ends. `give_back` is idempotent."""

    sandbox_slot: SandboxSlot | None
    _give_back: Callable[[], None]
    _returned: bool = False

    def give_back(self) -> None:
        if not self._returned:
            self._returned = True
            self._give_back()


@dataclass
class _Capacity:
    """One kind of slot (completions or sessions): the server's limit and each tenant's share."""

    setting: str  # the settings' name of the limit, for refusals
    limit: int
    what: str  # "completions are running", "sessions are open"
    taken: int = 0
    taken_by: Counter[str] = field(default_factory=Counter)

    def take(self, tenant: Tenant, share: int | None) -> Callable[[], None]:
        """A slot for `tenant` (CapacityRefused naming the setting); returns its give-back."""
        if share is not None and self.taken_by[tenant.name] >= share:
            raise CapacityRefused(
                f"tenant {tenant.name!r}: {self.setting}={share}: its share of this server is "
                "in use; retry later"
            )
        if self.taken >= self.limit:
            raise CapacityRefused(
                f"{self.setting}={self.limit}: {self.taken} {self.what} on this server; retry later"
            )
        self.taken += 1
        self.taken_by[tenant.name] += 1

        def give_back() -> None:
            self.taken -= 1
            self.taken_by[tenant.name] -= 1

        return give_back


class Admission:
    """The server's capacity: completions, sessions, and (through the pool) sandboxes."""

    def __init__(self, settings: ServerSettings, pool: SandboxPool) -> None:
        self.pool = pool
        self.completions = _Capacity(
            "max_concurrent_completions",
            settings.max_concurrent_completions,
            "completions are running or starting",
        )
        self.sessions = _Capacity("max_sessions", settings.max_sessions, "sessions are open")

    def completion(self, tenant: Tenant, *, needs_sandbox: bool) -> Ticket:
        """A running completion (counted from acceptance, through its upload, to its end)."""
        give_back_completion = self.completions.take(tenant, tenant.max_concurrent_completions)
        slot = self._sandbox_slot(give_back_completion) if needs_sandbox else None

        def give_back() -> None:
            give_back_completion()
            if slot is not None:
                self.pool.close(slot)

        return Ticket(slot, give_back)

    def session(self, tenant: Tenant) -> Ticket:
        """An open session and its sandbox (counted from CreateSession to its close)."""
        give_back_session = self.sessions.take(tenant, tenant.max_sessions)
        slot = self._sandbox_slot(give_back_session)

        def give_back() -> None:
            give_back_session()
            self.pool.close(slot)

        return Ticket(slot, give_back)

    def _sandbox_slot(self, undo: Callable[[], None]) -> SandboxSlot:
        slot = self.pool.reserve()
        if slot is None:
            undo()  # the call is refused: it holds nothing
            raise CapacityRefused(self.pool.refusal())
        return slot


def loop_settings_for(
    options: pb.CompletionOptions, limits: RequestLimits, settings: ServerSettings
) -> LoopSettings:
    """What a request's completion loop runs with: its limits, its options, the server's rest."""

    def option(name: str, default: Any) -> Any:
        return getattr(options, name) if options.HasField(name) else default  # type: ignore[arg-type]

    # Checked by request_limits: one of ANSWER_CONVENTIONS.
    convention = option("answer_convention", FINAL)
    return LoopSettings(
        max_depth=limits.max_depth,
        max_iterations=limits.max_iterations,
        timeout_seconds=limits.timeout_seconds,
        iteration_timeout_seconds=limits.iteration_timeout_seconds,
        # The server's sandbox limits, with the request's block timeout.
        sandbox=settings.sandbox.limits.model_copy(
            update={"exec_timeout_seconds": limits.exec_timeout_seconds}
        ),
        final_with_code=option("final_with_code", False),
        answer_convention=convention,
        code_fences=tuple(options.code_fences) or settings.code_fences,
        system_prompt=option("system_prompt", system_prompt_for(convention)),
        # FINAL_VAR answers are read from the sandbox up to the size the server may send.
        max_answer_chars=settings.max_answer_chars,
    )
