"""Child RLMs: rlm_query() at max_depth > 1 runs a whole RLM (own sandbox, own loop)."""

from __future__ import annotations

import time
from collections.abc import Callable

import pytest
from conftest import ROOT_MODEL, SUB_MODEL, backend_kwargs, repl

from rlm_orchestrator import RLM, CompletionTimeoutError, CostLimitExceededError
from rlm_orchestrator import events as ev
from rlm_orchestrator.testing.scripted_lm import RecordedRequest, Rule, ScriptedLMServer

MakeRLM = Callable[..., RLM]
FIRST_TURN_MESSAGES = 3  # system prompt, context metadata, the turn's user prompt


def child_upper(request: RecordedRequest) -> str:
    """A child RLM's root model: look at the context, then answer with it upper-cased."""
    if len(request.messages) == FIRST_TURN_MESSAGES:
        return repl("r = context.upper()")
    return "FINAL_VAR(r)"


def test_rlm_query_is_answered_by_a_child_rlm(make_rlm: MakeRLM, lm: ScriptedLMServer) -> None:
    lm.add_rule(Rule(child_upper, model=SUB_MODEL))
    depths: set[int] = set()

    def record(event: ev.Event) -> None:
        depths.add(event.depth)

    rlm = make_rlm(
        root=[repl("ans = rlm_query('secret is five')\nprint(ans)"), "FINAL_VAR(ans)"],
        max_depth=2,
        on_event=record,
    )
    result = rlm.completion("the parent's context")
    assert result.response == "SECRET IS FIVE"
    assert depths == {0, 1}  # the child's turns were seen as events at depth 1
    # The child had its own context: the prompt given to rlm_query.
    child_first = lm.requests_for(SUB_MODEL)[0].messages
    assert "14 total characters" in child_first[1]["content"]
    # Usage of the parent includes the child's root calls (2 turns of the "sub" model).
    assert result.usage_summary.model_usage_summaries[SUB_MODEL].total_calls == 2


def test_rlm_query_batched_runs_children_concurrently_in_order(
    make_rlm: MakeRLM, lm: ScriptedLMServer
) -> None:
    lm.add_rule(Rule(child_upper, model=SUB_MODEL))
    rlm = make_rlm(
        root=[repl("answers = rlm_query_batched(['one', 'two', 'three'])"), "FINAL_VAR(answers)"],
        max_depth=2,
    )
    assert rlm.completion("ctx").response == "['ONE', 'TWO', 'THREE']"


def test_child_spend_counts_against_the_parent_max_cost(
    make_rlm: MakeRLM, lm: ScriptedLMServer
) -> None:
    lm.add_rule(Rule(child_upper, model=SUB_MODEL))
    priced_sub = backend_kwargs(lm, SUB_MODEL, input_cost_per_token=0.01)
    rlm = make_rlm(
        root=[repl("ans = rlm_query('costly')"), "FINAL_VAR(ans)"],
        # The root model is free (priced at 0): only the child's calls can exceed max_cost.
        backend_kwargs=backend_kwargs(lm, ROOT_MODEL, input_cost_per_token=0.0),
        other_backend_kwargs=[priced_sub],
        max_depth=2,
        max_cost=0.5,
    )
    with pytest.raises(CostLimitExceededError) as caught:
        rlm.completion("ctx")
    assert caught.value.current_cost > 0.5
    usage = caught.value.usage_summary
    assert usage is not None and usage.model_usage_summaries[SUB_MODEL].total_cost > 0.5
    assert usage.model_usage_summaries[ROOT_MODEL].total_cost == 0.0


def test_child_failure_comes_back_as_an_error_string(
    make_rlm: MakeRLM, lm: ScriptedLMServer
) -> None:
    lm.add_rule(Rule("broken", model=SUB_MODEL, status=400))
    rlm = make_rlm(
        root=[repl("ans = rlm_query('anything')\nprint(ans[:40])"), "FINAL_VAR(ans)"],
        max_depth=2,
    )
    answer = rlm.completion("ctx").response
    assert answer.startswith("Error: child RLM failed: LMError")


def test_child_inherits_the_time_left(make_rlm: MakeRLM, lm: ScriptedLMServer) -> None:
    """The child's own deadline is its parent's: its time left counts from the call (its
    sandbox start included), so it never outlives the parent, whatever cancels what."""
    lm.add_rule(Rule(repl("import time; time.sleep(30)"), model=SUB_MODEL))
    deadlines: dict[int, float | None] = {}

    def record(event: ev.Event) -> None:
        # The first turn of each depth: when its completion's time runs out (loop clock).
        if isinstance(event, ev.TurnStarted) and event.depth not in deadlines:
            left = event.seconds_left
            deadlines[event.depth] = None if left is None else time.monotonic() + left

    rlm = make_rlm(
        root=[repl("ans = rlm_query('slow')"), "FINAL(x)"],
        max_depth=2,
        timeout_seconds=3,
        on_event=record,
    )
    with pytest.raises(CompletionTimeoutError):  # the child sleeps past the parent's deadline
        rlm.completion("ctx")
    assert 1 in deadlines, "the child RLM never started a turn"
    parent, child = deadlines[0], deadlines[1]
    assert parent is not None
    assert child is not None, "the child RLM was given no time limit"
    # Its clock started at the call, not once its sandbox was up (that takes ~0.2 s or more).
    assert child <= parent + 0.05, (
        f"the child RLM's deadline is {child - parent:.2f}s past its parent's"
    )
