"""The litellm transport: every provider litellm knows, imported on first use only.

litellm costs seconds and ~200 MB to import, which neither the CLI's --help nor the sandbox
agent should pay, nor a run whose models all take the lean path (lm_http.py). The import runs
in a background thread (`start_import`), so a completion starts its sandbox and uploads its
context meanwhile.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import os
import sys
import threading
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from rlm_orchestrator.config.lm import LMClientConfig


def _litellm() -> Any:
    os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")
    import litellm

    litellm.suppress_debug_info = True
    return litellm


_import_lock = threading.Lock()
_import: concurrent.futures.Future[Any] | None = None


def start_import() -> concurrent.futures.Future[Any]:
    """litellm's import, started once per process in a daemon thread: the future's result is
    the module (or the import's error). It holds the GIL for most of its seconds, but what it
    overlaps with (a sandbox process starting, the context going over gRPC) mostly waits."""
    global _import
    with _import_lock:
        if _import is None:
            future: concurrent.futures.Future[Any] = concurrent.futures.Future()

            def load() -> None:
                try:
                    future.set_result(_litellm())
                except BaseException as exc:  # the waiter re-raises it
                    future.set_exception(exc)

            threading.Thread(target=load, name="litellm-import", daemon=True).start()
            _import = future
        return _import


async def loaded() -> Any:
    """The module once its import is done, waited for without blocking the event loop."""
    future = start_import()
    return future.result() if future.done() else await asyncio.wrap_future(future)


# The key sent to an OpenAI-compatible server of its own api_base when none is configured:
# litellm's OpenAI client refuses to call without one ("Missing credentials").
NO_KEY = "no-key"
_KEYED = {"openai": ("OPENAI_API_KEY",), "hosted_vllm": ("HOSTED_VLLM_API_KEY",)}


def api_key(config: LMClientConfig) -> str | None:
    """The config's key; for an OpenAI-compatible api_base with no key anywhere, NO_KEY."""
    provider = config.litellm_model.partition("/")[0]
    # A server of one's own, named in the config or (as litellm reads it) the environment.
    own_base = config.api_base or (
        provider == "openai"
        and (os.environ.get("OPENAI_BASE_URL") or os.environ.get("OPENAI_API_BASE"))
    )
    if config.api_key or not own_base:
        return config.api_key
    variables = _KEYED.get(provider)
    if variables is None or any(os.environ.get(name) for name in variables):
        return None  # litellm reads the variable as usual
    return NO_KEY


async def call(
    litellm: Any, config: LMClientConfig, messages: list[dict[str, Any]], max_tokens: int | None
) -> Any:
    limit = {} if max_tokens is None else {"max_tokens": max_tokens}
    return await litellm.acompletion(
        model=config.litellm_model,
        messages=messages,
        api_base=config.api_base,
        api_key=api_key(config),
        # Retries are the router's: no hidden second layer in the SDK.
        max_retries=0,
        num_retries=0,
        **limit,
        **config.extra,
    )


def cost(litellm: Any, response: Any) -> float:
    try:
        return float(litellm.completion_cost(completion_response=response) or 0.0)
    except Exception:  # litellm has no price for this model: count it as free
        return 0.0


async def finish_callbacks(timeout: float = 2.0) -> None:
    """Let litellm's background logging worker finish on this event loop, then stop it.

    Its worker is global and bound to the loop of the first call; when that loop closes
    (every `RLM.completion` runs its own `asyncio.run`), recent litellm versions carry
    already-awaited callbacks onto the next loop and fail there. Stopping it while its
    loop still runs avoids that.
    """
    module = sys.modules.get("litellm.litellm_core_utils.logging_worker")
    worker = getattr(module, "GLOBAL_LOGGING_WORKER", None)
    if worker is None:
        return
    with contextlib.suppress(Exception):
        async with asyncio.timeout(timeout):
            await worker.flush()
    with contextlib.suppress(Exception):
        await worker.stop(discard_pending=True, timeout=timeout)
