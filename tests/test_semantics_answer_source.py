"""How a completion reports its end (issue 19): the root model's turns and how the answer was
reached (`RLMChatCompletion.iterations` / `answer_source`), the same in process and through a
server (CompletionFinished.answer_source), with real sandboxes and the scripted LM.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
from conftest import repl

from rlm_orchestrator import RLM, RLMChatCompletion, UsageSummary
from rlm_orchestrator import events as ev
from rlm_orchestrator.testing.scripted_lm import ScriptedLMServer
from rlm_orchestrator.types import ANSWER_SOURCES

MakeRLM = Callable[..., RLM]

# (root responses, options) -> (answer, turns, answer_source)
CASES: dict[str, tuple[list[str], dict[str, Any], tuple[str, int, str]]] = {
    "final": (["FINAL(four)"], {}, ("four", 1, "final")),
    "final_var": ([repl("x = 'fo' + 'ur'"), "FINAL_VAR(x)"], {}, ("four", 2, "final_var")),
    "final_var_in_code": (
        [repl("x = 'four'\nFINAL_VAR('x')")],
        {},
        ("four", 1, "final_var_in_code"),
    ),
    "answer_dict": (
        [repl("answer['content'] = 'four'\nanswer['ready'] = True")],
        {"answer_convention": "answer_dict"},
        ("four", 1, "answer_dict"),
    ),
    "out_of_turns": (
        [repl("x = 1"), repl("x = 2"), "FINAL(my best guess)"],
        {"max_iterations": 2},
        ("my best guess", 2, "out_of_turns"),
    ),
    "plain_lm": (["just text"], {"max_depth": 0}, ("just text", 0, "plain_lm")),
}


@pytest.mark.parametrize("case", list(CASES))
def test_the_result_says_how_the_answer_was_reached(
    make_rlm: MakeRLM, lm: ScriptedLMServer, case: str
) -> None:
    root, options, (answer, turns, source) = CASES[case]
    finals: list[ev.FinalAnswer] = []

    def on_event(event: ev.Event) -> None:
        if isinstance(event, ev.FinalAnswer):
            finals.append(event)

    rlm = make_rlm(root=root, on_event=on_event, **options)
    result = rlm.completion("ctx", root_prompt="?")
    if via_rlm := not hasattr(rlm, "client"):  # in process: the event names it the same
        assert [(f.source, f.iterations) for f in finals] == [(source, turns)]
    assert via_rlm or finals == []  # through a server the stream ends with `finished` instead
    assert (result.response, result.iterations, result.answer_source) == (answer, turns, source)
    assert result.out_of_turns == (source == "out_of_turns")
    assert result.usage_summary.total_calls == len(lm.requests)
    data = result.to_dict()
    assert (data["iterations"], data["answer_source"]) == (turns, source)


def test_every_source_is_documented_and_lower_case() -> None:
    assert set(ANSWER_SOURCES) == {case[2][2] for case in CASES.values()}
    assert all(source == source.lower() for source in ANSWER_SOURCES)


def test_the_original_constructor_and_dict_still_work() -> None:
    usage = UsageSummary()
    call = RLMChatCompletion("m", "p", "r", usage, 0.5)
    assert (call.iterations, call.answer_source, call.out_of_turns) == (0, "", False)
    assert list(call.to_dict())[:5] == [
        "root_model",
        "prompt",
        "response",
        "usage_summary",
        "execution_time",
    ]
