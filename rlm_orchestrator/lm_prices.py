"""Token prices without importing litellm: litellm's own price table, read from its package.

The router runs with LITELLM_LOCAL_MODEL_COST_MAP=True, so `litellm.model_cost` is exactly
this file (model_prices_and_context_window_backup.json, found with find_spec, which does not
import the package). It is 3.5 MB: a full json.load costs ~0.5 s, so a model's entry is found
by its top-level key in the text and only that entry is decoded (cached per key).

`cost()` prices plain chat usage (input, output, cached input, the >N k-token tiers) the way
`litellm.completion_cost` does; for anything else (service tiers, reasoning or audio token
prices) it returns None and the caller asks litellm itself.
"""

from __future__ import annotations

import functools
import importlib.util
import json
import re
import threading
from pathlib import Path
from typing import Any

TABLE_FILE = "model_prices_and_context_window_backup.json"
_TIER = re.compile(r"^input_cost_per_token_above_(\d+)k_tokens$")
_UNUSUAL_TIERS = ("flex", "priority")
_lock = threading.Lock()


@functools.cache
def _table_text() -> str:
    spec = importlib.util.find_spec("litellm")
    if spec is None or not spec.submodule_search_locations:
        return "{}"
    path = Path(next(iter(spec.submodule_search_locations))) / TABLE_FILE
    try:
        return path.read_text(encoding="utf-8")
    except OSError:
        return "{}"


@functools.cache
def _whole_table() -> dict[str, Any]:
    """The parsed table: only when the file is not laid out as `_entry` expects."""
    table = json.loads(_table_text())
    return table if isinstance(table, dict) else {}


def warm_up() -> None:
    """Read the file now (a background thread calls this while the first request is out)."""
    with _lock:
        _table_text()


@functools.cache
def entry(key: str) -> dict[str, Any] | None:
    """The table's entry for `key`, or None."""
    text = _table_text()
    if not text.startswith('{\n    "'):  # not indent=4 any more: parse it all, once
        found = _whole_table().get(key)
        return found if isinstance(found, dict) else None
    at = text.find(f"\n    {json.dumps(key)}: ")
    if at < 0:
        return None
    start = text.index(":", at + 5 + len(json.dumps(key))) + 1
    value, _ = json.JSONDecoder().raw_decode(text, start + 1)
    return value if isinstance(value, dict) else None


def price_entry(provider: str, *models: str) -> dict[str, Any] | None:
    """The first priced entry for these model names (the served one first, then the
    requested one), keyed as litellm keys them: "provider/model", or a bare "model" whose
    provider is this one."""
    for model in models:
        if not model:
            continue
        bare = model.removeprefix(f"{provider}/")
        found = entry(f"{provider}/{bare}")
        if found is None and (plain := entry(bare)) is not None:
            found = plain if plain.get("litellm_provider") == provider else None
        if found is not None and "input_cost_per_token" in found:
            return found
    return None


def model_info(provider: str, model: str) -> dict[str, Any] | None:
    """The table's entry for this model, priced or not (its window, its output limit)."""
    bare = model.removeprefix(f"{provider}/")
    found = entry(f"{provider}/{bare}") if provider else None
    if found is None and (plain := entry(bare)) is not None:
        found = plain if not provider or plain.get("litellm_provider") == provider else None
    return found


@functools.lru_cache(maxsize=1024)
def _priced(
    provider: str, models: tuple[str, ...]
) -> tuple[dict[str, Any], tuple[str, ...]] | None:
    """The price entry of these models and its >N k-token tiers (N, in the entry's order):
    looked up once per pair of names, not per call."""
    price = price_entry(provider, *models)
    if price is None:
        return None
    return price, tuple(m.group(1) for key in price if (m := _TIER.match(key)))


def _cached_tokens(usage: dict[str, Any]) -> int:
    details = usage.get("prompt_tokens_details")
    if isinstance(details, dict) and details:
        return int(details.get("cached_tokens") or 0)
    return int(usage.get("cache_read_input_tokens") or 0)


def _plain(usage: dict[str, Any], price: dict[str, Any], service_tier: Any) -> bool:
    """Whether this usage is priced by token counts alone (no tier, reasoning or audio price)."""
    if service_tier in _UNUSUAL_TIERS and any(k.endswith(service_tier) for k in price):
        return False
    details = usage.get("completion_tokens_details")
    if isinstance(details, dict):
        if details.get("reasoning_tokens") and "output_cost_per_reasoning_token" in price:
            return False
        if details.get("audio_tokens"):
            return False
    prompt_details = usage.get("prompt_tokens_details")
    if isinstance(prompt_details, dict) and prompt_details.get("audio_tokens"):
        return False
    return not usage.get("cache_creation_input_tokens")


def cost(
    provider: str, models: tuple[str, ...], usage: dict[str, Any], service_tier: Any = None
) -> float | None:
    """USD for this usage, 0.0 when no model has a price (litellm raises then, and the router
    counts the call as free), None when only litellm can price it."""
    priced = _priced(provider, models)
    if priced is None:
        return 0.0
    price, tiers = priced
    if not _plain(usage, price, service_tier):
        return None
    prompt = int(usage.get("prompt_tokens") or 0)
    completion = int(usage.get("completion_tokens") or 0)
    cached = _cached_tokens(usage)
    suffix = ""
    for tier in tiers:  # in the entry's order: the last one exceeded counts, as in litellm
        if prompt > int(tier) * 1000:
            suffix = f"_above_{tier}k_tokens"
    input_price = float(price.get(f"input_cost_per_token{suffix}", price["input_cost_per_token"]))
    output_price = float(
        price.get(f"output_cost_per_token{suffix}", price.get("output_cost_per_token", 0.0))
    )
    cache_price = price.get(f"cache_read_input_token_cost{suffix}")
    if cache_price is None:
        cache_price = price.get("cache_read_input_token_cost", input_price)
    return (prompt - cached) * input_price + cached * float(cache_price) + completion * output_price
