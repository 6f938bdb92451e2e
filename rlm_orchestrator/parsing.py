"""Pure text helpers for the root LM's responses: code blocks, final answers, REPL output."""

from __future__ import annotations

import functools
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

from rlm_orchestrator.config.fences import DEFAULT_CODE_FENCES


def _fence(languages: tuple[str, ...]) -> str:
    """An opening fence of one of `languages` (```repl by default), up to its line's end."""
    names = "|".join(re.escape(language) for language in languages)
    return rf"```(?:{names})[ \t]*\r?\n"


@functools.cache
def _code_block(languages: tuple[str, ...]) -> re.Pattern[str]:
    """An opening fence, the block's content and a closing ``` at the start of a line. The
    content group is lazily optional so an empty block (```repl\n```) closes at once instead
    of running on to the next block's closing fence."""
    return re.compile(_fence(languages) + r"(?:(.*?)\r?\n)??[ \t]*```", re.DOTALL)


@functools.cache
def _open_fence(languages: tuple[str, ...]) -> re.Pattern[str]:
    return re.compile(_fence(languages))


# Stands in for a masked block. It is not whitespace, so text that followed the block on the
# same line does not end up looking like the start of a line.
_MASK = "<repl block>"

_FINAL_VAR = re.compile(
    r"^[ \t]*FINAL_VAR\([ \t]*(?P<quote>[\"']?)(?P<name>[^\W\d]\w*)(?P=quote)[ \t]*\)[ \t]*$",
    re.MULTILINE,
)
_FINAL_START = re.compile(r"^[ \t]*FINAL\(", re.MULTILINE)
# Any answer statement; a FINAL's text never runs into the next one.
_STATEMENT_START = re.compile(r"^[ \t]*FINAL(?:_VAR)?\(", re.MULTILINE)


@dataclass(frozen=True)
class FinalAnswer:
    """A final answer found in a response.

    For ``kind == "final"`` ``value`` is the answer text; for ``"final_var"`` it is the name of
    the REPL variable holding the answer.
    """

    kind: Literal["final", "final_var"]
    value: str


def find_code_blocks(text: str, languages: tuple[str, ...] = DEFAULT_CODE_FENCES) -> list[str]:
    """Stripped contents of the complete blocks fenced as one of `languages` (```repl), in
    order; empty blocks skipped."""
    blocks: list[str] = []
    for match in _code_block(languages).finditer(text):
        content = (match.group(1) or "").strip()
        if content:
            blocks.append(content)
    return blocks


def open_code_block(text: str, languages: tuple[str, ...] = DEFAULT_CODE_FENCES) -> bool:
    """Whether `text` ends inside a code block (fenced as one of `languages`) that was opened
    and never closed (a response cut by the output limit mid-code)."""
    ends = [match.end() for match in _code_block(languages).finditer(text)]
    return _open_fence(languages).search(text, ends[-1] if ends else 0) is not None


def _line_end(text: str, index: int, limit: int) -> int:
    newline = text.find("\n", index, limit)
    return limit if newline == -1 else newline


def _ends_line(text: str, close: int, limit: int) -> bool:
    return not text[close + 1 : _line_end(text, close, limit)].strip()


def _final_text(text: str, start: int, limit: int) -> str | None:
    """The answer of a FINAL whose "(" ends just before ``start``, searched up to ``limit``."""
    depth = 1
    close: int | None = None
    for index in range(start, limit):
        char = text[index]
        if char == "(":
            depth += 1
        elif char == ")":
            depth -= 1
            if depth == 0:
                close = index
                break
    if close is not None:
        if _ends_line(text, close, limit):
            return text[start:close].strip()
        # Text after the matching ")": only a later ")" ending that same line can save it,
        # e.g. "FINAL(3 :) really)". "FINAL(x) trailing words" is not an answer.
        search_end = _line_end(text, close, limit)
    else:
        # Unbalanced, e.g. "FINAL(a :( b)": settle for the first ")" that ends a line.
        search_end = limit
    for index in range(start, search_end):
        if text[index] == ")" and _ends_line(text, index, limit):
            return text[start:index].strip()
    return None


def find_final_answer(
    text: str, languages: tuple[str, ...] = DEFAULT_CODE_FENCES
) -> FinalAnswer | None:
    """The first FINAL_VAR(name), else the first FINAL(text), outside code blocks (those
    fenced as one of `languages`)."""
    # A FINAL inside a code block is code the sandbox runs, not an answer.
    masked = _code_block(languages).sub(_MASK, text.replace("\r\n", "\n"))

    var_match = _FINAL_VAR.search(masked)
    if var_match is not None:
        return FinalAnswer(kind="final_var", value=var_match.group("name"))

    for start_match in _FINAL_START.finditer(masked):
        start = start_match.end()
        next_statement = _STATEMENT_START.search(masked, start)
        limit = next_statement.start() if next_statement is not None else len(masked)
        answer = _final_text(masked, start, limit)
        # An empty FINAL() says nothing; keep looking rather than end the run with "".
        if answer:
            return FinalAnswer(kind="final", value=answer)
    return None


def format_execution_output(stdout: str, stderr: str, variable_names: Sequence[str]) -> str:
    """What the root LM sees of one block's run: stdout, stderr and the user variables."""
    parts: list[str] = []
    if stdout:
        parts.append(f"\n{stdout}")
    if stderr:
        parts.append(f"\n{stderr}")
    if variable_names:
        parts.append(f"REPL variables: {list(variable_names)}\n")
    return "\n\n".join(parts) if parts else "No output"


def truncate_output(text: str, max_chars: int = 20_000) -> str:
    """Keep the first ``max_chars`` characters and say how many were cut."""
    if len(text) <= max_chars:
        return text
    return text[:max_chars] + f"... + [{len(text) - max_chars} chars...]"


def format_code_result_message(code: str, output: str) -> dict[str, str]:
    """The user message that reports one executed block and its (formatted) output."""
    return {
        "role": "user",
        "content": f"Code executed:\n```python\n{code}\n```\n\nREPL output:\n{output}",
    }
