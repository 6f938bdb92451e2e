"""FINAL_VAR answers, read from the sandbox whole (in chunks) or refused, never cut.

The text of an answer travels in chunks (`GetVariable` streams it), so its size is bounded by
`max_answer_chars` only: up to it, the answer comes back whole; beyond it, nothing is read and
the model is told how long it was, so that it can shorten it.
"""

from __future__ import annotations

from dataclasses import dataclass

from rlm_orchestrator.exceptions import SandboxError
from rlm_orchestrator.sandbox import AgentClient


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
