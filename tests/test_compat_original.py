"""What code written against the original library (groknroll 2.0.0, rlms 0.1.0) meets first:
constructing an RLM without a model, the exceptions, the top-level names, REPLResult, and
the variables' values in the trajectory log. Real local sandboxes and the scripted LM.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from conftest import ROOT_MODEL, backend_kwargs, repl

import rlm_orchestrator
from rlm_orchestrator import (
    RLM,
    CompletionTimeoutError,
    ConfigurationError,
    CostLimitExceededError,
    LimitExceededError,
    REPLExecutionError,
    REPLResult,
    RLMChatCompletion,
    RLMError,
    RLMLogger,
    UsageSummary,
)
from rlm_orchestrator.testing.scripted_lm import ScriptedLMServer
from rlm_orchestrator.types import MAX_LOGGED_VALUE_CHARS

# --- RLM() without a model ----------------------------------------------------------------------


def test_rlm_builds_without_backend_kwargs() -> None:
    rlm = RLM()
    assert rlm.backend == "openai" and rlm.backend_kwargs == {}
    assert rlm.metadata().root_model == "unknown"


def test_a_completion_without_a_model_is_a_clear_configuration_error(
    lm: ScriptedLMServer,
) -> None:
    with pytest.raises(ConfigurationError, match="model_name"):
        RLM(backend_kwargs={"api_base": lm.base_url}).completion("ctx")
    assert lm.requests_for(ROOT_MODEL) == []


def test_what_can_be_checked_without_a_model_still_is() -> None:
    with pytest.raises(ConfigurationError, match="unknown backend"):
        RLM(backend="bogus")
    with pytest.raises(ConfigurationError, match="transport"):
        RLM(backend_kwargs={"transport": "pigeon"})


def test_a_model_given_later_works(lm: ScriptedLMServer) -> None:
    lm.set_sequence(ROOT_MODEL, [repl("x = 1"), "FINAL(late)"])
    rlm = RLM(backend_kwargs=backend_kwargs(lm, ROOT_MODEL))
    assert rlm.completion("ctx").response == "late"


# --- exceptions ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("error", "fields"),
    [
        (CostLimitExceededError, ("current_cost", "cost_limit")),
        (CompletionTimeoutError, ("timeout_seconds", "elapsed_seconds")),
    ],
)
def test_limit_errors_need_only_a_message(
    error: type[LimitExceededError], fields: tuple[str, str]
) -> None:
    exc = error("over the limit")
    assert str(exc) == "over the limit"
    assert isinstance(exc, LimitExceededError) and isinstance(exc, RLMError)
    assert [getattr(exc, name) for name in fields] == [None, None]
    assert exc.partial_answer is None and exc.iterations == 0
    with pytest.raises(error, match="over the limit"):
        raise exc


def test_limit_errors_keep_their_keyword_fields() -> None:
    exc = CostLimitExceededError("m", current_cost=2.0, cost_limit=1.0, partial_answer="p")
    assert (exc.current_cost, exc.cost_limit, exc.partial_answer) == (2.0, 1.0, "p")
    timeout = CompletionTimeoutError("m", timeout_seconds=5.0, elapsed_seconds=6.0)
    assert (timeout.timeout_seconds, timeout.elapsed_seconds) == (5.0, 6.0)


def test_repl_execution_error_is_a_top_level_name() -> None:
    assert "REPLExecutionError" in rlm_orchestrator.__all__
    assert "REPLExecutionError" in dir(rlm_orchestrator)
    exc = REPLExecutionError("boom", "1 / 0", "ZeroDivisionError: division by zero")
    assert isinstance(exc, RLMError) and str(exc) == "boom"
    assert exc.source_code == "1 / 0" and exc.stderr.startswith("ZeroDivisionError")
    assert exc.code == "INTERNAL"  # the gRPC status, as on every error of this package
    assert REPLExecutionError("only a message").source_code is None


# --- REPLResult ---------------------------------------------------------------------------------


def test_repl_result_takes_locals_as_the_original() -> None:
    result = REPLResult("out", "", {"x": 1, "name": "n"}, 0.5)
    assert result.locals == {"x": 1, "name": "n"} and result.variables == ["x", "name"]
    assert result.rlm_calls == [] and result.llm_calls == []
    assert result.to_dict()["locals"] == {"x": 1, "name": "n"}
    by_keyword = REPLResult(stdout="a", stderr="b", locals={"y": [1, 2]}, execution_time=1.0)
    assert by_keyword.to_dict()["locals"] == {"y": [1, 2]}


def test_repl_result_still_takes_variables() -> None:
    result = REPLResult(stdout="", stderr="", variables=["a", "b"], execution_time=0.1)
    assert result.variables == ["a", "b"]
    assert result.to_dict()["locals"] == {"a": None, "b": None}


def test_repl_result_prints_as_the_original() -> None:
    call = RLMChatCompletion("m", "p", "r", UsageSummary(), 0.1)
    result = REPLResult("test", "warn", {"x": 1}, 0.25, [call])
    assert str(result) == (
        "REPLResult(stdout=test, stderr=warn, locals={'x': 1}, execution_time=0.25, rlm_calls=1)"
    )


def test_repl_result_to_dict_renders_values_as_the_original_and_cuts_long_ones() -> None:
    values = {"mod": os, "f": len, "t": (1, "a"), "long": "z" * (MAX_LOGGED_VALUE_CHARS + 5)}
    shown = REPLResult("", "", values, 0.0).to_dict()["locals"]
    assert shown["mod"] == "<module 'os'>"
    assert shown["f"] == "<builtin_function_or_method 'len'>"
    assert shown["t"] == [1, "a"]
    assert shown["long"].startswith("z" * MAX_LOGGED_VALUE_CHARS)
    assert shown["long"].endswith("[5 more characters]")
    json.dumps(shown)


# --- the trajectory log carries the values --------------------------------------------------------


def test_the_trajectory_log_has_the_variables_values(lm: ScriptedLMServer, tmp_path: Path) -> None:
    code = "n = 6 * 7\nok = True\nnothing = None\nword = 'hi'\nbig = 'w' * 5000\ndef f(): pass"
    lm.set_sequence(ROOT_MODEL, [repl(code), "FINAL_VAR(word)"])
    logger = RLMLogger(tmp_path)
    rlm = RLM(backend_kwargs=backend_kwargs(lm, ROOT_MODEL), logger=logger)
    assert rlm.completion("the context").response == "hi"
    lines = [json.loads(line) for line in Path(logger.log_file_path).read_text().splitlines()]
    (block,) = lines[1]["code_blocks"]
    values = block["result"]["locals"]
    assert values == {
        "n": 42,
        "ok": True,
        "nothing": None,
        "word": "hi",
        "big": "<str of 5000 characters, not logged>",
    }
