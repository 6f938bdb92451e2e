"""Whether `max_cost` can be enforced: a model without a price counts every call as $0.

A model is priced when its config sets a price (input_cost_per_token / output_cost_per_token;
0 said on purpose counts) or litellm's price table has a non-zero one for it (read by
lm_prices.py, without importing litellm: the table lists some local and free-tier models at $0).
Local models (llama.cpp, vLLM, Ollama...) and a gateway's aliases usually have none: a budget
then silently never stops them. Every surface says so instead: RLM(...) warns with an
UnpricedModelWarning, `run` prints a warning line, the server logs it at start and sends a
Notice to a request that sets max_cost.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable

from rlm_orchestrator import lm_prices
from rlm_orchestrator.config.lm import LMClientConfig

# litellm providers whose replies carry their own cost (litellm reads it), whatever the table.
PRICED_BY_PROVIDER = frozenset({"openrouter"})


class UnpricedModelWarning(UserWarning):
    """max_cost is set, but a model has no price: its calls count as $0 against it."""


def has_price(config: LMClientConfig) -> bool:
    """Whether calls to this model cost anything as the router counts them."""
    if config.input_cost_per_token is not None or config.output_cost_per_token is not None:
        return True
    provider, _, model = config.litellm_model.partition("/")
    if provider in PRICED_BY_PROVIDER:
        return True
    # No provider prefix (backend "litellm" and a bare name): the name is litellm's key.
    found = lm_prices.price_entry(provider, model) if model else lm_prices.entry(provider)
    return found is not None and _costs_something(found)


def _costs_something(entry: dict[str, object]) -> bool:
    prices = (entry.get("input_cost_per_token"), entry.get("output_cost_per_token"))
    return any(isinstance(price, int | float) and price > 0 for price in prices)


def unpriced(configs: Iterable[LMClientConfig]) -> list[str]:
    """The names of the models among `configs` that have no price, once each, in order."""
    names = [config.model_name for config in configs if not has_price(config)]
    return list(dict.fromkeys(names))


def unenforceable(max_cost: float | None, configs: Iterable[LMClientConfig]) -> str | None:
    """Why `max_cost` cannot be enforced for some of these models, or None (it can, or is
    not set)."""
    if max_cost is None:
        return None
    names = unpriced(configs)
    if not names:
        return None
    listed = ", ".join(repr(name) for name in names)
    model = "model" if len(names) == 1 else "models"
    return (
        f"max_cost=${max_cost:g} cannot be enforced for the {model} {listed}: no price is "
        "configured and litellm's price table has none (or $0), so its calls count as $0. Set "
        "input_cost_per_token / output_cost_per_token (run: --input-cost-per-token, "
        "--output-cost-per-token; a server: in its [[models]] entry)."
    )


def warn_if_unenforceable(max_cost: float | None, configs: Iterable[LMClientConfig]) -> None:
    """An UnpricedModelWarning (for RLM's caller) when max_cost cannot be enforced."""
    reason = unenforceable(max_cost, configs)
    if reason is not None:
        warnings.warn(reason, UnpricedModelWarning, stacklevel=3)
