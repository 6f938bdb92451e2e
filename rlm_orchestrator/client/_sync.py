"""Client: the synchronous face of AsyncClient, on an event loop in a thread of its own.

A thread (rather than asyncio.run per call) because a gRPC channel belongs to one event loop
and should be reused across calls; it also works where a loop is already running (Jupyter).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import functools
import os
import threading
from collections.abc import AsyncIterator, Callable, Coroutine, Iterator, Sequence
from pathlib import Path
from typing import Any, TypeVar, Unpack

from rlm_orchestrator import events as ev
from rlm_orchestrator.client import _router as router
from rlm_orchestrator.client._async import (
    DEFAULT_MAX_RETRIES,
    DEFAULT_TARGET,
    DEFAULT_TIMEOUT,
    TOKEN_ENV,
    AsyncClient,
    AsyncSession,
    CompletionSummary,
    check_limits,
)
from rlm_orchestrator.client._options import CompletionOptions
from rlm_orchestrator.types import RLMChatCompletion

T = TypeVar("T")


class Client:
    """A connection to an orchestrator server. Use `with`, or call `close()`.

    `token`: the server's bearer token; None reads RLM_SERVER_TOKEN ("" sends none).
    `tls`, `ca_file`, `cert_file`, `key_file`: TLS, with a private CA, and a client
    certificate for mTLS. `timeout`: seconds per call (None: no limit): each unary call, and
    the wait for the server to take a completion, never a running completion (its
    `timeout_seconds` option does). `max_retries`: re-sends of a unary call after UNAVAILABLE
    (completions and LM calls are never re-sent).
    """

    def __init__(
        self,
        target: str = DEFAULT_TARGET,
        *,
        token: str | None = None,
        tls: bool = False,
        ca_file: str | Path | None = None,
        cert_file: str | Path | None = None,
        key_file: str | Path | None = None,
        timeout: float | None = DEFAULT_TIMEOUT,
        max_retries: int = DEFAULT_MAX_RETRIES,
    ) -> None:
        check_limits(timeout, max_retries)
        self.target, self.timeout, self.max_retries = target, timeout, max_retries
        # Read now rather than on the first call: what the caller's environment held.
        token = os.environ.get(TOKEN_ENV, "") if token is None else token
        self._connect: Callable[[], AsyncClient] = functools.partial(
            AsyncClient,
            target,
            token=token,
            tls=tls,
            ca_file=ca_file,
            cert_file=cert_file,
            key_file=key_file,
            timeout=timeout,
            max_retries=max_retries,
        )
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._client: AsyncClient | None = None
        self._lock = threading.Lock()

    def _run(self, coroutine: Coroutine[Any, Any, T]) -> T:
        loop = self._started()
        future = asyncio.run_coroutine_threadsafe(coroutine, loop)
        try:
            return future.result()
        except (KeyboardInterrupt, concurrent.futures.CancelledError):
            # Ctrl-C: cancel the call on the server too (its stream is cancelled).
            future.cancel()
            raise

    def _started(self) -> asyncio.AbstractEventLoop:
        with self._lock:
            if self._loop is None:
                self._loop = asyncio.new_event_loop()
                self._thread = threading.Thread(
                    target=self._loop.run_forever, name="rlm-client", daemon=True
                )
                self._thread.start()

                async def connect() -> AsyncClient:
                    return self._connect()

                self._client = asyncio.run_coroutine_threadsafe(connect(), self._loop).result()
            return self._loop

    @property
    def _async(self) -> AsyncClient:
        self._started()
        assert self._client is not None
        return self._client

    def close(self) -> None:
        """Idempotent."""
        with self._lock:
            loop, thread, client = self._loop, self._thread, self._client
            self._loop = self._thread = self._client = None
        if loop is None or thread is None:
            return
        if client is not None:
            asyncio.run_coroutine_threadsafe(client.close(), loop).result()
        loop.call_soon_threadsafe(loop.stop)
        thread.join()
        loop.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def completion(
        self,
        context: Any,
        root_prompt: str | None = None,
        *,
        session_id: str = "",
        on_event: ev.EventHandler | None = None,
        **options: Unpack[CompletionOptions],
    ) -> RLMChatCompletion:
        """Like `RLM.completion`; raises the same exceptions. `on_event` sees each progress
        event (it runs on the client's thread: keep it short)."""
        return self._run(
            self._async.completion(
                context, root_prompt, session_id=session_id, on_event=on_event, **options
            )
        )

    def stream(
        self,
        context: Any,
        root_prompt: str | None = None,
        *,
        session_id: str = "",
        **options: Unpack[CompletionOptions],
    ) -> Iterator[ev.StreamEvent]:
        """The completion's events as they happen; leaving the loop early cancels it."""
        return self._iterate(
            self._async.stream(context, root_prompt, session_id=session_id, **options)
        )

    def attach(self, completion_id: str, *, after_event: int = 0) -> Iterator[ev.StreamEvent]:
        """Like AsyncClient.attach."""
        return self._iterate(self._async.attach(completion_id, after_event=after_event))

    def _iterate(self, events: AsyncIterator[ev.StreamEvent]) -> Iterator[ev.StreamEvent]:
        try:
            while True:
                try:
                    yield self._run(anext(events))  # type: ignore[arg-type]
                except StopAsyncIteration:
                    return
        finally:
            self._run(events.aclose())  # type: ignore[attr-defined]

    def cancel(self, completion_id: str) -> None:
        """Cancels a running completion (NotFoundError when it is not running)."""
        self._run(self._async.cancel(completion_id))

    def list_completions(self) -> list[CompletionSummary]:
        return self._run(self._async.list_completions())

    def get_completion(self, completion_id: str) -> CompletionSummary:
        """A running completion (NotFoundError when it is not running)."""
        return self._run(self._async.get_completion(completion_id))

    def create_session(self, **options: Unpack[CompletionOptions]) -> Session:
        """A multi-turn session: one sandbox whose variables persist across completions."""
        return Session(self, self._run(self._async.create_session(**options)))

    def close_session(self, session_id: str) -> None:
        """NotFoundError when there is no such session."""
        self._run(self._async.close_session(session_id))

    # -- the server's LM router: one LM call, no RLM loop (see AsyncClient) --------------------

    def list_models(self) -> router.ModelList:
        """The models the server registered, and which answers each depth by default."""
        return self._run(self._async.list_models())

    def complete(
        self,
        prompt: router.Prompt,
        *,
        model: str | None = None,
        depth: int = 0,
        timeout: float | None = None,
    ) -> router.LMCompletion:
        """One LM answer made by the server (`AsyncClient.complete`). Never re-sent."""
        return self._run(self._async.complete(prompt, model=model, depth=depth, timeout=timeout))

    def complete_batch(
        self,
        prompts: Sequence[str],
        *,
        model: str | None = None,
        depth: int = 0,
        timeout: float | None = None,
    ) -> router.LMBatch:
        """Many prompts at once, answers in their order (an LMError where one failed)."""
        return self._run(
            self._async.complete_batch(prompts, model=model, depth=depth, timeout=timeout)
        )


class Session:
    """A server-side session; `with` closes it."""

    def __init__(self, client: Client, session: AsyncSession) -> None:
        self._client = client
        self._session = session
        self.session_id = session.session_id

    def completion(
        self,
        context: Any,
        root_prompt: str | None = None,
        *,
        on_event: ev.EventHandler | None = None,
        **options: Unpack[CompletionOptions],
    ) -> RLMChatCompletion:
        return self._client.completion(
            context, root_prompt, session_id=self.session_id, on_event=on_event, **options
        )

    def stream(
        self, context: Any, root_prompt: str | None = None, **options: Unpack[CompletionOptions]
    ) -> Iterator[ev.StreamEvent]:
        return self._client.stream(context, root_prompt, session_id=self.session_id, **options)

    def close(self) -> None:
        self._client._run(self._session.close())

    def __enter__(self) -> Session:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()
