"""An LM that answers at once, at litellm's completion call: the seam both sides share.

Our LMRouter calls `litellm.acompletion`; the seed's own LiteLLMClient calls
`litellm.completion` (one prompt) and `litellm.acompletion` (batched). Replacing those two
module attributes for the duration of a measurement keeps every layer above them real on
both sides (our loop, router, retries, accounting; the seed's LMHandler, its client, its usage
tracking) and removes only the network and the provider.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any

# A model litellm has a price for, so that our router's cost accounting runs as in production.
MODEL = "openai/gpt-4o-mini"
SUB_PROMPT = "x"
SUB_ANSWER = "y"


def _response(text: str) -> Any:
    import litellm

    return litellm.ModelResponse(
        model=MODEL.split("/", 1)[1],
        choices=[
            {"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop"}
        ],
        usage={"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2},
    )


@contextlib.contextmanager
def instant_litellm(
    root_reply: Callable[[list[dict[str, Any]]], str] | None = None,
) -> Iterator[None]:
    """litellm answers `SUB_ANSWER` to the sub-call prompt at once (one prebuilt response, as
    building it is litellm's work, not ours); any other conversation is the root model's,
    answered by `root_reply(messages)`."""
    import litellm

    sub = _response(SUB_ANSWER)
    sub_messages = [{"role": "user", "content": SUB_PROMPT}]

    def answer(messages: list[dict[str, Any]]) -> Any:
        if messages == sub_messages:
            return sub
        if root_reply is None:
            raise AssertionError(f"unexpected conversation: {messages!r:.200}")
        return _response(root_reply(messages))

    def completion(*, messages: list[dict[str, Any]], **kwargs: Any) -> Any:
        return answer(messages)

    async def acompletion(*, messages: list[dict[str, Any]], **kwargs: Any) -> Any:
        return answer(messages)

    saved = litellm.completion, litellm.acompletion
    litellm.completion, litellm.acompletion = completion, acompletion
    try:
        yield
    finally:
        litellm.completion, litellm.acompletion = saved
