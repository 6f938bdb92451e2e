"""The lean HTTP transport and litellm, side by side on the same scripted replies: the same
usage, cost, retries and errors. And a run whose models all take the lean path never imports
litellm."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from typing import Any

import pytest
from conftest import backend_kwargs

from rlm_orchestrator import lm_prices
from rlm_orchestrator.exceptions import ConfigurationError, LMError
from rlm_orchestrator.router import LMClientConfig, LMRouter, UsageTracker
from rlm_orchestrator.testing.scripted_lm import Rule, ScriptedLMServer

TRANSPORTS = ("http", "litellm")


@pytest.fixture(scope="module", autouse=True)
def litellm_imported() -> Iterator[Any]:
    import litellm

    yield litellm


def _router(lm: ScriptedLMServer, transport: str, model: str, **extra: Any) -> LMRouter:
    kwargs = backend_kwargs(lm, model, transport=transport, **extra)
    return LMRouter(LMClientConfig.from_backend("openai", kwargs))


async def _both(lm: ScriptedLMServer, model: str, entries: list[Any], **extra: Any) -> list[Any]:
    """The same scripted replies through each transport: (answer or LMError, requests)."""
    outcomes = []
    for transport in TRANSPORTS:
        lm.reset()
        lm.set_sequence(model, entries)
        router = _router(lm, transport, model, **extra)
        tracker = UsageTracker()
        try:
            result: Any = await router.complete("what does it cost?", tracker=tracker)
        except LMError as exc:
            result = exc
        finally:
            await router.finish_callbacks()
        outcomes.append((result, tracker.summary(), [r.status for r in lm.requests]))
    return outcomes


@pytest.mark.parametrize("model", ["gpt-4o-mini", "gpt-4o", "root"])
async def test_same_usage_and_cost(lm: ScriptedLMServer, model: str) -> None:
    """Priced from litellm's table (gpt-4o*) or unpriced (root: free), on both paths."""
    (lean, lean_usage, _), (lite, lite_usage, _) = await _both(lm, model, ["an answer, long"])
    assert (lean.text, lean.response_model, lean.attempts) == (
        lite.text,
        lite.response_model,
        lite.attempts,
    )
    assert lean.usage == lite.usage and lean_usage == lite_usage
    assert (lean.usage.total_cost > 0) == (model != "root")


async def test_same_cost_at_configured_prices(lm: ScriptedLMServer) -> None:
    prices = {"input_cost_per_token": 0.001, "output_cost_per_token": 0.002}
    (lean, _, _), (lite, _, _) = await _both(lm, "priced", ["some answer"], **prices)
    assert lean.usage == lite.usage and lean.usage.total_cost > 0


async def test_same_retries_on_429_and_5xx(lm: ScriptedLMServer) -> None:
    entries = [Rule("busy", status=429), Rule("down", status=500), Rule("gw", status=503), "ok"]
    (lean, _, lean_requests), (lite, _, lite_requests) = await _both(lm, "root", entries)
    assert lean.text == lite.text == "ok" and lean.attempts == lite.attempts == 4
    assert lean_requests == lite_requests == [429, 500, 503, 200]


@pytest.mark.parametrize(
    ("status", "kind", "tries"),
    [(400, "BadRequestError", 1), (401, "AuthenticationError", 1), (500, "InternalServerError", 4)],
)
async def test_same_error_class(lm: ScriptedLMServer, status: int, kind: str, tries: int) -> None:
    entries = [Rule(f"refused ({status})", status=status)] * 4
    (lean, _, lean_requests), (lite, _, lite_requests) = await _both(lm, "root", entries)
    for error in (lean, lite):
        assert isinstance(error, LMError) and error.status_code == status
        assert f"(HTTP {status})" in str(error) and f"after {tries} attempt(s)" in str(error)
        assert f": {kind}: " in str(error) and f"refused ({status})" in str(error)
        assert type(error.__cause__).__name__ == kind
    assert len(lean_requests) == len(lite_requests) == tries


