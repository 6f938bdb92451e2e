"""How a model is reached: `transport` of a model's config (backend_kwargs, [[models]], run's).

- "auto": the lean HTTP client for plain OpenAI-compatible calls (rlm_orchestrator/lm_http.py
  says which), litellm for everything else;
- "litellm": always litellm (its provider logic, auth and formats);
- "http": always the lean client; refused for a model it cannot reach.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field, TypeAdapter, ValidationError

from rlm_orchestrator.exceptions import ConfigurationError

# The original library's backend names (RLM's `backend`, run's --backend), as litellm
# provider prefixes.
PROVIDER_PREFIX = {
    "openai": "openai",
    "anthropic": "anthropic",
    "gemini": "gemini",
    "azure_openai": "azure",
    "portkey": "openai",
    "openrouter": "openrouter",
    "vllm": "hosted_vllm",
    "vercel": "vercel_ai_gateway",
    "litellm": "",
}
BACKEND_NAMES = tuple(sorted(PROVIDER_PREFIX))


def check_backend(name: str) -> str:
    """A backend name RLM knows, or a ValueError that lists them (a validator's refusal)."""
    if name not in PROVIDER_PREFIX:
        raise ValueError(f"unknown backend (one of: {', '.join(BACKEND_NAMES)})")
    return name


Transport = Literal["auto", "litellm", "http"]
TRANSPORTS: tuple[Transport, ...] = ("auto", "litellm", "http")
_ADAPTER: TypeAdapter[Transport] = TypeAdapter(Transport)


def transport_of(value: object) -> Transport:
    """`value` as a Transport, or a one-line ConfigurationError."""
    try:
        return _ADAPTER.validate_python(value)
    except ValidationError:
        choices = ", ".join(repr(t) for t in TRANSPORTS)
        raise ConfigurationError(f"transport: must be one of {choices} (got {value!r})") from None


# USD per token (input_cost_per_token / output_cost_per_token), for a model litellm's price
# table does not know (a local one, a gateway's alias): 0 is a price (free), None is none.
TokenPrice = Annotated[float, Field(ge=0, allow_inf_nan=False)]
