"""How the model gives its final answer: RLM's `answer_convention` (answer_dict.py runs the
upstream one). Here, without the sandbox's imports, for the settings that name it."""

from __future__ import annotations

from typing import Literal

AnswerConvention = Literal["final", "answer_dict"]
FINAL: AnswerConvention = "final"  # FINAL(...) / FINAL_VAR(...), the default
ANSWER_DICT: AnswerConvention = "answer_dict"  # answer = {"content": ..., "ready": True}
ANSWER_CONVENTIONS: tuple[AnswerConvention, ...] = (FINAL, ANSWER_DICT)
