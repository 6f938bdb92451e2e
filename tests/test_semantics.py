"""The RLM contract (docs/rlm-semantics.md), end to end: the loop, final answers, code blocks
and what the root LM is shown.

Every test drives `RLM.completion` against a real sandbox agent and the scripted LM server over
HTTP. The REPL namespace and routing are in test_semantics_repl.py; limits, accounting, logs
and LM errors in test_semantics_limits.py.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

import pytest
from conftest import ROOT_MODEL, SUB_MODEL, repl

from rlm_orchestrator import RLM, RLMChatCompletion
from rlm_orchestrator.testing.scripted_lm import RecordedRequest, ScriptedLMServer

MakeRLM = Callable[..., RLM]
# A request to a server is always depth 0: the server sets the depth of the RLMs it starts.
NOT_THROUGH_SERVER_DEPTH = pytest.mark.not_through_server("depth= is set by the server itself")


def contents(request: RecordedRequest) -> list[str]:
    return [str(m.get("content", "")) for m in request.messages]


def code_results(request: RecordedRequest) -> list[str]:
    """The "Code executed: ..." user messages the root LM was shown, in order."""
    return [
        str(m["content"])
        for m in request.messages
        if m["role"] == "user" and str(m["content"]).startswith("Code executed:")
    ]


# --- final answers ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("response", "answer"),
    [
        ("I am done.\nFINAL(Paris)", "Paris"),
        ("FINAL(the sum f(g(x)) is (3))", "the sum f(g(x)) is (3)"),
        ("FINAL(a)\nx\nFINAL(b)", "a"),
        ("Some thoughts.\n  FINAL(  spaced answer  )  \nthanks", "spaced answer"),
    ],
    ids=["line-start", "nested-parens", "first-of-two", "indented"],
)
def test_final_text_is_the_answer(
    make_rlm: MakeRLM, lm: ScriptedLMServer, response: str, answer: str
) -> None:
    result = make_rlm(root=[response]).completion("ctx", root_prompt="q?")
    assert result.response == answer
    assert len(lm.requests_for(ROOT_MODEL)) == 1


@pytest.mark.parametrize(
    "response",
    ["I will call FINAL(too early) later", "FINAL(not yet) because I still need to check"],
    ids=["mid-line", "text-after-paren"],
)
def test_final_not_alone_on_its_line_is_not_an_answer(
    make_rlm: MakeRLM, lm: ScriptedLMServer, response: str
) -> None:
    assert make_rlm(root=[response, "FINAL(real)"]).completion("ctx").response == "real"
    assert len(lm.requests_for(ROOT_MODEL)) == 2


@pytest.mark.parametrize(
    ("code", "expected"),
    [
        ("answer = 42", "42"),
        ("answer = [1, 'two', 3.0]", "[1, 'two', 3.0]"),
        ("answer = 'text'", "text"),
    ],
    ids=["int", "list", "str"],
)
def test_final_var_returns_str_of_the_variable(
    make_rlm: MakeRLM, lm: ScriptedLMServer, code: str, expected: str
) -> None:
    result = make_rlm(root=[repl(code), "FINAL_VAR(answer)"]).completion("ctx")
    assert result.response == expected
    assert len(lm.requests_for(ROOT_MODEL)) == 2


def test_final_var_is_checked_before_final(make_rlm: MakeRLM) -> None:
    rlm = make_rlm(root=[repl("v = 'from var'"), "FINAL(from text)\nFINAL_VAR(v)"])
    assert rlm.completion("ctx").response == "from var"


def test_final_var_of_missing_variable_continues_and_tells_the_model(
    make_rlm: MakeRLM, lm: ScriptedLMServer
) -> None:
    rlm = make_rlm(root=["FINAL_VAR(nope)", repl("nope = 'made'"), "FINAL_VAR(nope)"])
    assert rlm.completion("ctx").response == "made"
    second = lm.requests_for(ROOT_MODEL)[1]
    told = [
        str(m["content"])
        for m in second.messages
        if m["role"] == "user" and "nope" in str(m["content"])
    ]
    assert any(re.search(r"no variable|not found|does not exist", c, re.I) for c in told), told


def test_final_var_called_in_code_ends_the_run_and_skips_later_blocks(
    make_rlm: MakeRLM, lm: ScriptedLMServer
) -> None:
    response = (
        repl("answer = 7 * 6\nFINAL_VAR('answer')")
        + "\n"
        + repl("llm_query('must not run')")
        + "\nFINAL(ignored)"
    )
    result = make_rlm(root=[response], sub=["unused"]).completion("ctx")
    assert result.response == "42"
    assert len(lm.requests_for(ROOT_MODEL)) == 1
    assert lm.requests_for(SUB_MODEL) == []


def test_final_inside_a_repl_block_is_code_not_an_answer(
    make_rlm: MakeRLM, lm: ScriptedLMServer
) -> None:
    block = repl("def FINAL(value):\n    print('called with', value)\nFINAL('inside')")
    rlm = make_rlm(root=[block, "FINAL(outside)"])
    assert rlm.completion("ctx").response == "outside"
    second = lm.requests_for(ROOT_MODEL)[1]
    assert "called with inside" in code_results(second)[0]


def test_final_with_code_is_deferred_until_the_output_was_seen(
    make_rlm: MakeRLM, lm: ScriptedLMServer
) -> None:
    rlm = make_rlm(
        root=[repl("print('output-marker')") + "\nFINAL(too early)", "FINAL(after seeing)"]
    )
    assert rlm.completion("ctx").response == "after seeing"
    root_requests = lm.requests_for(ROOT_MODEL)
    assert len(root_requests) == 2
    second = contents(root_requests[1])
    shown = code_results(root_requests[1])
    assert len(shown) == 1 and "output-marker" in shown[0]
    # After the block's output, a note says the FINAL was not accepted.
    notes = [c for c in second[second.index(shown[0]) + 1 :] if "not accepted" in c]
    assert notes, second[-3:]


def test_final_with_code_option_accepts_at_once(make_rlm: MakeRLM, lm: ScriptedLMServer) -> None:
    response = repl("llm_query('still runs')") + "\nFINAL(at once)"
    result = make_rlm(root=[response], sub=["ok"], final_with_code=True).completion("ctx")
    assert result.response == "at once"
    assert len(lm.requests_for(ROOT_MODEL)) == 1
    assert len(lm.requests_for(SUB_MODEL)) == 1  # the code ran before the answer was taken


# --- code blocks --------------------------------------------------------------------------------


def test_only_repl_fences_run(make_rlm: MakeRLM, lm: ScriptedLMServer) -> None:
    response = "```python\nllm_query('python fence')\n```\n```\nllm_query('bare fence')\n```"
    assert make_rlm(root=[response, "FINAL(done)"], sub=["x"]).completion("ctx").response == "done"
    assert lm.requests_for(SUB_MODEL) == []
    assert code_results(lm.requests_for(ROOT_MODEL)[1]) == []


def test_blocks_run_in_order_and_share_state(make_rlm: MakeRLM, lm: ScriptedLMServer) -> None:
    response = repl("a = 'one'\nprint(a)") + "\ntext between\n" + repl("  print(a + '+two')  ")
    make_rlm(root=[response, "FINAL(done)"]).completion("ctx")
    shown = code_results(lm.requests_for(ROOT_MODEL)[1])
    assert len(shown) == 2
    assert shown[0].startswith(
        "Code executed:\n```python\na = 'one'\nprint(a)\n```\n\nREPL output:\n"
    )
    assert "one" in shown[0]
    # Content is stripped: the leading spaces of the second block are gone.
    assert shown[1].startswith("Code executed:\n```python\nprint(a + '+two')\n```")
    assert "one+two" in shown[1]


def test_unterminated_fence_is_ignored(make_rlm: MakeRLM, lm: ScriptedLMServer) -> None:
    response = repl("print('closed')") + "\n```repl\nllm_query('never closed')\n"
    make_rlm(root=[response, "FINAL(done)"], sub=["x"]).completion("ctx")
    assert lm.requests_for(SUB_MODEL) == []
    shown = code_results(lm.requests_for(ROOT_MODEL)[1])
    assert len(shown) == 1 and "closed" in shown[0]


# --- what the root LM is shown ------------------------------------------------------------------


def test_root_messages_turn_zero(make_rlm: MakeRLM, lm: ScriptedLMServer) -> None:
    make_rlm(root=["FINAL(x)"]).completion("hello world", root_prompt="How many words?")
    messages = lm.requests_for(ROOT_MODEL)[0].messages
    assert messages[0]["role"] == "system"
    assert "```repl" in messages[0]["content"] and "FINAL_VAR" in messages[0]["content"]
    assert "str" in messages[1]["content"] and "11 total characters" in messages[1]["content"]
    assert messages[-1]["role"] == "user"
    last = messages[-1]["content"]
    assert "don't give a final answer yet" in last
    assert '"How many words?"' in last
    assert "history before is your previous interactions" not in last


@pytest.mark.parametrize(
    ("context", "type_name", "total", "chunks"),
    [
        ("x" * 1234, "str", 1234, "[1234]"),
        ({"a": "abc", "b": "defgh"}, "dict", 8, "[3, 5]"),
        (["ab", "cde", "f"], "list", 6, "[2, 3, 1]"),
    ],
    ids=["str", "dict", "list"],
)
def test_metadata_message_describes_the_context(
    make_rlm: MakeRLM, lm: ScriptedLMServer, context: Any, type_name: str, total: int, chunks: str
) -> None:
    make_rlm(root=["FINAL(x)"]).completion(context)
    metadata = lm.requests_for(ROOT_MODEL)[0].messages[1]["content"]
    assert f"a {type_name} with {total} total characters" in metadata
    assert chunks in metadata


def test_metadata_lists_at_most_100_chunk_lengths(make_rlm: MakeRLM, lm: ScriptedLMServer) -> None:
    make_rlm(root=["FINAL(x)"]).completion(["ab"] * 150)
    metadata = lm.requests_for(ROOT_MODEL)[0].messages[1]["content"]
    assert "300 total characters" in metadata
    listed = re.search(r"\[([\d, ]+)\]\.\.\. \[50 others\]", metadata)
    assert listed is not None, metadata
    assert listed.group(1).split(", ") == ["2"] * 100


def test_root_messages_later_turns(make_rlm: MakeRLM, lm: ScriptedLMServer) -> None:
    make_rlm(root=[repl("print('hi')"), "FINAL(x)"]).completion("ctx", root_prompt="Q?")
    first, second = lm.requests_for(ROOT_MODEL)
    messages = second.messages
    # The first request is a prefix: system, metadata, then the turn's history.
    assert messages[:2] == first.messages[:2]
    assert messages[2] == {"role": "assistant", "content": repl("print('hi')")}
    assert messages[3]["role"] == "user" and messages[3]["content"].startswith("Code executed:")
    last = messages[-1]["content"]
    assert "The history before is your previous interactions" in last
    assert '"Q?"' in last
    assert "don't give a final answer yet" not in last


def test_no_root_prompt_means_no_quoted_prompt(make_rlm: MakeRLM, lm: ScriptedLMServer) -> None:
    make_rlm(root=["FINAL(x)"]).completion("ctx")
    assert "the original prompt" not in lm.requests_for(ROOT_MODEL)[0].messages[-1]["content"]


def test_code_result_message_format(make_rlm: MakeRLM, lm: ScriptedLMServer) -> None:
    make_rlm(root=[repl("total = 40 + 2\nprint('total is', total)"), "FINAL(x)"]).completion("ctx")
    (shown,) = code_results(lm.requests_for(ROOT_MODEL)[1])
    head = (
        "Code executed:\n```python\ntotal = 40 + 2\nprint('total is', total)\n```\n\nREPL output:\n"
    )
    assert shown.startswith(head)
    output = shown[len(head) :]
    assert "total is 42" in output
    assert "REPL variables: [" in output and "'total'" in output
    # Helpers are code, not variables.
    assert "llm_query" not in output and "SHOW_VARS" not in output


def test_block_printing_nothing_shows_no_output(make_rlm: MakeRLM, lm: ScriptedLMServer) -> None:
    make_rlm(root=[repl("pass"), "FINAL(x)"]).completion("ctx")
    (shown,) = code_results(lm.requests_for(ROOT_MODEL)[1])
    assert "No output" in shown.split("REPL output:\n", 1)[1]


# --- out of turns -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("last_response", "answer"),
    [("The answer is probably 12.", "The answer is probably 12."), ("Done.\nFINAL(12)", "12")],
    ids=["text", "final"],
)
def test_out_of_turns_asks_for_a_final_answer(
    make_rlm: MakeRLM, lm: ScriptedLMServer, last_response: str, answer: str
) -> None:
    root = [repl("a = 1"), repl("b = 2"), last_response]
    result = make_rlm(root=root, max_iterations=2).completion("ctx")
    assert result.response == answer
    requests = lm.requests_for(ROOT_MODEL)
    assert len(requests) == 3
    last = requests[-1].messages[-1]
    assert last["role"] == "assistant" and "final answer" in last["content"].lower()


def test_out_of_turns_final_var_reads_the_variable(make_rlm: MakeRLM) -> None:
    root = [repl("found = 'var answer'"), "FINAL_VAR(found)"]
    assert make_rlm(root=root, max_iterations=1).completion("ctx").response == "var answer"


# --- depth >= max_depth: a plain LM call --------------------------------------------------------


@NOT_THROUGH_SERVER_DEPTH
@pytest.mark.parametrize(("depth", "max_depth"), [(0, 0), (1, 1)])
def test_depth_at_max_depth_is_a_plain_lm_call(
    make_rlm: MakeRLM,
    lm: ScriptedLMServer,
    monkeypatch: pytest.MonkeyPatch,
    depth: int,
    max_depth: int,
) -> None:
    def no_sandbox(*args: object, **kwargs: object) -> None:
        raise AssertionError("a plain LM call must not start a sandbox")

    monkeypatch.setattr("rlm_orchestrator.rlm.create_provider", no_sandbox)
    rlm = make_rlm(
        root=["plain answer"],
        depth=depth,
        max_depth=max_depth,
        other_backends=None,
        other_backend_kwargs=None,
    )
    result = rlm.completion("What is 2+2?")
    assert isinstance(result, RLMChatCompletion)
    assert result.response == "plain answer"
    assert result.root_model == ROOT_MODEL
    (request,) = lm.requests_for(ROOT_MODEL)
    assert request.messages == [{"role": "user", "content": "What is 2+2?"}]
    assert result.usage_summary.model_usage_summaries[ROOT_MODEL].total_calls == 1


@NOT_THROUGH_SERVER_DEPTH
def test_plain_lm_call_uses_the_rlm_own_backend(make_rlm: MakeRLM, lm: ScriptedLMServer) -> None:
    lm.set_sequence(SUB_MODEL, ["from sub"])
    result = make_rlm(root=["from root"], depth=1, max_depth=1).completion("hi")
    assert [r.model for r in lm.requests] == [ROOT_MODEL]
    assert result.response == "from root"
    assert set(result.usage_summary.model_usage_summaries) == {result.root_model}
