"""What a client sends on a Run stream: the start message, then the context in chunks.

What does not fit raises InvalidRequestError or ResourceExhaustedError: the status the client
gets (`status.py`)."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any, TypeAlias

import grpc

from rlm_orchestrator.exceptions import InvalidRequestError, ResourceExhaustedError
from rlm_wire.v1 import orchestrator_pb2 as pb

Context: TypeAlias = "grpc.aio.ServicerContext[Any, Any]"


async def read_start(
    requests: AsyncIterator[pb.RunRequest], max_context_bytes: int
) -> pb.CompletionStart:
    """The start message, checked (INVALID_ARGUMENT; RESOURCE_EXHAUSTED above the size limit)."""
    first = await anext(aiter(requests), None)
    if first is None or first.WhichOneof("kind") != "start":
        raise InvalidRequestError("the first message must be `start`")
    start = first.start
    if start.context_bytes > max_context_bytes:
        raise ResourceExhaustedError(
            f"a context of {start.context_bytes} bytes exceeds the server's "
            f"max_context_bytes={max_context_bytes}"
        )
    if start.context_encoding not in (pb.CONTEXT_ENCODING_TEXT, pb.CONTEXT_ENCODING_JSON):
        raise InvalidRequestError("context_encoding must be TEXT or JSON")
    return start


async def read_context(requests: AsyncIterator[pb.RunRequest], start: pb.CompletionStart) -> Any:
    """The context's chunks, decoded (INVALID_ARGUMENT when they do not match the start)."""
    data = bytearray()
    async for message in requests:
        if message.WhichOneof("kind") != "context_chunk":
            raise InvalidRequestError("only context_chunk may follow `start`")
        data += message.context_chunk
        if len(data) > start.context_bytes:
            raise InvalidRequestError(
                f"more context than the {start.context_bytes} bytes announced"
            )
    if len(data) != start.context_bytes:
        raise InvalidRequestError(
            f"received {len(data)} context bytes, {start.context_bytes} announced"
        )
    try:
        text = data.decode("utf-8")
        del data
        if start.context_encoding == pb.CONTEXT_ENCODING_JSON:
            value: Any = json.loads(text)
            if not isinstance(value, str | dict | list):
                kind = type(value).__name__
                raise ValueError(f"a JSON context must be an object, array or string, not {kind}")
            return value
        return text
    except ValueError as exc:
        raise InvalidRequestError(f"bad context: {exc}") from exc


def merged_options(
    defaults: pb.CompletionOptions | None, options: pb.CompletionOptions
) -> pb.CompletionOptions:
    """Session defaults overridden by the fields the request sets."""
    merged = pb.CompletionOptions()
    if defaults is not None:
        merged.CopyFrom(defaults)
    merged.MergeFrom(options)
    if options.code_fences:  # a repeated field: MergeFrom appends, the request's replace
        del merged.code_fences[:]
        merged.code_fences.extend(options.code_fences)
    return merged
