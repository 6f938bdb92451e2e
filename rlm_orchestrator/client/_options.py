"""What a completion request carries besides its context: options, typed for IDEs and mypy.

`CompletionOptions` mirrors the proto's CompletionOptions (unset: the server's default);
`**options: Unpack[CompletionOptions]` gives the SDK's methods a typed signature, and
`options_message` still refuses a name it does not know (a typo is not silently ignored).
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Any, Literal, TypedDict

from rlm_orchestrator.exceptions import InvalidRequestError
from rlm_wire.v1 import orchestrator_pb2 as pb


class CompletionOptions(TypedDict, total=False):
    """Options of a completion; each left out takes the server's default. The limits may be
    lowered, never raised above the server's ceiling of the same name."""

    model: str  # the root LM: a model name the server registered
    sub_model: str  # the LM of llm_query sub-calls
    max_iterations: int
    max_depth: int
    timeout_seconds: float  # for the whole completion
    iteration_timeout_seconds: float
    max_cost: float  # USD, children included
    exec_timeout_seconds: float  # per code block
    system_prompt: str  # replaces the default one
    final_with_code: bool  # accept FINAL in the same response as code (the original's way)
    # "final" (FINAL/FINAL_VAR, the default) or "answer_dict" (answer["ready"] = True)
    answer_convention: Literal["final", "answer_dict"]
    # the fenced blocks that run: ["repl"] (the server's default unless it says otherwise);
    # ["repl", "python"] also runs ```python blocks. "repl,python" is taken too.
    code_fences: Sequence[str] | str


def options_message(options: Mapping[str, Any]) -> pb.CompletionOptions:
    """CompletionOptions from keyword arguments (unknown names are an error, not ignored)."""
    known = set(pb.CompletionOptions.DESCRIPTOR.fields_by_name)
    unknown = set(options) - known
    if unknown:
        raise InvalidRequestError(
            f"unknown completion options {sorted(unknown)}; known: {sorted(known)}",
            code="INVALID_ARGUMENT",
        )
    given = {k: v for k, v in options.items() if v is not None}
    if isinstance(given.get("code_fences"), str):  # "repl,python", as the CLI's flag takes it
        given["code_fences"] = [part.strip() for part in given["code_fences"].split(",")]
    return pb.CompletionOptions(**given)


def encode_context(context: Any) -> tuple[int, bytes]:
    """The context's encoding (proto ContextEncoding) and bytes: text as is, dict/list as JSON."""
    if isinstance(context, str):
        return pb.CONTEXT_ENCODING_TEXT, context.encode("utf-8")
    if isinstance(context, dict | list):
        return pb.CONTEXT_ENCODING_JSON, json.dumps(context, default=str).encode("utf-8")
    raise InvalidRequestError(
        f"context must be a str, dict or list, not {type(context).__name__}",
        code="INVALID_ARGUMENT",
    )
