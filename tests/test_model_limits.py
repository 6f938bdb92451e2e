"""What real models do that scripted ones did not (issue 19): runaway replies, answers cut by
max_tokens, windows a long session outgrows, and errors that must keep what was paid for.

The scripted server behaves like a real one here (rlm_orchestrator/testing/model_limits.py):
it cuts replies at the request's max_tokens with finish_reason "length" and, given a window,
refuses a request that does not fit with llama.cpp's / OpenAI's HTTP 400.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import pytest
from conftest import ROOT_MODEL, SUB_MODEL, backend_kwargs, repl

from rlm_orchestrator import RLM, ContextWindowExceededError, LMError
from rlm_orchestrator import events as ev
from rlm_orchestrator.testing.scripted_lm import Rule, Script, ScriptedLMServer

WINDOW = 8192


@pytest.fixture
def windowed() -> Iterator[ScriptedLMServer]:
    """A scripted server of its own that enforces an 8 K window, as llama.cpp does."""
    with ScriptedLMServer(context_window=WINDOW) as server:
        yield server


def make(server: ScriptedLMServer, root: dict[str, Any] | None = None, **kwargs: Any) -> RLM:
    events: list[ev.Event] = []
    rlm = RLM(
        backend="openai",
        backend_kwargs={**backend_kwargs(server, ROOT_MODEL), **(root or {})},
        other_backends=["openai"],
        other_backend_kwargs=[kwargs.pop("sub", backend_kwargs(server, SUB_MODEL))],
        environment="local",
        on_event=events.append,
        **kwargs,
    )
    rlm.events = events  # type: ignore[attr-defined]
    return rlm


def of(rlm: RLM, kind: type[Any]) -> list[Any]:
    return [e for e in rlm.events if isinstance(e, kind)]  # type: ignore[attr-defined]


def test_every_call_carries_the_default_max_tokens(lm: ScriptedLMServer) -> None:
    lm.set_sequence(ROOT_MODEL, [repl("print(llm_query('hi'))"), "FINAL(ok)"])
    lm.set_sequence(SUB_MODEL, ["hello"])
    assert make(lm).completion("ctx").response == "ok"
    assert {r.body.get("max_tokens") for r in lm.requests} == {4096}


def test_a_runaway_root_reply_is_capped_and_its_open_block_not_run(lm: ScriptedLMServer) -> None:
    runaway = "Let me look.\n```repl\nmarker = 'ran'\n" + "x = 1\n" * 3000
    lm.set_sequence(ROOT_MODEL, [runaway, repl("print(globals().get('marker'))"), "FINAL(done)"])
    rlm = make(lm, {"max_tokens": 200})
    result = rlm.completion("ctx")
    assert result.response == "done"
    first, second, third = lm.requests_for(ROOT_MODEL)
    assert first.body["max_tokens"] == 200
    # Cut at 200 tokens (800 characters), never run half-written; the model was told.
    told = second.messages[-2]["content"]
    assert "cut off by the output limit" in told and "was not run" in told
    assert "None" in third.messages[-2]["content"]  # `marker` was never set
    responses = of(rlm, ev.RootResponse)
    assert [r.finish_reason for r in responses] == ["length", "stop", "stop"]
    assert len(responses[0].text) == 800
    assert result.usage_summary.model_usage_summaries[ROOT_MODEL].truncated_calls == 1


def test_a_sub_answer_cut_by_max_tokens_is_marked(lm: ScriptedLMServer) -> None:
    code = "a = llm_query('tell me everything')\nprint(len(a) > 40, a.endswith('tokens]'))"
    lm.set_sequence(ROOT_MODEL, [repl(code), "FINAL(ok)"])
    lm.set_sequence(SUB_MODEL, ["word " * 500])
    rlm = make(lm, sub=backend_kwargs(lm, SUB_MODEL, max_tokens=10))
    result = rlm.completion("ctx")
    assert "True True" in lm.requests_for(ROOT_MODEL)[1].messages[-2]["content"]
    (finished,) = of(rlm, ev.SubCallFinished)
    assert finished.truncated
    assert result.usage_summary.model_usage_summaries[SUB_MODEL].truncated_calls == 1


def test_twenty_turns_of_large_outputs_stay_inside_an_8k_window(
    windowed: ScriptedLMServer,
) -> None:
    # Each turn thinks aloud (~3,000 characters) and prints 20,000 characters (~5,000 tokens):
    # two turns alone exceed the window.
    thinking = "I look at the next part of the context and keep what matters. " * 48
    turns = [thinking + repl(f"step_{i} = {i}\nprint('{i}' * 20000)") for i in range(20)]
    windowed.set_script(
        Script(rules=[Rule("Steps 0 to n printed long runs of digits.", contains="## Turn ")])
    )
    windowed.set_sequence(ROOT_MODEL, [*turns, repl("print(step_19 + step_3)"), "FINAL(22)"])
    rlm = make(windowed, {"context_window": WINDOW}, max_iterations=25)
    result = rlm.completion("ctx", root_prompt="Add step 19 and step 3.")
    assert result.response == "22"
    refused = [r for r in windowed.requests if r.status != 200]
    assert refused == [], [r.reply for r in refused]
    compacted = of(rlm, ev.ContextCompacted)
    assert {c.stage for c in compacted} >= {"outputs", "summary"}
    assert all(c.tokens_after < c.tokens_before for c in compacted)
    # The variables survived (the REPL is untouched): only what the model sees was compacted.
    assert "22" in windowed.requests_for(ROOT_MODEL)[-1].messages[-2]["content"]
    # The system prompt and the question were kept whole in every request.
    system = windowed.requests_for(ROOT_MODEL)[0].messages[0]
    for request in windowed.requests_for(ROOT_MODEL):
        if "## Turn " in request.last_user_message:
            continue  # a summary request
        assert request.messages[0] == system
        assert "Add step 19 and step 3." in request.messages[-1]["content"]


def test_the_window_is_learned_from_the_servers_refusal(windowed: ScriptedLMServer) -> None:
    windowed.context_window = 4096
    turns = [repl(f"print('{i}' * 6000)") for i in range(4)]
    windowed.set_script(Script(rules=[Rule("Printed digits.", contains="## Turn ")]))
    windowed.set_sequence(ROOT_MODEL, [*turns, "FINAL(done)"])
    # "root" is in no model table and no window is configured: only the refusal tells.
    rlm = make(windowed, {"max_tokens": 512})
    assert rlm.completion("ctx").response == "done"
    refused = [r for r in windowed.requests if r.status == 400]
    assert len(refused) == 1
    assert of(rlm, ev.ContextCompacted)
    assert windowed.requests[-1].status == 200


def test_a_conversation_that_cannot_fit_fails_before_anything_is_sent(
    windowed: ScriptedLMServer,
) -> None:
    windowed.set_sequence(ROOT_MODEL, ["FINAL(never)"])
    rlm = make(windowed, {"context_window": 300})
    with pytest.raises(ContextWindowExceededError) as caught:
        rlm.completion("ctx")
    assert windowed.requests == []
    assert caught.value.context_window == 300
    assert caught.value.iterations == 1
    assert caught.value.usage_summary is not None


def test_an_lm_error_carries_usage_iterations_and_the_last_response(
    lm: ScriptedLMServer,
) -> None:
    first = repl("x = 1")
    lm.set_sequence(ROOT_MODEL, [first, Rule("the model is gone", status=400)])
    with pytest.raises(LMError) as caught:
        make(lm).completion("ctx")
    error = caught.value
    assert error.iterations == 2
    assert error.last_response == first and error.partial_answer == first
    assert error.usage_summary is not None
    assert error.usage_summary.model_usage_summaries[ROOT_MODEL].total_calls == 1


def test_run_takes_the_call_limits_as_flags(lm: ScriptedLMServer) -> None:
    from test_cli import run_in_process

    lm.set_sequence(ROOT_MODEL, [repl("print(llm_query('q'))"), "FINAL(ok)"])
    lm.set_sequence(SUB_MODEL, ["a"])
    flags = ["--max-tokens", "300", "--context-window", "9000", "--request-timeout", "30"]
    args = ["run", "-c", "-", "-q", "?", "--model", ROOT_MODEL, "--sub-model", SUB_MODEL]
    code, stdout, stderr = run_in_process(
        *args, "--api-base", lm.base_url, "--quiet", *flags, stdin="ctx"
    )
    assert (code, stdout) == (0, "ok\n"), stderr
    assert {r.body["max_tokens"] for r in lm.requests} == {300}


def test_run_json_reports_a_failure_with_what_it_cost(lm: ScriptedLMServer) -> None:
    from test_cli import run_in_process

    first = repl("x = 1")
    lm.set_sequence(ROOT_MODEL, [first, Rule("the model is gone", status=400)])
    args = ["run", "-c", "-", "-q", "?", "--model", ROOT_MODEL, "--api-base", lm.base_url]
    code, stdout, stderr = run_in_process(*args, "--json", "--quiet", stdin="ctx")
    assert code == 1
    report = json.loads(stdout)
    assert report["error"]["type"] == "LMError"
    assert report["iterations"] == 2 and report["last_response"] == first
    assert report["usage_summary"]["model_usage_summaries"][ROOT_MODEL]["total_calls"] == 1
    assert "stopped after 2 turn(s): 1 LM calls" in stderr


def test_a_failure_through_the_server_carries_usage_and_the_last_response(
    orchestrator_server: Any, lm: ScriptedLMServer
) -> None:
    first = repl("x = 1")
    lm.set_sequence(ROOT_MODEL, [first, Rule("the model is gone", status=400)])
    with orchestrator_server.client() as client, pytest.raises(LMError) as caught:
        client.completion("ctx", "?")
    error = caught.value
    assert error.iterations == 2 and error.last_response == first
    assert error.usage_summary is not None and error.usage_summary.total_calls == 1


def test_a_sub_call_that_cannot_fit_is_refused_without_a_request(lm: ScriptedLMServer) -> None:
    code = "a = llm_query('word ' * 2000)\nprint(a[:60])"
    lm.set_sequence(ROOT_MODEL, [repl(code), "FINAL(ok)"])
    rlm = make(lm, sub=backend_kwargs(lm, SUB_MODEL, context_window=1000))
    rlm.completion("ctx")
    assert lm.requests_for(SUB_MODEL) == []
    shown = lm.requests_for(ROOT_MODEL)[1].messages[-2]["content"]
    assert "Error: not sent to 'sub'" in shown
