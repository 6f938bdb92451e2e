"""What a worker may send the agent, parsed and checked.

User code can write to the worker's frame pipe itself, so every frame is read as hostile
input: its kind and size are checked from the header before the payload is read, and its
payload against the shape a legitimate worker sends (types, counts, lengths). Anything else
raises ProtocolError, and the agent kills the worker.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import Any

from sandbox_agent.frames import Kind
from sandbox_agent.limits import (
    MAX_ERROR_CHARS,
    MAX_MODEL_CHARS,
    MAX_NAME_CHARS,
    MAX_PROMPTS_PER_REQUEST,
    MAX_REPLY_BYTES,
    MAX_REQUEST_BYTES,
    MAX_VARIABLES,
    OUTPUT_FRAME_BYTES,
    VALUE_CHUNK_BYTES,
)

# The largest payload of each kind a worker may send; any other kind is a violation.
FRAME_LIMITS = {
    Kind.READY: MAX_REPLY_BYTES,
    Kind.STDOUT: OUTPUT_FRAME_BYTES,
    Kind.STDERR: OUTPUT_FRAME_BYTES,
    Kind.LLM_REQUEST: MAX_REQUEST_BYTES,
    Kind.DONE: MAX_REPLY_BYTES,
    Kind.LOADED: MAX_REPLY_BYTES,
    Kind.VARIABLE: MAX_REPLY_BYTES,
    Kind.CHUNK: VALUE_CHUNK_BYTES,
}
_NAMES = {
    Kind.READY: "READY",
    Kind.STDOUT: "STDOUT",
    Kind.STDERR: "STDERR",
    Kind.LLM_REQUEST: "LLM_REQUEST",
    Kind.DONE: "DONE",
    Kind.LOADED: "LOADED",
    Kind.VARIABLE: "VARIABLE",
    Kind.CHUNK: "CHUNK",
}
_MAX_COUNT = 2**63 - 1  # fits the uint64 / int64 fields these numbers end up in
DONE_STATUSES = ("ok", "error", "interrupted")
REQUEST_KINDS = ("llm_query", "rlm_query")


class ProtocolError(Exception):
    """The worker sent something a legitimate worker never sends."""


def kind_name(kind: int) -> str:
    return _NAMES.get(kind, f"unknown kind 0x{kind:02x}")


def check_header(size: int, kind: int) -> None:
    """Before reading a payload: is this a kind a worker sends, and not too big for it?"""
    limit = FRAME_LIMITS.get(kind)
    if limit is None:
        raise ProtocolError(f"it sent a frame of {kind_name(kind)} ({size} bytes)")
    if size > limit:
        raise ProtocolError(
            f"it announced a {kind_name(kind)} frame of {size} bytes, the limit is {limit}"
        )


def output_text(payload: bytes) -> str:
    try:
        return payload.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ProtocolError(f"it sent output that is not UTF-8 ({exc})") from None


def _object(payload: bytes, kind: int) -> dict[str, Any]:
    try:
        value = json.loads(payload)
    except ValueError as exc:
        raise ProtocolError(
            f"it sent a {kind_name(kind)} frame that does not parse ({exc})"
        ) from None
    if not isinstance(value, dict):
        raise ProtocolError(f"it sent a {kind_name(kind)} frame that is not a JSON object")
    return value


def _bad(kind: int, key: str, why: str) -> ProtocolError:
    return ProtocolError(f"it sent a {kind_name(kind)} frame whose {key!r} {why}")


def _count(obj: dict[str, Any], key: str, kind: int) -> int:
    value = obj.get(key)
    if type(value) is not int or not 0 <= value <= _MAX_COUNT:
        raise _bad(kind, key, "is not a count")
    return value


def _text(obj: dict[str, Any], key: str, kind: int, limit: int) -> str:
    value = obj.get(key)
    if not isinstance(value, str):
        raise _bad(kind, key, "is not a string")
    if len(value) > limit:
        raise _bad(kind, key, f"has {len(value)} characters, more than {limit}")
    return value


def _names(value: Any, kind: int, key: str) -> list[str]:
    if not isinstance(value, list) or len(value) > MAX_VARIABLES:
        raise _bad(kind, key, f"is not a list of at most {MAX_VARIABLES} entries")
    for name in value:
        if not isinstance(name, str) or len(name) > MAX_NAME_CHARS:
            raise _bad(kind, key, f"holds a name that is not a string of <= {MAX_NAME_CHARS}")
    return value


@dataclass(frozen=True)
class LlmRequestFrame:
    request_id: int
    prompts: list[str]
    model: str
    kind: str
    size: int  # bytes of the frame, counted against the bytes in flight


def parse_llm_request(payload: bytes) -> LlmRequestFrame:
    kind = Kind.LLM_REQUEST
    request = _object(payload, kind)
    prompts = request.get("prompts")
    if (
        not isinstance(prompts, list)
        or not 1 <= len(prompts) <= MAX_PROMPTS_PER_REQUEST
        or not all(isinstance(p, str) for p in prompts)
    ):
        raise _bad(kind, "prompts", f"is not a list of 1 to {MAX_PROMPTS_PER_REQUEST} strings")
    request_kind = request.get("kind")
    if request_kind not in REQUEST_KINDS:
        raise _bad(kind, "kind", f"is not one of {REQUEST_KINDS}")
    return LlmRequestFrame(
        request_id=_count(request, "id", kind),
        prompts=prompts,
        model=_text(request, "model", kind, MAX_MODEL_CHARS),
        kind=str(request_kind),
        size=len(payload),
    )


@dataclass(frozen=True)
class DoneFrame:
    status: str  # ok | error | interrupted
    error: str
    stdout_chars: int
    stderr_chars: int
    truncated_chars: int
    variables: list[tuple[str, str]]
    variables_omitted: int
    duration: float
    final_answer_chars: int | None


def parse_done(payload: bytes) -> DoneFrame:
    kind = Kind.DONE
    done = _object(payload, kind)
    status = done.get("status")
    if status not in DONE_STATUSES:
        raise _bad(kind, "status", f"is not one of {DONE_STATUSES}")
    variables = done.get("variables")
    if not isinstance(variables, list) or len(variables) > MAX_VARIABLES:
        raise _bad(kind, "variables", f"is not a list of at most {MAX_VARIABLES} entries")
    pairs: list[tuple[str, str]] = []
    for pair in variables:
        if not (isinstance(pair, list) and len(pair) == 2):
            raise _bad(kind, "variables", "holds an entry that is not [name, type]")
        name, type_name = _names(pair, kind, "variables")
        pairs.append((name, type_name))
    duration = done.get("duration")
    if not isinstance(duration, int | float) or not math.isfinite(duration) or duration < 0:
        raise _bad(kind, "duration", "is not a number of seconds")
    final = done.get("final_answer_chars")
    return DoneFrame(
        status=str(status),
        error=_text(done, "error", kind, MAX_ERROR_CHARS),
        stdout_chars=_count(done, "stdout_chars", kind),
        stderr_chars=_count(done, "stderr_chars", kind),
        truncated_chars=_count(done, "truncated_chars", kind),
        variables=pairs,
        variables_omitted=_count(done, "variables_omitted", kind),
        duration=float(duration),
        final_answer_chars=None if final is None else _count(done, "final_answer_chars", kind),
    )


def parse_loaded(payload: bytes) -> dict[str, Any]:
    kind = Kind.LOADED
    loaded = _object(payload, kind)
    if "error" in loaded:
        return {"error": _text(loaded, "error", kind, MAX_ERROR_CHARS)}
    return {
        "type_name": _text(loaded, "type_name", kind, MAX_NAME_CHARS),
        "length": _count(loaded, "length", kind),
    }


@dataclass(frozen=True)
class VariableHeaderFrame:
    found: bool
    type_name: str
    chars: int
    available: list[str]


def parse_variable_header(payload: bytes) -> VariableHeaderFrame:
    kind = Kind.VARIABLE
    header = _object(payload, kind)
    found = header.get("found")
    if not isinstance(found, bool):
        raise _bad(kind, "found", "is not a boolean")
    available = _names(header.get("available"), kind, "available")
    if not found:
        return VariableHeaderFrame(False, "", 0, available)
    return VariableHeaderFrame(
        True,
        _text(header, "type_name", kind, MAX_NAME_CHARS),
        _count(header, "chars", kind),
        available,
    )


def parse_ready(payload: bytes) -> dict[str, Any]:
    return _object(payload, Kind.READY)


def value_chunk(payload: bytes, expected_chars: int) -> str:
    """A chunk of a variable's value: exactly the characters that were asked for."""
    try:
        text = payload.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ProtocolError(f"it sent a CHUNK that is not UTF-8 ({exc})") from None
    if len(text) != expected_chars:
        raise ProtocolError(
            f"it sent a CHUNK of {len(text)} characters when {expected_chars} were asked for"
        )
    return text
