"""The lean transport: OpenAI-compatible chat completions as one HTTP POST, without litellm.

For the most common endpoints (OpenAI, vLLM, llama.cpp, gateways) litellm's per-call work
(request building, response objects, cost lookup) costs several ms of CPU, and its import
seconds. Here a call is a POST to `{api_base}/chat/completions` on a keep-alive aiohttp
session (one per event loop), the reply's JSON read as it is. aiohttp, not httpx: against an
instant local server httpx spent 1.2-5 ms of CPU per call (its pool), aiohttp 0.1-0.15 ms.

`endpoint_for` decides which models come here: what litellm would send as a plain
pass-through (the same body, URL, key and headers); anything it would rewrite stays on litellm.
Errors carry litellm's class names and status codes, so retries and messages stay the same.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import json
import os
import re
import threading
import weakref
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from rlm_orchestrator.exceptions import ConfigurationError

if TYPE_CHECKING:
    import aiohttp

    from rlm_orchestrator.config.lm import LMClientConfig

# litellm providers this client speaks for; "auto" takes the first two only (OpenRouter's
# prices come from its own usage.cost, which litellm reads in ways not mirrored here).
HTTP_PROVIDERS = ("openai", "hosted_vllm", "openrouter")
AUTO_PROVIDERS = ("openai", "hosted_vllm")
# backend_kwargs litellm passes through unchanged for those providers (checked against
# litellm's requests to the scripted server); any other key keeps "auto" on litellm.
PASSTHROUGH = frozenset(
    {"temperature", "top_p", "max_tokens", "seed", "stop", "presence_penalty", "frequency_penalty"}
)
# OpenAI reasoning models: litellm rewrites their messages and parameters.
_REASONING = re.compile(r"^(o\d|gpt-5)")
DEFAULT_TIMEOUT = 600.0  # litellm's request timeout
_TAGS = {"openai": "OpenAI", "hosted_vllm": "Hosted_vllm", "openrouter": "Openrouter"}


@dataclass(frozen=True)
class Endpoint:
    """Where and how one model's calls go. `repr` never shows the headers (the key)."""

    provider: str
    url: str
    model: str
    headers: dict[str, str] = field(repr=False)
    body: dict[str, Any] = field(default_factory=dict)
    timeout: float = DEFAULT_TIMEOUT


def _env(*names: str) -> str | None:
    return next((os.environ[n] for n in names if os.environ.get(n)), None)


def _base_and_key(provider: str, config: LMClientConfig) -> tuple[str | None, str | None]:
    """What litellm would use: the config's, else the provider's variables (read as it does)."""
    if provider == "openai":
        base = config.api_base or _env("OPENAI_BASE_URL", "OPENAI_API_BASE")
        return base or "https://api.openai.com/v1", config.api_key or _env("OPENAI_API_KEY")
    if provider == "hosted_vllm":
        base = config.api_base or _env("HOSTED_VLLM_API_BASE")
        return base, config.api_key or _env("HOSTED_VLLM_API_KEY") or "fake-api-key"
    base = config.api_base or _env("OPENROUTER_API_BASE") or "https://openrouter.ai/api/v1"
    return base, config.api_key or _env("OPENROUTER_API_KEY", "OR_API_KEY")


def _why_not(config: LMClientConfig, provider: str, model: str, auto: bool) -> str | None:
    """Why this model cannot take the lean path (None: it can)."""
    if provider not in (AUTO_PROVIDERS if auto else HTTP_PROVIDERS):
        return f"its litellm provider {provider or '(none)'!r} is not OpenAI-compatible here"
    if auto and (unknown := sorted(set(config.extra) - PASSTHROUGH - {"timeout"})):
        return f"litellm handles its backend_kwargs {unknown}"
    if auto and provider == "openai" and _REASONING.match(model):
        return "litellm rewrites requests to OpenAI's reasoning models"
    if _base_and_key(provider, config)[0] is None:
        return "it has no api_base"
    return None


