"""The two answer conventions (docs/rlm-semantics.md, README): FINAL/FINAL_VAR in the text (the
default) and upstream's `answer = {"content": ..., "ready": True}` in the REPL
(`answer_convention="answer_dict"`), end to end against real sandboxes and the scripted LM.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
from conftest import ROOT_MODEL, repl

from rlm_orchestrator import RLM, ConfigurationError
from rlm_orchestrator.exceptions import InvalidRequestError
from rlm_orchestrator.testing.scripted_lm import RecordedRequest, ScriptedLMServer

MakeRLM = Callable[..., RLM]
DICT = "answer_dict"
# Through a server the option is a request option, checked when the completion starts.
IN_PROCESS_ONLY = pytest.mark.not_through_server("a check of the in-process RLM's constructor")


def shown(request: RecordedRequest) -> str:
    """What the root LM was shown of the code it ran, up to this request."""
    return "\n".join(
        str(m["content"])
        for m in request.messages
        if m["role"] == "user" and str(m["content"]).startswith("Code executed:")
    )


# One way each convention ends a run with "Paris" after looking at the context.
ENDINGS = {
    "final": [repl("city = 'Par' + 'is'"), "FINAL_VAR(city)"],
    DICT: [repl("city = 'Par' + 'is'"), repl("answer['content'] = city\nanswer['ready'] = True")],
}


@pytest.mark.parametrize("convention", ["final", DICT])
def test_each_convention_ends_the_run(
    make_rlm: MakeRLM, lm: ScriptedLMServer, convention: str
) -> None:
    rlm = make_rlm(root=ENDINGS[convention], answer_convention=convention)
    assert rlm.completion("ctx", root_prompt="capital?").response == "Paris"
    assert len(lm.requests_for(ROOT_MODEL)) == 2


@pytest.mark.parametrize("convention", ["final", DICT])
def test_the_system_prompt_teaches_the_convention_in_use(
    make_rlm: MakeRLM, lm: ScriptedLMServer, convention: str
) -> None:
    make_rlm(root=ENDINGS[convention], answer_convention=convention).completion("ctx")
    system = str(lm.requests_for(ROOT_MODEL)[0].messages[0]["content"])
    teaches_dict = 'answer["ready"] = True' in system
    teaches_final = "FINAL_VAR(variable_name)" in system
    assert (teaches_dict, teaches_final) == (convention == DICT, convention == "final")


@IN_PROCESS_ONLY
def test_the_default_is_final(make_rlm: MakeRLM) -> None:
    assert make_rlm(root=["FINAL(x)"]).answer_convention == "final"


@IN_PROCESS_ONLY
def test_an_unknown_convention_is_refused(make_rlm: MakeRLM) -> None:
    with pytest.raises(ConfigurationError, match="answer_convention"):
        make_rlm(root=[], answer_convention="shout")


def test_answer_starts_empty_and_not_ready(make_rlm: MakeRLM, lm: ScriptedLMServer) -> None:
    root = [repl("print(answer)"), repl("answer.update(content='u', ready=True)")]
    result = make_rlm(root=root, answer_convention=DICT).completion("ctx")
    assert result.response == "u"
    assert "{'content': '', 'ready': False}" in shown(lm.requests_for(ROOT_MODEL)[1])


def test_text_final_is_not_an_answer_under_answer_dict(
    make_rlm: MakeRLM, lm: ScriptedLMServer
) -> None:
    root = ["FINAL(too soon)", repl("answer['content'] = 'real'\nanswer['ready'] = True")]
    assert make_rlm(root=root, answer_convention=DICT).completion("ctx").response == "real"
    assert len(lm.requests_for(ROOT_MODEL)) == 2


def test_content_is_taken_when_ready_flips_and_later_blocks_do_not_run(
    make_rlm: MakeRLM, lm: ScriptedLMServer
) -> None:
    response = (
        repl("answer['content'] = 42\nanswer['ready'] = True\nanswer['content'] = 'changed'")
        + "\n"
        + repl("print('never runs')")
    )
    rlm = make_rlm(root=[response], answer_convention=DICT)
    assert rlm.completion("ctx").response == "42"  # str() of the content at that moment
    assert len(lm.requests_for(ROOT_MODEL)) == 1


def test_an_answer_given_before_an_exception_stands(make_rlm: MakeRLM) -> None:
    code = "answer['content'] = 'kept'\nanswer['ready'] = True\n1 / 0"
    assert make_rlm(root=[repl(code)], answer_convention=DICT).completion("ctx").response == "kept"


@pytest.mark.parametrize(
    "code",
    [
        "answer = {'content': 'rebound', 'ready': True}",
        "answer = {'content': 'rebound', 'ready': True}\nraise ValueError('after')",
        "answer = dict(content='not yet')\nanswer['content'] = 'rebound'\nanswer['ready'] = True",
    ],
    ids=["plain-dict", "then-raise", "plain-dict-then-set"],
)
def test_a_rebound_plain_dict_that_is_ready_is_the_answer(make_rlm: MakeRLM, code: str) -> None:
    rlm = make_rlm(root=[repl(code)], answer_convention=DICT)
    assert rlm.completion("ctx").response == "rebound"


@pytest.mark.parametrize("code", ["answer = 'oops'", "del answer", "answer = {'content': 'x'}"])
def test_a_broken_answer_is_replaced_and_the_run_goes_on(
    make_rlm: MakeRLM, lm: ScriptedLMServer, code: str
) -> None:
    root = [repl(code), repl("answer['ready'] = 1")]
    result = make_rlm(root=root, answer_convention=DICT).completion("ctx")
    # A non-dict loses its content (as upstream); a plain dict keeps it.
    assert result.response == ("x" if "content" in code else "")
    assert len(lm.requests_for(ROOT_MODEL)) == 2


def test_final_var_stays_a_plain_variable_name_under_final(make_rlm: MakeRLM) -> None:
    # Under FINAL, `answer` is the model's own variable, as it always was.
    root = [repl("answer = {'content': 'no', 'ready': True}"), "FINAL_VAR(answer)"]
    result = make_rlm(root=root).completion("ctx")
    assert result.response == "{'content': 'no', 'ready': True}"


def test_out_of_turns_takes_the_text_as_is_under_answer_dict(
    make_rlm: MakeRLM, lm: ScriptedLMServer
) -> None:
    rlm = make_rlm(root=[repl("x = 1"), "FINAL(best guess)"], max_iterations=1)
    assert rlm.completion("ctx").response == "best guess"
    rlm = make_rlm(
        root=[repl("x = 1"), "FINAL(best guess)"], max_iterations=1, answer_convention=DICT
    )
    assert rlm.completion("ctx").response == "FINAL(best guess)"


def test_each_completion_of_a_persistent_session_gets_a_fresh_answer(
    make_rlm: MakeRLM, lm: ScriptedLMServer
) -> None:
    done = repl("answer['content'] = 'first'\nanswer['ready'] = True")
    second = [
        repl("print(answer['ready'], answer['content'] == '')"),
        repl("answer['content'] = context_1\nanswer['ready'] = True"),
    ]
    with make_rlm(root=[done, *second], persistent=True, answer_convention=DICT) as rlm:
        assert rlm.completion("one").response == "first"
        assert rlm.completion("two").response == "two"
    # Turn 2 of the second completion saw turn 1's output.
    assert "False True" in shown(lm.requests_for(ROOT_MODEL)[2])


def test_a_server_refuses_an_unknown_convention(orchestrator_server: Any) -> None:
    client = orchestrator_server.client()
    try:
        with pytest.raises(InvalidRequestError, match="answer_convention"):
            client.completion("ctx", None, answer_convention="shout")
    finally:
        client.close()
