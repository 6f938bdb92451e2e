"""The RLM contract (docs/rlm-semantics.md): limits, accounting, the trajectory log and LM errors.

End to end through `RLM.completion` against a real sandbox agent and the scripted LM server; the
autouse leak check in conftest.py proves each sandbox is released, whatever stopped the run.
"""

from __future__ import annotations

import importlib
import json
import math
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from conftest import API_KEY, ROOT_MODEL, SUB_MODEL, backend_kwargs, repl

from rlm_orchestrator import (
    RLM,
    CompletionTimeoutError,
    CostLimitExceededError,
    LimitExceededError,
    LMError,
    RLMLogger,
)
from rlm_orchestrator.testing.scripted_lm import RecordedRequest, Rule, ScriptedLMServer

MakeRLM = Callable[..., RLM]
# What these tests set per RLM, a server sets per model in its config ([[models]]).
PRICES_ARE_SERVER_CONFIG = pytest.mark.not_through_server(
    "model prices are the server's configuration (input_cost_per_token in [[models]])"
)
RETRIES_ARE_SERVER_CONFIG = pytest.mark.not_through_server(
    "LM retries are the server's configuration (max_retries in [[models]])"
)


@pytest.fixture(autouse=True, scope="module")
def litellm_imported() -> None:
    """litellm's first import takes seconds inside the first LM call: keep it out of timeouts."""
    importlib.import_module("litellm")


# --- max_cost -----------------------------------------------------------------------------------


@PRICES_ARE_SERVER_CONFIG
def test_max_cost_stops_the_run_with_partial_answer_and_usage(
    make_rlm: MakeRLM, lm: ScriptedLMServer
) -> None:
    priced = backend_kwargs(lm, ROOT_MODEL, input_cost_per_token=0.001, output_cost_per_token=0.001)
    first_response = repl("print(len(context))")
    free_sub = backend_kwargs(lm, SUB_MODEL, input_cost_per_token=0.0)  # a price: no warning
    rlm = make_rlm(
        root=[first_response, "FINAL(never)"],
        backend_kwargs=priced,
        other_backend_kwargs=[free_sub],
        max_cost=0.01,
    )
    with pytest.raises(CostLimitExceededError) as caught:
        rlm.completion("ctx")
    error = caught.value
    assert isinstance(error, LimitExceededError)
    assert error.partial_answer == first_response
    assert error.usage_summary is not None
    root_usage = error.usage_summary.model_usage_summaries[ROOT_MODEL]
    assert root_usage.total_calls == 1
    assert error.current_cost == pytest.approx(root_usage.total_cost) and error.current_cost > 0.01
    assert error.cost_limit == 0.01
    assert len(lm.requests_for(ROOT_MODEL)) == 1


@PRICES_ARE_SERVER_CONFIG
def test_max_cost_counts_sub_call_spend(make_rlm: MakeRLM, lm: ScriptedLMServer) -> None:
    free_root = backend_kwargs(lm, ROOT_MODEL, input_cost_per_token=0.0, output_cost_per_token=0.0)
    priced_sub = backend_kwargs(lm, SUB_MODEL, input_cost_per_token=1.0, output_cost_per_token=1.0)
    rlm = make_rlm(
        root=[repl("x = llm_query('hello')"), "FINAL(never)"],
        sub=["hi there"],
        backend_kwargs=free_root,
        other_backend_kwargs=[priced_sub],
        max_cost=1.0,
    )
    with pytest.raises(CostLimitExceededError) as caught:
        rlm.completion("ctx")
    usage = caught.value.usage_summary
    assert usage is not None
    assert usage.model_usage_summaries[ROOT_MODEL].total_cost == 0.0
    assert usage.model_usage_summaries[SUB_MODEL].total_cost > 1.0
    assert caught.value.current_cost > 1.0
    assert len(lm.requests_for(ROOT_MODEL)) == 1  # stopped before the next root turn