def endpoint_for(config: LMClientConfig) -> Endpoint | None:
    """The lean endpoint of a model, or None when it goes through litellm."""
    if config.transport == "litellm":
        return None
    provider, _, model = config.litellm_model.partition("/")
    why = _why_not(config, provider, model, auto=config.transport == "auto")
    if why is not None:
        if config.transport == "http":
            raise ConfigurationError(
                f"model {config.model_name!r}: transport 'http' is not possible: {why}"
            )
        return None
    base, key = _base_and_key(provider, config)
    assert base is not None
    headers = {"Content-Type": "application/json", "Accept": "application/json"}
    if key:
        headers["Authorization"] = f"Bearer {key}"
    body: dict[str, Any] = {k: v for k, v in config.extra.items() if k != "timeout"}
    if provider == "openai" and (organization := _env("OPENAI_ORGANIZATION")):
        headers["OpenAI-Organization"] = organization
    if provider == "openrouter":  # what litellm adds to every OpenRouter request
        headers["HTTP-Referer"] = _env("OR_SITE_URL") or "https://litellm.ai"
        headers["X-Title"] = _env("OR_APP_NAME") or "liteLLM"
        body["usage"] = {"include": True}
    return Endpoint(
        provider=provider,
        url=f"{base.rstrip('/')}/chat/completions",
        model=model,
        headers=headers,
        body=body,
        timeout=float(config.extra.get("timeout") or DEFAULT_TIMEOUT),
    )


_lean_lock = threading.Lock()
_lean_import: concurrent.futures.Future[None] | None = None


def start_import(priced: bool) -> concurrent.futures.Future[None]:
    """aiohttp's import (~0.3 s) and the price table's read, once, in a daemon thread."""
    global _lean_import
    with _lean_lock:
        if _lean_import is None:
            future: concurrent.futures.Future[None] = concurrent.futures.Future()

            def load() -> None:
                try:
                    import aiohttp  # noqa: F401

                    future.set_result(None)
                    if priced:
                        from rlm_orchestrator import lm_prices

                        lm_prices.warm_up()  # after: the first request need not wait for it
                except BaseException as exc:
                    if not future.done():
                        future.set_exception(exc)

            threading.Thread(target=load, name="lm-http-import", daemon=True).start()
            _lean_import = future
        return _lean_import


async def imported() -> None:
    """Once aiohttp is imported (started by `start_import`), without blocking the loop."""
    future = _lean_import or start_import(priced=False)
    if not future.done():
        await asyncio.wrap_future(future)
    future.result()


class HTTPLMError(Exception):
    """A failed lean call; subclasses are named as litellm names its exceptions."""

    def __init__(self, message: str, status_code: int | None) -> None:
        super().__init__(message)
        self.status_code = status_code


class BadRequestError(HTTPLMError): ...


class AuthenticationError(HTTPLMError): ...


class PermissionDeniedError(HTTPLMError): ...


class NotFoundError(HTTPLMError): ...


class UnprocessableEntityError(HTTPLMError): ...


class RateLimitError(HTTPLMError): ...


class InternalServerError(HTTPLMError): ...


class ServiceUnavailableError(HTTPLMError): ...


class Timeout(HTTPLMError): ...


class APIError(HTTPLMError): ...


class APIConnectionError(HTTPLMError):
    """The server could not be reached: no HTTP status at all (retried, as litellm's is)."""


_BY_STATUS: dict[int, type[HTTPLMError]] = {
    400: BadRequestError,
    401: AuthenticationError,
    403: PermissionDeniedError,
    404: NotFoundError,
    408: Timeout,
    422: UnprocessableEntityError,
    429: RateLimitError,
    503: ServiceUnavailableError,
}


def _error(endpoint: Endpoint, status: int, raw: bytes) -> HTTPLMError:
    """The exception litellm would raise for this status, with the provider's message."""
    text = raw.decode("utf-8", "replace")
    try:
        message = json.loads(text)["error"]["message"]
    except (ValueError, KeyError, TypeError):
        message = text
    kind = _BY_STATUS.get(status) or (InternalServerError if status >= 500 else APIError)
    return kind(f"{_TAGS[endpoint.provider]}Exception - {message}", status)


