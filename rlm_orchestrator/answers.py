"""FINAL_VAR answers, read from the sandbox whole (in chunks) or refused, never cut.

The text of an answer travels in chunks (`GetVariable` streams it), so its size is bounded by
`max_answer_chars` only: up to it, the answer comes back whole; beyond it, nothing is read and
the model is told how long it was, so that it can shorten it.
"""

from __future__ import annotations

from dataclasses import dataclass

from rlm_orchestrator import types
from rlm_orchestrator.config.answer import FINAL, AnswerConvention
from rlm_orchestrator.exceptions import SandboxError
from rlm_orchestrator.sandbox import AgentClient

# The loop's names for where an answer came from (ev.FinalAnswer.source) -> the result's.
_SOURCES = {
    "FINAL": types.FINAL_TEXT,
    "FINAL_VAR": types.FINAL_VAR,
    "out_of_turns": types.OUT_OF_TURNS,
    "plain_lm": types.PLAIN_LM,
}


def answer_source(event_source: str, convention: AnswerConvention) -> str:
    """RLMChatCompletion.answer_source for an answer the loop found at `event_source`: an
    answer "code" gave is FINAL_VAR in the code, or the `answer` dict under that convention."""
    if event_source == "code":
        return types.FINAL_VAR_IN_CODE if convention == FINAL else types.ANSWER_DICT
    return _SOURCES.get(event_source, event_source)


@dataclass
class AnswerRead:
    """A FINAL_VAR answer read from the sandbox: its text, or what to tell the model."""

    text: str | None = None
    note: str = ""
    too_large: bool = False


async def read_answer(client: AgentClient, name: str | None, limit: int) -> AnswerRead:
    """str() of the variable `name` (None: the answer FINAL_VAR gave inside the last block)."""
    label = f"FINAL_VAR({name})" if name is not None else "FINAL_VAR in your code"
    try:
        variable = await client.get_variable(name or "", final_answer=name is None, max_chars=limit)
    except SandboxError as exc:
        return AnswerRead(note=f"{label} failed: {exc}. Answer again.")
    if not variable.found and name is None:
        return AnswerRead(note=f"{label} failed: the answer was lost. Answer again.")
    if not variable.found:
        return AnswerRead(
            note=f"{label} failed: there is no variable named {name!r}. "
            f"Available variables: {variable.available}. Create it in a ```repl``` block, "
            "then answer again."
        )
    if variable.too_large:
        subject = name if name is not None else "the answer"
        return AnswerRead(
            note=f"{label} failed: {subject} has {variable.chars} characters, more than the "
            f"limit of {limit} for an answer (max_answer_chars); nothing was returned. Make "
            "the answer shorter (keep only what was asked for) and answer again.",
            too_large=True,
        )
    return AnswerRead(text=variable.value)
