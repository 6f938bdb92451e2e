"""The RLM contract (docs/rlm-semantics.md): inside the sandbox's REPL namespace, end to end.

Contexts, `llm_query` routing, `llm_query_batched`, SHOW_VARS, reserved names, exceptions,
output truncation and persistent multi-turn sessions, all through `RLM.completion` against a
real sandbox agent and the scripted LM server.
"""

from __future__ import annotations

import re
import threading
import time
from collections.abc import Callable
from typing import Any

import pytest
from conftest import OTHER_MODEL, ROOT_MODEL, SUB_MODEL, _agent_processes, backend_kwargs, repl

from rlm_orchestrator import RLM
from rlm_orchestrator import events as ev
from rlm_orchestrator.testing.scripted_lm import RecordedRequest, Rule, ScriptedLMServer

MakeRLM = Callable[..., RLM]


def code_results(request: RecordedRequest) -> list[str]:
    """The "Code executed: ..." user messages the root LM was shown, in order."""
    return [
        str(m["content"])
        for m in request.messages
        if m["role"] == "user" and str(m["content"]).startswith("Code executed:")
    ]


def outputs(request: RecordedRequest) -> list[str]:
    """The REPL output part of each code result message."""
    return [shown.split("\nREPL output:\n", 1)[1] for shown in code_results(request)]


def run_blocks(
    make_rlm: MakeRLM, lm: ScriptedLMServer, *blocks: str, context: Any = "ctx", **kwargs: Any
) -> list[str]:
    """Run the blocks in one turn, then FINAL; returns each block's output as shown to the LM."""
    make_rlm(root=["\n".join(repl(b) for b in blocks), "FINAL(done)"], **kwargs).completion(context)
    return outputs(lm.requests_for(ROOT_MODEL)[1])


# --- contexts -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("context", "probe", "expected"),
    [
        ("hello world", "context.split()[1]", "str 11 True world"),
        ({"k": "v", "n": [1, 2]}, "context['n'][1]", "dict 2 True 2"),
        (["a", {"b": 3}], "context[1]['b']", "list 2 True 3"),
    ],
    ids=["str", "dict", "list"],
)
def test_code_sees_the_context_and_context_0(
    make_rlm: MakeRLM, lm: ScriptedLMServer, context: Any, probe: str, expected: str
) -> None:
    code = f"print(type(context).__name__, len(context), context is context_0, {probe})"
    (output,) = run_blocks(make_rlm, lm, code, context=context)
    assert expected in output


# --- llm_query routing --------------------------------------------------------------------------


def test_llm_query_goes_to_the_sub_backend(make_rlm: MakeRLM, lm: ScriptedLMServer) -> None:
    rlm = make_rlm(
        root=[repl("x = llm_query('hello sub')\nprint(x)"), "FINAL_VAR(x)"], sub=["hi there"]
    )
    assert rlm.completion("ctx").response == "hi there"
    (sub_request,) = lm.requests_for(SUB_MODEL)
    assert sub_request.messages == [{"role": "user", "content": "hello sub"}]
    assert len(lm.requests_for(ROOT_MODEL)) == 2
    assert "hi there" in outputs(lm.requests_for(ROOT_MODEL)[1])[0]


@pytest.mark.not_through_server(
    "a server's models are its configuration ([[models]]), not a request's other_backends"
)
def test_llm_query_with_model_routes_to_a_registered_model(
    make_rlm: MakeRLM, lm: ScriptedLMServer
) -> None:
    lm.set_sequence(OTHER_MODEL, ["from other"])
    block = "a = llm_query('to other', model='other')\nb = llm_query('to sub')\nprint(a, '|', b)"
    (output,) = run_blocks(
        make_rlm,
        lm,
        block,
        sub=["from sub"],
        other_backends=["openai", "openai"],
        other_backend_kwargs=[backend_kwargs(lm, SUB_MODEL), backend_kwargs(lm, OTHER_MODEL)],
    )
    assert "from other | from sub" in output
    assert [r.last_user_message for r in lm.requests_for(OTHER_MODEL)] == ["to other"]
    assert [r.last_user_message for r in lm.requests_for(SUB_MODEL)] == ["to sub"]


def test_llm_query_unknown_model_returns_an_error_string(
    make_rlm: MakeRLM, lm: ScriptedLMServer
) -> None:
    block = (
        "r = llm_query('p', model='no-such-model')\n"
        "print(type(r).__name__, r.startswith('Error:'), r)"
    )
    (output,) = run_blocks(make_rlm, lm, block)
    assert "str True Error:" in output and "no-such-model" in output
    assert "Traceback" not in output
    assert lm.requests_for(SUB_MODEL) == []


def test_llm_query_failure_returns_an_error_string(make_rlm: MakeRLM, lm: ScriptedLMServer) -> None:
    lm.add_rule(Rule("bad request", model=SUB_MODEL, status=400))
    (output,) = run_blocks(make_rlm, lm, "r = llm_query('p')\nprint(r.startswith('Error:'))")
    assert "True" in output


