"""Which fenced blocks of a root response run as code: RLM's `code_fences`.

The original's contract is ```repl, and it stays the default. Some models write ```python
whatever the prompt says (a small local model wrote it in every one of ~40 turns):
`code_fences=("repl", "python")` runs those blocks too. Here, without the loop's imports, for
the settings that name it (RLM, `run`, the server and its requests).
"""

from __future__ import annotations

import re
from typing import Annotated

from pydantic import BeforeValidator
from pydantic_settings import NoDecode

DEFAULT_CODE_FENCES: tuple[str, ...] = ("repl",)
_LANGUAGE = re.compile(r"^[A-Za-z0-9_+-]+$")


def code_fences(value: object) -> tuple[str, ...]:
    """`value` (languages, or one string "repl,python") as a tuple without repeats; a
    ValueError saying what is wrong otherwise."""
    if isinstance(value, str):
        value = [part.strip() for part in value.split(",")]
    if not isinstance(value, list | tuple) or not value:
        raise ValueError("must name at least one fence language, e.g. repl,python")
    for language in value:
        if not isinstance(language, str) or not _LANGUAGE.match(language):
            raise ValueError(
                f"{language!r} is no fence language (a word: letters, digits, _ + -), "
                "e.g. repl,python"
            )
    return tuple(dict.fromkeys(value))


# As a setting: a list, or "repl,python" (a flag, an RLM_*_CODE_FENCES variable).
CodeFences = Annotated[tuple[str, ...], NoDecode, BeforeValidator(code_fences)]
