"""Client: the synchronous face of AsyncClient, on an event loop in a thread of its own.

A thread (rather than asyncio.run per call) because a gRPC channel belongs to one event loop
and should be reused across calls; it also works where a loop is already running (Jupyter).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import threading
from collections.abc import Coroutine, Iterator
from typing import Any, TypeVar

from rlm_orchestrator import events as ev
from rlm_orchestrator.client._async import AsyncClient, AsyncSession, CompletionSummary
from rlm_orchestrator.types import RLMChatCompletion

T = TypeVar("T")


class Client:
    """A connection to an orchestrator server. Use `with`, or call `close()`."""

    def __init__(self, target: str = "127.0.0.1:50051", **connection: Any) -> None:
        self._target = target
        self._connection = connection
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
                    return AsyncClient(self._target, **self._connection)

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
        self, context: Any, root_prompt: str | None = None, **options: Any
    ) -> RLMChatCompletion:
        """Like `RLM.completion`; raises the same exceptions."""
        return self._run(self._async.completion(context, root_prompt, **options))

    def stream(
        self, context: Any, root_prompt: str | None = None, **options: Any
    ) -> Iterator[ev.StreamEvent]:
        """The completion's events as they happen; leaving the loop early cancels it."""
        events = self._async.stream(context, root_prompt, **options)
        try:
            while True:
                try:
                    yield self._run(anext(events))  # type: ignore[arg-type]
                except StopAsyncIteration:
                    return
        finally:
            self._run(events.aclose())  # type: ignore[attr-defined]

    def cancel(self, completion_id: str) -> None:
        self._run(self._async.cancel(completion_id))

    def list_completions(self) -> list[CompletionSummary]:
        return self._run(self._async.list_completions())

    def get_completion(self, completion_id: str) -> CompletionSummary:
        return self._run(self._async.get_completion(completion_id))

    def create_session(self, **options: Any) -> Session:
        return Session(self, self._run(self._async.create_session(**options)))


class Session:
    """A server-side session; `with` closes it."""

    def __init__(self, client: Client, session: AsyncSession) -> None:
        self._client = client
        self._session = session
        self.session_id = session.session_id

    def completion(
        self, context: Any, root_prompt: str | None = None, **options: Any
    ) -> RLMChatCompletion:
        return self._client.completion(context, root_prompt, session_id=self.session_id, **options)

    def close(self) -> None:
        self._client._run(self._session.close())

    def __enter__(self) -> Session:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()
