"""How a model is reached: `transport` of a model's config (backend_kwargs, [[models]], run's).

- "auto": the lean HTTP client for plain OpenAI-compatible calls (rlm_orchestrator/lm_http.py
  says which), litellm for everything else;
- "litellm": always litellm (its provider logic, auth and formats);
- "http": always the lean client; refused for a model it cannot reach.
"""

from __future__ import annotations

from typing import Literal

from pydantic import TypeAdapter, ValidationError

from rlm_orchestrator.exceptions import ConfigurationError

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