async def test_same_timeout(lm: ScriptedLMServer) -> None:
    """A reply slower than `timeout` is a Timeout (HTTP 408), retried, on both paths."""
    entries = [Rule("late", delay_seconds=0.5), "in time"]
    (lean, _, _), (lite, _, _) = await _both(lm, "root", entries, timeout=0.2)
    assert lean.text == lite.text == "in time" and lean.attempts == lite.attempts == 2
    entries = [Rule("late", delay_seconds=0.5)] * 2
    (lean, _, _), (lite, _, _) = await _both(lm, "root", entries, timeout=0.2, max_retries=1)
    for error in (lean, lite):
        assert isinstance(error, LMError) and error.status_code == 408
        assert type(error.__cause__).__name__ == "Timeout"


@pytest.mark.parametrize("model", ["gpt-4o-mini", "gpt-4o", "gpt-4.1"])
def test_price_table_agrees_with_litellm(litellm_imported: Any, model: str) -> None:
    """Plain, cached and large prompts, priced from the file and by litellm.completion_cost."""
    for usage in (
        {"prompt_tokens": 1234, "completion_tokens": 56},
        {
            "prompt_tokens": 1234,
            "completion_tokens": 56,
            "prompt_tokens_details": {"cached_tokens": 1000},
        },
        {"prompt_tokens": 300_000, "completion_tokens": 7},
    ):
        usage = {**usage, "total_tokens": usage["prompt_tokens"] + usage["completion_tokens"]}
        reply = {
            "id": "x",
            "model": model,
            "object": "chat.completion",
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": "y"},
                    "finish_reason": "stop",
                }
            ],
            "usage": usage,
        }
        response = litellm_imported.ModelResponse(**reply)
        response._hidden_params["custom_llm_provider"] = "openai"
        expected = litellm_imported.completion_cost(completion_response=response)
        assert lm_prices.cost("openai", (model,), usage) == pytest.approx(expected, rel=1e-9)


def test_which_models_take_the_lean_path() -> None:
    def endpoint(backend: str, **kwargs: Any) -> Any:
        config = LMClientConfig.from_backend(backend, {"api_base": "http://x/v1", **kwargs})
        return LMRouter(config).endpoints[config.model_name]

    assert endpoint("openai", model_name="gpt-4o-mini") is not None
    assert endpoint("vllm", model_name="llama", temperature=0) is not None
    assert endpoint("litellm", model_name="hosted_vllm/llama") is not None
    assert endpoint("openai", model_name="gpt-4o-mini", transport="litellm") is None
    assert endpoint("openai", model_name="o3-mini") is None  # litellm rewrites its messages
    assert endpoint("openai", model_name="gpt-4o-mini", api_version="x") is None
    assert endpoint("anthropic", model_name="claude") is None
    assert endpoint("openrouter", model_name="a/b") is None
    assert endpoint("openrouter", model_name="a/b", transport="http") is not None
    with pytest.raises(ConfigurationError, match="transport 'http' is not possible"):
        endpoint("anthropic", model_name="claude", transport="http")
    with pytest.raises(ConfigurationError, match="transport: must be one of"):
        endpoint("openai", model_name="m", transport="fast")


def test_the_key_comes_from_the_environment_and_stays_out_of_repr(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("OPENAI_API_KEY", "sk-from-the-env")
    config = LMClientConfig.from_backend("openai", {"model_name": "m", "api_base": "http://x"})
    endpoint = LMRouter(config).endpoints["m"]
    assert endpoint is not None and endpoint.headers["Authorization"] == "Bearer sk-from-the-env"
    assert "sk-from-the-env" not in repr(endpoint)


NO_LITELLM = """
import sys
from rlm_orchestrator import RLM
rlm = RLM(backend="openai", backend_kwargs={"model_name": "root", "api_base": sys.argv[1],
          "api_key": "sk-test"})
print(rlm.completion("what is 2+2?").response)
assert "litellm" not in sys.modules, "litellm was imported"
print("no litellm")
"""


def test_a_lean_run_never_imports_litellm(lm: ScriptedLMServer) -> None:
    lm.set_sequence("root", ["```repl\nx = 2 + 2\n```", "FINAL_VAR(x)"])
    env = {k: v for k, v in os.environ.items() if k != "PYTHONWARNINGS"}
    result = subprocess.run(
        [sys.executable, "-c", NO_LITELLM, lm.base_url],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["4", "no", "litellm"]