def test_rlm_query_falls_back_to_llm_query_at_max_depth_one(
    make_rlm: MakeRLM, lm: ScriptedLMServer
) -> None:
    block = "print(rlm_query('one'), rlm_query_batched(['two', 'three']))"
    lm.add_rule(Rule("ANSWER-\\1", model=SUB_MODEL, regex=r"^(\w+)$"))
    (output,) = run_blocks(make_rlm, lm, block)
    assert "ANSWER-one ['ANSWER-two', 'ANSWER-three']" in output


# --- llm_query_batched --------------------------------------------------------------------------


def test_llm_query_batched_keeps_input_order(make_rlm: MakeRLM, lm: ScriptedLMServer) -> None:
    # The first prompt is answered last, the last first.
    for word, delay in [("alpha", 0.6), ("beta", 0.3), ("gamma", 0.0)]:
        lm.add_rule(Rule(f"answer-{word}", model=SUB_MODEL, contains=word, delay_seconds=delay))
    finished: list[int] = []

    def on_event(event: ev.Event) -> None:
        if isinstance(event, ev.SubCallFinished):
            finished.append(event.call_id)

    block = "rs = llm_query_batched(['alpha?', 'beta?', 'gamma?'])\nprint(rs)"
    (output,) = run_blocks(make_rlm, lm, block, on_event=on_event)
    assert "['answer-alpha', 'answer-beta', 'answer-gamma']" in output
    assert len(finished) == 3
    assert finished != sorted(finished)  # they really did come back out of order


def test_llm_query_batched_one_failing_slot(make_rlm: MakeRLM, lm: ScriptedLMServer) -> None:
    lm.add_rule(Rule("rejected", model=SUB_MODEL, contains="bad", status=400))
    lm.add_rule(Rule("fine", model=SUB_MODEL))
    block = (
        "rs = llm_query_batched(['ok 1', 'bad 2', 'ok 3'])\nfor r in rs:\n    print(repr(r[:6]))"
    )
    (output,) = run_blocks(make_rlm, lm, block)
    lines = [line for line in output.splitlines() if line.startswith("'")]
    assert lines == ["'fine'", "'Error:'", "'fine'"]
    assert (
        len([r for r in lm.requests_for(SUB_MODEL) if "bad" in r.last_user_message]) == 1
    )  # no retry


# --- SHOW_VARS and reserved names ---------------------------------------------------------------


def test_show_vars_lists_user_variables_with_types(make_rlm: MakeRLM, lm: ScriptedLMServer) -> None:
    block = (
        "count = 3\nname = 'x'\nitems = [1]\nimport json\n"
        "def helper():\n    pass\nprint(SHOW_VARS())"
    )
    (output,) = run_blocks(make_rlm, lm, block)
    for pair in ["'count': 'int'", "'name': 'str'", "'items': 'list'"]:
        assert pair in output
    shown = output.split("REPL variables:")[0]
    assert "'llm_query'" not in shown and "'json'" not in shown


def test_reserved_names_are_restored_after_being_overwritten(
    make_rlm: MakeRLM, lm: ScriptedLMServer
) -> None:
    clobber = (
        "llm_query = 5\nllm_query_batched = None\nSHOW_VARS = 'x'\nFINAL_VAR = print\nsurvivor = 1"
    )
    use = (
        "print(llm_query('q1'))\nprint(llm_query_batched(['q2']))\n"
        "print(SHOW_VARS())\nprint(FINAL_VAR('missing_var').startswith('Error'))"
    )
    first, second = run_blocks(make_rlm, lm, clobber, use, sub=["a1", "a2"])
    assert "Traceback" not in first
    lines = second.splitlines()
    assert lines[1:3] == ["a1", "['a2']"]
    assert lines[3].startswith("Available variables:") and "'survivor': 'int'" in lines[3]
    assert lines[4] == "True"
    assert "Traceback" not in second


# --- exceptions ---------------------------------------------------------------------------------


def test_exception_keeps_stdout_and_variables_and_later_blocks_run(
    make_rlm: MakeRLM, lm: ScriptedLMServer
) -> None:
    results: list[ev.CodeBlockFinished] = []

    def on_event(event: ev.Event) -> None:
        if isinstance(event, ev.CodeBlockFinished):
            results.append(event)

    failing = (
        "kept = 'assigned'\nprint('before the error')\nraise ValueError('boom')\nprint('never')"
    )
    first, second = run_blocks(make_rlm, lm, failing, "print('after:', kept)", on_event=on_event)
    assert "before the error" in first and "ValueError: boom" in first and "never" not in first
    assert "after: assigned" in second
    broken = results[0].result
    assert broken.stdout.strip() == "before the error"
    assert broken.stderr.strip().splitlines()[-1] == "ValueError: boom"
    assert "ValueError" not in results[1].result.stderr


def test_syntax_error_is_reported(make_rlm: MakeRLM, lm: ScriptedLMServer) -> None:
    first, second = run_blocks(make_rlm, lm, "x = (1 +", "print('still here')")
    assert "SyntaxError" in first
    assert "still here" in second