@PRICES_ARE_SERVER_CONFIG
def test_max_cost_not_reached_completes(make_rlm: MakeRLM, lm: ScriptedLMServer) -> None:
    priced_sub = backend_kwargs(
        lm, SUB_MODEL, input_cost_per_token=0.001, output_cost_per_token=0.001
    )
    rlm = make_rlm(
        root=[repl("x = llm_query('hello')"), "FINAL_VAR(x)"],
        sub=["hi"],
        backend_kwargs=backend_kwargs(lm, ROOT_MODEL, input_cost_per_token=0.0),
        other_backend_kwargs=[priced_sub],
        max_cost=1.0,
    )
    result = rlm.completion("ctx")
    assert result.response == "hi"
    assert 0 < result.usage_summary.total_cost < 1.0


# --- timeouts -----------------------------------------------------------------------------------


@pytest.mark.parametrize("option", ["timeout_seconds", "iteration_timeout_seconds"])
def test_timeout_stops_a_sleeping_block(
    make_rlm: MakeRLM, lm: ScriptedLMServer, option: str
) -> None:
    sleeper = repl("import time\ntime.sleep(30)")
    rlm = make_rlm(root=[sleeper, "FINAL(never)"], **{option: 1.0})
    started = time.monotonic()
    with pytest.raises(CompletionTimeoutError) as caught:
        rlm.completion("ctx")
    elapsed = time.monotonic() - started
    assert elapsed < 5.0
    error = caught.value
    assert error.timeout_seconds == 1.0
    assert error.elapsed_seconds >= 1.0
    assert error.partial_answer == sleeper
    assert error.iterations == 1
    assert error.usage_summary is not None
    assert error.usage_summary.model_usage_summaries[ROOT_MODEL].total_calls == 1


def test_iteration_timeout_applies_per_turn(make_rlm: MakeRLM, lm: ScriptedLMServer) -> None:
    """Three turns of 0.4 s each pass a per-iteration limit of 1 s."""
    nap = repl("import time\ntime.sleep(0.4)")
    rlm = make_rlm(root=[nap, nap, nap, "FINAL(rested)"], iteration_timeout_seconds=1.0)
    assert rlm.completion("ctx").response == "rested"


def test_persistent_session_survives_a_timed_out_completion(
    make_rlm: MakeRLM, lm: ScriptedLMServer
) -> None:
    root = [
        repl("kept = 'still here'"),
        "FINAL(one)",
        repl("import time\ntime.sleep(30)"),
        repl("print(kept)"),
        "FINAL_VAR(kept)",
    ]
    with make_rlm(root=root, persistent=True, iteration_timeout_seconds=1.0) as rlm:
        assert rlm.completion("first").response == "one"
        with pytest.raises(CompletionTimeoutError):
            rlm.completion("second")
        assert rlm.completion("third").response == "still here"


# --- usage --------------------------------------------------------------------------------------


def expected_tokens(requests: list[RecordedRequest]) -> tuple[int, int]:
    """Input/output tokens the scripted server reports: ceil(chars / 4), at least 1."""
    inputs = sum(
        max(1, math.ceil(sum(len(str(m["content"])) for m in r.messages) / 4)) for r in requests
    )
    outputs = sum(max(1, math.ceil(len(r.reply or "") / 4)) for r in requests)
    return inputs, outputs


def test_usage_summary_counts_root_and_sub_calls(make_rlm: MakeRLM, lm: ScriptedLMServer) -> None:
    root = [
        repl("a = llm_query('first')\nb = llm_query_batched(['second', 'third'])"),
        "FINAL(done)",
    ]
    result = make_rlm(root=root, sub=["one", "two", "three"]).completion("ctx")
    usage = result.usage_summary.model_usage_summaries
    assert set(usage) == {ROOT_MODEL, SUB_MODEL}
    for model, calls in [(ROOT_MODEL, 2), (SUB_MODEL, 3)]:
        requests = lm.requests_for(model)
        assert usage[model].total_calls == len(requests) == calls
        assert (
            usage[model].total_input_tokens,
            usage[model].total_output_tokens,
        ) == expected_tokens(requests)
    assert result.usage_summary.total_calls == 5


