"""How a model is reached: `transport` of a model's config (backend_kwargs, [[models]], run's).

- "auto": the lean HTTP client for plain OpenAI-compatible calls (rlm_orchestrator/lm_http.py
  says which), litellm for everything else;
- "litellm": always litellm (its provider logic, auth and formats);
- "http": always the lean client; refused for a model it cannot reach.

`LMClientConfig` is one model the router can call, built from backend_kwargs (RLM's, run's
flags, a server's [[models]] entry): where it is, its key, retries, prices, and the limits of
one call (`max_tokens`, `timeout`) and of its window (`context_window`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Annotated, Any, Literal

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


_PORTKEY_BASE = "https://api.portkey.ai/v1"
# The output limit of a call when none is configured: a runaway reply (a small model looping)
# stops here instead of at the window, which fails the next request. 0 sends none.
DEFAULT_MAX_TOKENS = 4096
# Keys of backend_kwargs that are ours; every other key is passed on to litellm as is
# (`timeout`, the per-call request timeout, included: litellm and the lean client both take it).
_OWN_KEYS = {
    "model_name",
    "api_base",
    "base_url",
    "azure_endpoint",
    "api_key",
    "max_retries",
    "retry_initial_delay",
    "max_concurrency",
    "input_cost_per_token",
    "output_cost_per_token",
    "transport",
    "max_tokens",
    "context_window",
}


def _positive_int(kwargs: dict[str, Any], key: str, default: int | None) -> int | None:
    value = kwargs.get(key, default)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | str) or not str(value).isdigit():
        raise ConfigurationError(f"{key}: must be a whole number >= 0 (got {value!r})")
    return int(value)


@dataclass(frozen=True)
class LMClientConfig:
    """One model the router can call. `repr` never shows the key."""

    backend: str
    model_name: str
    litellm_model: str
    api_base: str | None = None
    api_key: str | None = field(default=None, repr=False)
    extra: dict[str, Any] = field(default_factory=dict)
    max_retries: int = 3
    retry_initial_delay: float = 0.5
    max_concurrency: int = 16
    input_cost_per_token: float | None = None
    output_cost_per_token: float | None = None
    # "auto": the lean HTTP path where it gives what litellm would (lm_http.endpoint_for).
    transport: Transport = "auto"
    # Output tokens one call may produce (None: none sent, the provider's default applies).
    max_tokens: int | None = DEFAULT_MAX_TOKENS
    # Prompt + output tokens the model takes; None: litellm's model table says, else learned
    # from the server's "maximum context length" error (context_window.py).
    context_window: int | None = None

    @classmethod
    def from_backend(cls, backend: str, kwargs: dict[str, Any] | None) -> LMClientConfig:
        kwargs = dict(kwargs or {})
        if backend not in PROVIDER_PREFIX:
            known = ", ".join(sorted(PROVIDER_PREFIX))
            raise ConfigurationError(f"unknown backend {backend!r}; known backends: {known}")
        model_name = kwargs.get("model_name")
        if not model_name:
            raise ConfigurationError(f"backend_kwargs for {backend!r} need a 'model_name'")
        prefix = PROVIDER_PREFIX[backend]
        litellm_model = (
            model_name
            if not prefix or model_name.startswith(f"{prefix}/")
            else f"{prefix}/{model_name}"
        )
        api_base = kwargs.get("api_base") or kwargs.get("base_url") or kwargs.get("azure_endpoint")
        if backend == "portkey" and not api_base:
            api_base = _PORTKEY_BASE
        costs = {
            k: float(kwargs[k])
            for k in ("input_cost_per_token", "output_cost_per_token")
            if k in kwargs and kwargs[k] is not None
        }
        timeout = kwargs.get("timeout")
        if timeout is not None and (isinstance(timeout, bool) or float(timeout) <= 0):
            raise ConfigurationError(f"timeout: must be a number of seconds > 0 (got {timeout!r})")
        max_tokens = _positive_int(kwargs, "max_tokens", DEFAULT_MAX_TOKENS)
        config = cls(
            backend=backend,
            model_name=str(model_name),
            litellm_model=litellm_model,
            api_base=api_base,
            api_key=kwargs.get("api_key"),
            extra={k: v for k, v in kwargs.items() if k not in _OWN_KEYS},
            max_retries=int(kwargs.get("max_retries", cls.max_retries)),
            retry_initial_delay=float(kwargs.get("retry_initial_delay", cls.retry_initial_delay)),
            max_concurrency=int(kwargs.get("max_concurrency", cls.max_concurrency)),
            transport=transport_of(kwargs.get("transport", cls.transport)),
            max_tokens=max_tokens or None,
            context_window=_positive_int(kwargs, "context_window", None) or None,
            **costs,  # type: ignore[arg-type]
        )
        if config.transport == "http":
            from rlm_orchestrator import lm_http  # the lean client imports this module

            lm_http.endpoint_for(config)  # refused now, not at the first call
        return config

    def configured_cost(self, input_tokens: int, output_tokens: int) -> float | None:
        """The cost at the prices this config sets, or None when it sets none."""
        if self.input_cost_per_token is None and self.output_cost_per_token is None:
            return None
        return input_tokens * (self.input_cost_per_token or 0.0) + output_tokens * (
            self.output_cost_per_token or 0.0
        )


# USD per token (input_cost_per_token / output_cost_per_token), for a model litellm's price
# table does not know (a local one, a gateway's alias): 0 is a price (free), None is none.
TokenPrice = Annotated[float, Field(ge=0, allow_inf_nan=False)]
