"""Validation errors as one line that names the key and where it came from.

Pydantic's report spans lines and names fields by their model; a user wants "which key, in
which file (or variable, or flag), and what is wrong with it". Every surface turns its
`ValidationError` into a `ConfigurationError` here, with a `label` that says where a key
came from.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

from pydantic import ValidationError
from pydantic_core import ErrorDetails

from rlm_orchestrator.exceptions import ConfigurationError

Loc = tuple[int | str, ...]
# Names a key for a message, e.g. "rlm.toml: environment_kwargs.image" or "--max-iterations".
Label = Callable[[Loc], str]
MAX_SHOWN_INPUT = 60


def dotted(loc: Sequence[int | str]) -> str:
    """("models", 0, "name") -> "models[0].name"."""
    text = ""
    for part in loc:
        text += f"[{part}]" if isinstance(part, int) else (f".{part}" if text else str(part))
    return text


def _shown(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= MAX_SHOWN_INPUT else text[: MAX_SHOWN_INPUT - 3] + "..."


def problem(error: ErrorDetails) -> str:
    """What is wrong, in words, with the value given."""
    kind = error["type"]
    if kind == "extra_forbidden":
        return "unknown key"
    if kind == "missing":
        return "required, and not given"
    message = error["msg"].removeprefix("Value error, ")
    if kind.startswith("config_"):  # ours (sandbox.py): the message says it all
        return message
    if not isinstance(error["input"], dict | list):
        message += f" (got {_shown(error['input'])})"
    return message


def one_line(exc: ValidationError, label: Label = dotted) -> str:
    """The first problem in full; the keys of the others after it."""
    errors = exc.errors()
    first = errors[0]
    line = f"{label(tuple(first['loc'])) or 'settings'}: {problem(first)}"
    others = [label(tuple(e["loc"])) or "settings" for e in errors[1:]]
    if others:
        line += f" (and {len(others)} more: {', '.join(dict.fromkeys(others))})"
    return line


@contextmanager
def refusing(label: Label = dotted) -> Iterator[None]:
    """A ValidationError raised inside becomes a one-line ConfigurationError (the pydantic
    report is not chained: `from None`)."""
    try:
        yield
    except ValidationError as exc:
        raise ConfigurationError(one_line(exc, label)) from None
