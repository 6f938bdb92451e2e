"""The `answer` dict convention (upstream rlms 0.1.3): the model ends the run from its code with
`answer["content"] = ...; answer["ready"] = True` instead of writing FINAL(...) / FINAL_VAR(...).

Chosen with `RLM(answer_convention="answer_dict")`; FINAL/FINAL_VAR (`"final"`) stays the
default. The sandbox agent knows nothing of it: at the start of each completion the loop runs
`INSTALL_CODE`, which puts a dict in the REPL whose `ready` turning true calls the sandbox's
FINAL_VAR with the content (captured then, as upstream does), so the answer travels the way a
FINAL_VAR called in code does. When a block leaves `answer` as anything but that dict
(rebound to a plain dict, deleted, the worker restarted), `REWRAP_CODE` runs once: a plain
dict with a true `ready` is the answer (upstream checks the same after each cell), and
`answer` is a fresh dict again. Text FINAL(...) is not an answer under this convention.
"""

from __future__ import annotations

import dataclasses

from rlm_orchestrator.sandbox import AgentClient, ExecutionReport, SubCallOutcome

# The class's name starts with "_": SHOW_VARS and the variable listings leave it out.
_TYPE_NAME = "_AnswerDict"

# Runs in the REPL namespace. `_final` is bound at definition: a model that overwrites
# FINAL_VAR for a block (it is restored after) cannot break the dict.
_CLASSES = f'''
class _AnswerText:
    __slots__ = ("value",)

    def __init__(self, value):
        self.value = value

    def __str__(self):
        return str(self.value)


class {_TYPE_NAME}(dict):
    """Set answer["content"], then answer["ready"] = True: the run ends with that content."""

    def __init__(self, *args, **kwargs):
        super().__init__(content="", ready=False)
        self.update(*args, **kwargs)

    def __setitem__(self, key, value, _final=FINAL_VAR, _text=_AnswerText):
        was_ready = bool(self.get("ready"))
        super().__setitem__(key, value)
        if key == "ready" and value and not was_ready:
            _final(_text(self.get("content", "")))

    def update(self, *args, **kwargs):
        for key, value in dict(*args, **kwargs).items():
            self[key] = value

    def setdefault(self, key, default=None):
        if key not in self:
            self[key] = default
        return self[key]
'''

INSTALL_CODE = _CLASSES + f"\nanswer = {_TYPE_NAME}()\n"

REWRAP_CODE = (
    _CLASSES
    + f"""
_previous = globals().get("answer")
answer = {_TYPE_NAME}()
if isinstance(_previous, dict):
    dict.update(answer, _previous)
    if _previous.get("ready"):
        dict.__setitem__(answer, "ready", False)
        answer["ready"] = True
del _previous
"""
)


async def _ignore_output(stream: str, text: str) -> None:
    return None


async def _no_sub_calls(prompts: list[str], model: str, kind: str) -> list[SubCallOutcome]:
    return [SubCallOutcome(error="not available here")] * len(prompts)


async def install(client: AgentClient) -> ExecutionReport:
    """A fresh `answer` dict (not ready) in the REPL: at the start of every completion."""
    return await client.execute(INSTALL_CODE, on_output=_ignore_output, on_sub_call=_no_sub_calls)


def answer_intact(report: ExecutionReport) -> bool:
    """Whether the block left `answer` the dict the loop installed."""
    return any(name == "answer" and type_name == _TYPE_NAME for name, type_name in report.variables)


async def after_block(
    client: AgentClient, report: ExecutionReport
) -> tuple[ExecutionReport, ExecutionReport | None]:
    """The block's report, with the answer a rebound `answer` dict gave (if any); `answer`
    is the installed dict again afterwards. Second: the report of the code that re-wrapped it,
    when some ran (the session records it: it changed the namespace)."""
    if report.final_answer_chars is not None or answer_intact(report):
        return report, None
    rewrap = await client.execute(REWRAP_CODE, on_output=_ignore_output, on_sub_call=_no_sub_calls)
    return dataclasses.replace(report, final_answer_chars=rewrap.final_answer_chars), rewrap
