"""The values of a block's variables, for the trajectory log (`REPLResult.locals`).

The original logs each local's value after every block. Ours live in the sandbox: when a
logger is attached (only then: one GetVariable per variable), each listed user variable's
`str()` is read back, up to MAX_LOGGED_VALUE_CHARS characters; a longer one is logged as its
type and length, never read (a variable can hold megabytes). Numbers, booleans and None come
back as themselves, as the original's JSON has them.
"""

from __future__ import annotations

import contextlib
from typing import Any

from rlm_orchestrator.exceptions import SandboxError
from rlm_orchestrator.sandbox import AgentClient
from rlm_orchestrator.types import MAX_LOGGED_VALUE_CHARS

_CONSTANTS: dict[str, Any] = {"True": True, "False": False, "None": None}
_NUMBERS: dict[str, type[int] | type[float]] = {"int": int, "float": float}


def _value(type_name: str, text: str) -> Any:
    if type_name in ("bool", "NoneType") and text in _CONSTANTS:
        return _CONSTANTS[text]
    number = _NUMBERS.get(type_name)
    if number is not None:
        with contextlib.suppress(ValueError):
            return number(text)
    return text


async def read_values(client: AgentClient, names: list[str]) -> dict[str, Any]:
    """name -> value (or a note saying why not) for each of `names`."""
    values: dict[str, Any] = {}
    for name in names:
        try:
            read = await client.get_variable(name, max_chars=MAX_LOGGED_VALUE_CHARS)
        except SandboxError as exc:
            values[name] = f"<not read: {exc}>"
            continue
        if not read.found:
            values[name] = None
        elif read.too_large:
            values[name] = f"<{read.type_name} of {read.chars} characters, not logged>"
        else:
            values[name] = _value(read.type_name, read.value)
    return values