# --- trajectory log -----------------------------------------------------------------------------


@pytest.mark.not_through_server(
    "the JSONL logger is the in-process RLM's; a server keeps traces in its own store"
)
def test_jsonl_log_has_metadata_then_one_line_per_iteration(
    make_rlm: MakeRLM, lm: ScriptedLMServer, tmp_path: Path
) -> None:
    logger = RLMLogger(tmp_path)
    root = [repl("x = llm_query('q')\nprint(x)"), "FINAL_VAR(x)"]
    result = make_rlm(root=root, sub=["logged answer"], logger=logger).completion(
        "ctx", root_prompt="Q"
    )
    assert result.response == "logged answer"
    text = Path(logger.log_file_path).read_text(encoding="utf-8")
    assert API_KEY not in text
    lines = [json.loads(line) for line in text.splitlines()]
    assert [line["type"] for line in lines] == ["metadata", "iteration", "iteration"]
    metadata = lines[0]
    assert metadata["root_model"] == ROOT_MODEL and metadata["backend"] == "openai"
    assert "api_key" not in metadata["backend_kwargs"]
    first, second = lines[1], lines[2]
    for line in (first, second):
        assert {"prompt", "response", "code_blocks", "final_answer", "iteration_time"} <= set(line)
    assert first["response"] == root[0]
    assert first["prompt"][0]["role"] == "system"
    assert first["final_answer"] is None
    (block,) = first["code_blocks"]
    assert block["code"] == "x = llm_query('q')\nprint(x)"
    assert "logged answer" in block["result"]["stdout"]
    assert block["result"]["rlm_calls"][0]["response"] == "logged answer"
    assert second["code_blocks"] == [] and second["final_answer"] == "logged answer"


# --- root LM errors -----------------------------------------------------------------------------


@RETRIES_ARE_SERVER_CONFIG
def test_root_lm_failing_for_good_raises_lm_error(make_rlm: MakeRLM, lm: ScriptedLMServer) -> None:
    lm.add_rule(Rule("server down", model=ROOT_MODEL, status=500))
    rlm = make_rlm(backend_kwargs=backend_kwargs(lm, ROOT_MODEL, max_retries=0))
    with pytest.raises(LMError) as caught:
        rlm.completion("ctx")
    assert caught.value.model == ROOT_MODEL
    assert caught.value.status_code == 500
    assert "server down" in str(caught.value)
    assert all(r.status == 500 for r in lm.requests_for(ROOT_MODEL))


@RETRIES_ARE_SERVER_CONFIG
def test_root_lm_attempts_are_exactly_max_retries_plus_one(
    make_rlm: MakeRLM, lm: ScriptedLMServer
) -> None:
    lm.add_rule(Rule("server down", model=ROOT_MODEL, status=500))
    rlm = make_rlm(backend_kwargs=backend_kwargs(lm, ROOT_MODEL, max_retries=2))
    with pytest.raises(LMError):
        rlm.completion("ctx")
    # The first attempt and two retries: no hidden retry layer in the SDK underneath.
    assert len(lm.requests_for(ROOT_MODEL)) == 3


def test_root_lm_rate_limit_is_retried_transparently(
    make_rlm: MakeRLM, lm: ScriptedLMServer
) -> None:
    lm.set_sequence(ROOT_MODEL, [Rule("slow down", status=429), "FINAL(after a retry)"])
    assert make_rlm().completion("ctx").response == "after a retry"
    assert [r.status for r in lm.requests_for(ROOT_MODEL)] == [429, 200]


def test_bad_request_is_not_retried(make_rlm: MakeRLM, lm: ScriptedLMServer) -> None:
    lm.add_rule(Rule("invalid", model=ROOT_MODEL, status=400))
    with pytest.raises(LMError) as caught:
        make_rlm().completion("ctx")
    assert caught.value.status_code == 400
    assert len(lm.requests_for(ROOT_MODEL)) == 1
