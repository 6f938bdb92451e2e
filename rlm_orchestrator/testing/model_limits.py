"""What a real model server does with a request's size, for the scripted server.

Tokens are counted as the scripted server always counted them (1 per 4 characters of message
text, at least 1). A reply longer than the request's `max_tokens` is cut there and finishes
with "length", as every OpenAI-compatible server does. With a `context_window`, a request whose
prompt plus `max_tokens` does not fit is refused with HTTP 400 and the message OpenAI, vLLM and
llama-cpp-python's server send, so a client can learn the window from it.
"""

from __future__ import annotations

import math
from typing import Any

CHARS_PER_TOKEN = 4


def tokens(chars: int) -> int:
    return max(1, math.ceil(chars / CHARS_PER_TOKEN))


def prompt_tokens(messages: list[Any], text_of: Any) -> int:
    chars = sum(len(text_of(m.get("content"))) for m in messages if isinstance(m, dict))
    return tokens(chars)


def _limit(body: dict[str, Any]) -> int | None:
    max_tokens = body.get("max_tokens")
    return max_tokens if isinstance(max_tokens, int) and max_tokens > 0 else None


def refusal(body: dict[str, Any], prompt: int, window: int | None) -> str | None:
    """The 400 message for a request that does not fit the window, or None when it fits."""
    limit = _limit(body) or 0
    if window is None or prompt + limit <= window:
        return None
    return (
        f"This model's maximum context length is {window} tokens. However, you requested "
        f"{prompt + limit} tokens ({prompt} in the messages, {limit} in the completion). "
        "Please reduce the length of the messages or completion."
    )


def cut(
    body: dict[str, Any], reply: str, prompt: int, window: int | None
) -> tuple[str, str, dict[str, int]]:
    """The reply cut to max_tokens (and the window), its finish reason, and the usage."""
    limit = _limit(body)
    if window is not None:
        limit = min(limit or window - prompt, window - prompt)
    finish = "stop"
    if limit is not None and tokens(len(reply)) > limit:
        reply, finish = reply[: limit * CHARS_PER_TOKEN], "length"
    completion = tokens(len(reply))
    usage = {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
    }
    return reply, finish, usage
