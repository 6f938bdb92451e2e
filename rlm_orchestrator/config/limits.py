"""The limits of a completion and of its sandboxes: each defined here once, with its bounds.

`RLM(...)`, `rlm-orchestrator run` (flags, `[run]` table, RLM_RUN_* variables) and the server
(its ceilings, its `environment_kwargs`) all validate into these types, so a value means the
same and is refused the same everywhere. The defaults the sandbox agent shares (it imports no
pydantic) come from `sandbox_agent.limits`.
"""

from __future__ import annotations

from typing import Annotated

from pydantic import AfterValidator, BaseModel, ConfigDict, Field

from sandbox_agent.limits import (
    DEFAULT_EXEC_TIMEOUT_SECONDS,
    DEFAULT_MAX_ANSWER_CHARS,
    DEFAULT_MAX_OUTPUT_CHARS,
)

__all__ = [
    "DEFAULT_EXEC_TIMEOUT_SECONDS",
    "DEFAULT_MAX_ANSWER_CHARS",
    "DEFAULT_MAX_DEPTH",
    "DEFAULT_MAX_ITERATIONS",
    "DEFAULT_MAX_OUTPUT_CHARS",
    "CompletionLimits",
    "MaxDepth",
    "MaxIterations",
    "MemoryLimitMB",
    "SandboxLimits",
    "Seconds",
    "Usd",
]

DEFAULT_MAX_ITERATIONS = 30
DEFAULT_MAX_DEPTH = 1
# The smallest address-space limit a worker starts with (Python and the worker's modules).
MIN_MEMORY_LIMIT_MB = 64
MAX_OUTPUT_CHARS_CEILING = 100 * 1024 * 1024

# A duration: positive and finite.
Seconds = Annotated[float, Field(gt=0, allow_inf_nan=False)]
# A budget in USD: positive and finite.
Usd = Annotated[float, Field(gt=0, allow_inf_nan=False)]
MaxIterations = Annotated[int, Field(ge=1, le=10_000)]
MaxDepth = Annotated[int, Field(ge=0, le=16)]


def _memory_limit(value: int | None) -> int | None:
    if value is not None and 0 < value < MIN_MEMORY_LIMIT_MB:
        raise ValueError(f"must be 0 (no limit) or at least {MIN_MEMORY_LIMIT_MB} MB")
    return value


MemoryLimitMB = Annotated[int, Field(ge=0, le=1024 * 1024), AfterValidator(_memory_limit)]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class SandboxLimits(_Strict):
    """What every sandbox gets, whatever its backend (environment_kwargs' shared keys)."""

    # Wall-clock time of one code block: then SIGINT, then the worker's process group is killed.
    exec_timeout_seconds: Seconds = DEFAULT_EXEC_TIMEOUT_SECONDS
    # Characters of one block's output kept per stream (head and tail around a marker).
    max_output_chars: int = Field(
        default=DEFAULT_MAX_OUTPUT_CHARS, ge=1, le=MAX_OUTPUT_CHARS_CEILING
    )
    # Address space of the worker process (RLIMIT_AS), in MB. None: the backend's own (local:
    # LOCAL_MEMORY_LIMIT_MB; docker: the container's memory_mb; modal and kubernetes: none
    # below their container's limit). 0: no address-space limit.
    memory_limit_mb: MemoryLimitMB | None = None
    # How long a sandbox may take to be ready (start, image pull, pod scheduling).
    startup_timeout_seconds: Seconds = 30.0

    def memory_limit_or(self, backend_default: int) -> int:
        """The worker's address-space limit in MB (0: none), with the backend's default."""
        return backend_default if self.memory_limit_mb is None else self.memory_limit_mb


class CompletionLimits(_Strict):
    """What one completion may use (RLM's arguments; `run`'s settings; a server request's
    options, which the server's ceilings of the same names bound)."""

    max_iterations: MaxIterations = DEFAULT_MAX_ITERATIONS
    max_depth: MaxDepth = DEFAULT_MAX_DEPTH
    timeout_seconds: Seconds | None = None
    iteration_timeout_seconds: Seconds | None = None
    max_cost: Usd | None = None
    # The longest FINAL_VAR answer, in characters (read whole, or refused: never cut).
    max_answer_chars: int = Field(default=DEFAULT_MAX_ANSWER_CHARS, ge=1)
