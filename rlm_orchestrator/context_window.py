"""Each model's context window, and how many tokens a prompt will take in it.

The window is the config's `context_window`, else the one learned from the server's "maximum
context length" refusal, else litellm's model table (`max_input_tokens`, read without importing
litellm); unknown otherwise (then nothing is refused before it is sent).

Tokens are estimated from characters, without a tokenizer (none is right for every model, and
a real one costs milliseconds per call): before a model has answered, at a conservative 1 token
per 3 characters; after, at the highest ratio its own answers' `prompt_tokens` showed, plus a
margin. The estimate is meant to err high: a request refused by the server costs a round trip,
one refused here costs nothing.
"""

from __future__ import annotations

import math
import re
from typing import Any

from rlm_orchestrator import lm_prices
from rlm_orchestrator.config.lm import LMClientConfig
from rlm_orchestrator.exceptions import LMError

# Before a model has answered: 1 token per 3 characters errs high for English and code.
DEFAULT_TOKENS_PER_CHAR = 1 / 3
# On top of the highest ratio seen: tokenizers vary with content (digits, JSON, non-Latin).
RATIO_MARGIN = 1.05
# A chat template's tokens around each message, and around the whole request.
TOKENS_PER_MESSAGE = 8
TOKENS_PER_REQUEST = 16
# Prompts shorter than this say little about the ratio (the template's tokens dominate).
MIN_CHARS_TO_CALIBRATE = 400
# The least output a call may be left; less than this and the prompt does not fit.
MIN_OUTPUT_TOKENS = 32

# What servers say when a prompt does not fit; the first group is the window, when given.
_OVERFLOW = (
    # OpenAI, vLLM, llama-cpp-python: "This model's maximum context length is 8192 tokens."
    re.compile(r"maximum context length is (\d+) tokens", re.I),
    # llama-cpp-python's own: "Requested tokens (9000) exceed context window of 8192"
    re.compile(r"exceed(?:s|ed)? (?:the )?context window of (\d+)", re.I),
    # llama.cpp's server: "request (9000 tokens) exceeds the available context size (8192
    # tokens), try increasing it"
    re.compile(r"exceeds the available context size(?: \((\d+) tokens\))?", re.I),
    # Anthropic: "prompt is too long: 210000 tokens > 200000 maximum"
    re.compile(r"prompt is too long: \d+ tokens > (\d+) maximum", re.I),
    re.compile(r"context[_ ]length[_ ]exceeded", re.I),
)


class ContextOverflowError(LMError):
    """The prompt does not fit the model's context window: refused by the server, or here
    before it was sent. `window` is the window in tokens, when known."""

    def __init__(
        self,
        message: str,
        *,
        model: str | None = None,
        status_code: int | None = None,
        window: int | None = None,
    ):
        super().__init__(message, model=model, status_code=status_code)
        self.window = window


def overflow_in(message: str) -> int | None:
    """For a server's refusal that says the prompt is too long: the window it names, or 0
    when it names none; None for any other message."""
    for pattern in _OVERFLOW:
        found = pattern.search(message)
        if found is not None:
            window = found.group(1) if found.groups() else None
            return int(window) if window else 0
    return None


def prompt_chars(messages: list[dict[str, Any]]) -> int:
    total = 0
    for message in messages:
        content = message.get("content")
        if isinstance(content, str):
            total += len(content)
        elif isinstance(content, list):  # OpenAI content parts
            total += sum(len(str(p.get("text", ""))) for p in content if isinstance(p, dict))
    return total


def table_window(config: LMClientConfig) -> int | None:
    """litellm's `max_input_tokens` (else `max_tokens`) for this model, if it lists it."""
    provider, _, model = config.litellm_model.rpartition("/")
    info = lm_prices.model_info(provider, model)
    if info is None:
        return None
    for key in ("max_input_tokens", "max_tokens"):
        value = info.get(key)
        if isinstance(value, int) and value > 0:
            return value
    return None


class ModelWindows:
    """Windows and token ratios of the models of one router (all its views share it)."""

    def __init__(self) -> None:
        self._learned: dict[str, int] = {}
        self._ratio: dict[str, float] = {}
        self._table: dict[str, int | None] = {}

    def window(self, config: LMClientConfig) -> int | None:
        """The model's window in tokens, or None when nothing says."""
        name = config.model_name
        if name in self._learned:
            return self._learned[name]
        if config.context_window:
            return config.context_window
        if name not in self._table:
            self._table[name] = table_window(config)
        return self._table[name]

    def estimate(self, model: str, messages: list[dict[str, Any]]) -> int:
        """Tokens these messages will take, erring high."""
        ratio = self._ratio.get(model, DEFAULT_TOKENS_PER_CHAR)
        overhead = TOKENS_PER_REQUEST + TOKENS_PER_MESSAGE * len(messages)
        return math.ceil(prompt_chars(messages) * ratio) + overhead

    def chars_for(self, model: str, tokens: int) -> int:
        """About how many characters of prompt text fit in `tokens` (erring low)."""
        return max(0, int(tokens / self._ratio.get(model, DEFAULT_TOKENS_PER_CHAR)))

    def observe(self, model: str, messages: list[dict[str, Any]], prompt_tokens: int) -> None:
        """What the server counted for a prompt: the ratio of this model, from now on."""
        chars = prompt_chars(messages)
        if chars < MIN_CHARS_TO_CALIBRATE or prompt_tokens <= 0:
            return
        overhead = TOKENS_PER_REQUEST + TOKENS_PER_MESSAGE * len(messages)
        ratio = max(prompt_tokens - overhead, 1) / chars * RATIO_MARGIN
        known = self._ratio.get(model)
        # The first answer replaces the default guess; later ones can only raise it.
        self._ratio[model] = ratio if known is None else max(known, ratio)

    def learn(self, model: str, window: int, messages: list[dict[str, Any]]) -> None:
        """The server refused a prompt as too long. `window` is what it named (0: nothing):
        then the window is taken as 90% of what the refused prompt was estimated at."""
        if window <= 0:
            window = int(self.estimate(model, messages) * 0.9)
        known = self._learned.get(model)
        self._learned[model] = window if known is None else min(known, window)

    def output_limit(
        self, config: LMClientConfig, messages: list[dict[str, Any]], wanted: int | None
    ) -> int | None:
        """The max_tokens to send: the call's (else the model's), lowered to what the window
        leaves; ContextOverflowError when it leaves less than MIN_OUTPUT_TOKENS."""
        limit = config.max_tokens if wanted is None else min(wanted, config.max_tokens or wanted)
        window = self.window(config)
        if window is None:
            return limit
        prompt = self.estimate(config.model_name, messages)
        room = window - prompt
        if room < MIN_OUTPUT_TOKENS:
            raise ContextOverflowError(
                f"not sent to {config.model_name!r}: the prompt takes about {prompt} tokens, "
                f"and the model's context window is {window} tokens (at least "
                f"{MIN_OUTPUT_TOKENS} must be left for the answer)",
                model=config.model_name,
                window=window,
            )
        return room if limit is None else min(limit, room)