class Sessions:
    """Keep-alive aiohttp sessions, one per event loop (a session belongs to one loop), of
    one router and its views: closing them ends no other router's calls."""

    def __init__(self) -> None:
        self._by_loop: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, _Session] = (
            weakref.WeakKeyDictionary()
        )

    def get(self) -> _Session:
        import aiohttp

        loop = asyncio.get_running_loop()
        found = self._by_loop.get(loop)
        if found is None or found.session.closed:
            # No limit of its own: the router's per-model caps decide how many calls are out.
            # No timeout of its own (its default ends a call at 300 s): `post` times a call.
            # trust_env=False: with it aiohttp hands every request to threads twice (the
            # proxy variables, ~/.netrc); the proxy is found once per URL instead (_Session).
            connector = aiohttp.TCPConnector(limit=0)
            session = aiohttp.ClientSession(
                connector=connector,
                timeout=aiohttp.ClientTimeout(total=None, sock_connect=None),
                trust_env=False,
            )
            found = _Session(session)
            self._by_loop[loop] = found
        return found

    async def aclose(self) -> None:
        """Close this event loop's session (before the loop ends: else aiohttp warns)."""
        found = self._by_loop.pop(asyncio.get_running_loop(), None)
        if found is not None and not found.session.closed:
            await found.session.close()


class _Session:
    """A session and, per endpoint URL, the parsed URL and its proxy from the environment
    (HTTP(S)_PROXY / NO_PROXY, as for litellm's clients), found at its first call."""

    def __init__(self, session: aiohttp.ClientSession) -> None:
        self.session = session
        self._targets: dict[str, tuple[Any, Any, Any]] = {}

    def target(self, url: str) -> tuple[Any, Any, Any]:
        """(URL, proxy or None, proxy auth or None)."""
        found = self._targets.get(url)
        if found is None:
            from aiohttp.helpers import get_env_proxy_for_url
            from yarl import URL

            parsed = URL(url)
            try:
                found = (parsed, *get_env_proxy_for_url(parsed))
            except LookupError:
                found = (parsed, None, None)
            self._targets[url] = found
        return found


async def post(
    sessions: Sessions,
    endpoint: Endpoint,
    messages: list[dict[str, Any]],
    max_tokens: int | None = None,
) -> dict[str, Any]:
    """One chat completion: the reply's JSON, or an HTTPLMError (retryable ones included)."""
    import aiohttp

    request = {"model": endpoint.model, "messages": messages, **endpoint.body}
    if max_tokens is not None:
        request["max_tokens"] = max_tokens
    data = json.dumps(request)
    tag = _TAGS[endpoint.provider]
    try:
        async with asyncio.timeout(endpoint.timeout):
            session = sessions.get()
            url, proxy, proxy_auth = session.target(endpoint.url)
            async with session.session.post(
                url,
                data=data.encode(),
                headers=endpoint.headers,
                proxy=proxy,
                proxy_auth=proxy_auth,
            ) as response:
                status, raw = response.status, await response.read()
    except TimeoutError:
        raise Timeout(
            f"{tag}Exception - Request timed out. timeout value={endpoint.timeout}", 408
        ) from None
    except aiohttp.ClientError as exc:
        # No status: the server was never reached (not "HTTP 500"); the URL says which.
        raise APIConnectionError(
            f"{tag}Exception - cannot connect to {endpoint.url} ({exc})", None
        ) from exc
    if status != 200:
        raise _error(endpoint, status, raw)
    # HTTP 200 with a body that is no chat completion: the server's fault, not a status.
    try:
        reply = json.loads(raw)
    except ValueError:
        raise _not_a_completion(endpoint, f"the reply is not JSON: {raw[:200]!r}") from None
    if not isinstance(reply, dict):
        raise _not_a_completion(endpoint, "the reply is not a JSON object")
    try:
        message = reply["choices"][0]["message"]
    except (KeyError, IndexError, TypeError):
        message = None
    if not isinstance(message, dict):
        raise _not_a_completion(endpoint, f"the reply has no choices[0].message: {raw[:200]!r}")
    return reply


def _not_a_completion(endpoint: Endpoint, why: str) -> APIError:
    return APIError(
        f"{_TAGS[endpoint.provider]}Exception - {endpoint.url} answered HTTP 200, "
        f"but not with a chat completion: {why}",
        None,
    )