# --- output truncation --------------------------------------------------------------------------


def test_long_output_is_truncated_with_a_note(make_rlm: MakeRLM, lm: ScriptedLMServer) -> None:
    (output,) = run_blocks(make_rlm, lm, "print('y' * 25_000)")
    note = re.search(r"\.\.\. \+ \[(\d+) chars\.\.\.\]$", output)
    assert note is not None, output[-200:]
    cut = int(note.group(1))
    assert len(output) == 20_000 + len(note.group(0))
    assert 20_000 + cut > 25_000  # the whole output (stdout + variables) was longer
    assert set(output[:20_000].strip()) == {"y"}


def test_output_under_the_limit_is_not_truncated(make_rlm: MakeRLM, lm: ScriptedLMServer) -> None:
    (output,) = run_blocks(make_rlm, lm, "print('z' * 19_000)")
    assert "chars...]" not in output and "z" * 19_000 in output


# --- persistent multi-turn sessions -------------------------------------------------------------


def test_persistent_session_keeps_its_sandbox_until_close(make_rlm: MakeRLM) -> None:
    before = _agent_processes()
    rlm = make_rlm(root=["FINAL(one)", "FINAL(two)"], persistent=True)
    try:
        assert rlm.completion("a").response == "one"
        alive = _agent_processes() - before  # the agent and its worker
        assert alive
        assert rlm.completion("b").response == "two"
        assert _agent_processes() - before == alive  # the same sandbox served both
    finally:
        rlm.close()
    rlm.close()  # idempotent
    deadline = time.monotonic() + 5.0
    while _agent_processes() & alive and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not _agent_processes() & alive


def test_persistent_session_keeps_state_and_adds_contexts(
    make_rlm: MakeRLM, lm: ScriptedLMServer
) -> None:
    probe = (
        "print(context_1, '|', context, '|', context_0, '|', kept + 1)\n"
        "print(type(history).__name__, type(history[0]).__name__, history[0]['role'], len(history))"
    )
    root = [repl("kept = 41"), "FINAL(first)", repl(probe), "FINAL(second)"]
    with make_rlm(root=root, persistent=True) as rlm:
        assert rlm.completion("first context").response == "first"
        assert rlm.completion("second context", root_prompt="Q2").response == "second"
    requests = lm.requests_for(ROOT_MODEL)
    assert len(requests) == 4
    turn_prompt = requests[2].messages[-1]["content"]
    assert "2 contexts" in turn_prompt and "context_0 through context_1" in turn_prompt
    assert "1 prior conversation history" in turn_prompt
    assert "contexts" not in requests[0].messages[-1]["content"]
    (output,) = outputs(requests[3])
    lines = output.strip().splitlines()
    assert lines[0] == "second context | first context | first context | 42"
    assert lines[1].startswith("list dict system ")
    assert int(lines[1].split()[-1]) >= 3  # system, metadata, and the first turn at least


def test_state_persists_across_turns_of_one_completion(
    make_rlm: MakeRLM, lm: ScriptedLMServer
) -> None:
    root = [
        repl("notes = ['turn 1']"),
        repl("notes.append('turn 2')\nprint(notes)"),
        "FINAL_VAR(notes)",
    ]
    assert make_rlm(root=root).completion("ctx").response == "['turn 1', 'turn 2']"


# --- concurrency cap ----------------------------------------------------------------------------


def peak_of_a_batch_of_six(make_rlm: MakeRLM, lm: ScriptedLMServer, **sub_options: Any) -> int:
    """How many of six batched sub-calls were in flight at once, at most."""
    lock = threading.Lock()
    in_flight = [0, 0]  # current, peak

    def slow_reply(request: RecordedRequest) -> str:
        with lock:
            in_flight[0] += 1
            in_flight[1] = max(in_flight[1], in_flight[0])
        time.sleep(0.2)
        with lock:
            in_flight[0] -= 1
        return "r-" + request.last_user_message

    lm.add_rule(Rule(slow_reply, model=SUB_MODEL))
    block = "print(llm_query_batched([f'p{i}' for i in range(6)]))"
    (output,) = run_blocks(
        make_rlm, lm, block, other_backend_kwargs=[backend_kwargs(lm, SUB_MODEL, **sub_options)]
    )
    assert str([f"r-p{i}" for i in range(6)]) in output
    return in_flight[1]


@pytest.mark.not_through_server(
    "a model's max_concurrency is the server's configuration ([[models]]), not a request's"
)
def test_llm_query_batched_runs_at_most_the_sub_models_cap(
    make_rlm: MakeRLM, lm: ScriptedLMServer
) -> None:
    assert peak_of_a_batch_of_six(make_rlm, lm, max_concurrency=2) == 2


def test_llm_query_batched_runs_all_at_once_without_a_cap(
    make_rlm: MakeRLM, lm: ScriptedLMServer
) -> None:
    assert peak_of_a_batch_of_six(make_rlm, lm) == 6
