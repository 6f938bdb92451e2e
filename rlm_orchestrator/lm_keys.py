"""Whether a model has the API key its provider needs, checked before anything is sent.

Without it, litellm's client refuses to call ("Missing credentials") and reports it as an HTTP
500, retried like one: the run failed after 4 "HTTP 500" attempts although no request was
sent. A server of one's own (an api_base: llama.cpp, vLLM, a proxy) may take no key: none is
required then (lm_litellm sends a placeholder where litellm insists on one).
"""

from __future__ import annotations

import os

from rlm_orchestrator.config.lm import LMClientConfig

# Providers whose own API always needs a key, and the variables litellm reads it from (the
# others: azure, gemini, vertex... have other ways to authenticate, left to litellm).
KEY_VARIABLES = {
    "openai": ("OPENAI_API_KEY",),
    "anthropic": ("ANTHROPIC_API_KEY",),
    "openrouter": ("OPENROUTER_API_KEY", "OR_API_KEY"),
}
# Where the OpenAI client reads a base URL of one's own from, besides api_base.
_OPENAI_BASE_VARIABLES = ("OPENAI_BASE_URL", "OPENAI_API_BASE")


def missing_key(config: LMClientConfig) -> str | None:
    """What is missing when this model's provider needs a key and none is set; else None."""
    if config.api_key or config.api_base:
        return None
    provider = config.litellm_model.partition("/")[0]
    variables = KEY_VARIABLES.get(provider)
    if variables is None or any(os.environ.get(name) for name in variables):
        return None
    if provider == "openai" and any(os.environ.get(name) for name in _OPENAI_BASE_VARIABLES):
        return None
    return (
        f"model {config.model_name!r}: no API key for {provider}: set {variables[0]} (or "
        "api_key in backend_kwargs; run: --api-key or RLM_RUN_API_KEY; a server: the model's "
        "api_key_env). A server of your own that takes no key needs only api_base (run: "
        "--api-base)."
    )
