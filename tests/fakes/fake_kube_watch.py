"""The fake Kubernetes API server's watches: its bounded event history, and one open watch.

A watch sees ADDED/MODIFIED/DELETED events filtered by a ``Selection``; as in the apiserver's
watch cache, an object leaving the selection is sent as DELETED and one entering it as ADDED.
A watch from a resourceVersion replays the history after it, and one older than the history
gets one ERROR event ``410 Expired``. Watch bookmarks are not modelled.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import threading
import time
from collections import deque
from collections.abc import AsyncIterator, Iterable, Iterator
from dataclasses import dataclass

from tests.fakes.fake_kube_objects import ApiError, JsonDict, Kind, bad_request
from tests.fakes.fake_kube_selectors import Selection

__all__ = ["Event", "EventHistory", "Watch"]


@dataclass(frozen=True)
class Event:
    """One write, as the history keeps it."""

    rv: int
    kind: Kind
    type: str
    obj: JsonDict  # the state at `rv` (for DELETED: the last state, at the deletion's rv)
    prev: JsonDict | None


class Watch:
    """One open watch: ``{"type", "object"}`` events in resourceVersion order.

    Iterate it (blocking; for threads) or ``async for`` it (for any loop); both end at the
    timeout, on ``close()``, or after an ERROR event. Its state is guarded by the store's lock.
    """

    def __init__(self, lock: threading.Lock, registry: set[Watch], flt: Selection, timeout: float):
        self._lock, self._registry, self._filter = lock, registry, flt
        self._cond = threading.Condition(lock)
        self._deadline = time.monotonic() + timeout if timeout > 0 else None
        self._events: deque[JsonDict] = deque()
        self._ended = False
        self._wakers: list[tuple[asyncio.AbstractEventLoop, asyncio.Event]] = []

    # -- with the lock held
    def _push(self, event_type: str, obj: JsonDict) -> None:
        if not self._ended:
            self._events.append({"type": event_type, "object": copy.deepcopy(obj)})
            self._wake()

    def _offer(self, event: Event) -> None:
        if event.kind is not self._filter.kind:
            return
        now = event.type != "DELETED" and self._filter.matches(event.obj)
        if event.type == "DELETED":
            if self._filter.matches(event.obj):
                self._push("DELETED", event.obj)
        elif event.prev is None or event.type == "ADDED":
            if now:
                self._push("ADDED", event.obj)
        elif self._filter.matches(event.prev):
            if now:
                self._push("MODIFIED", event.obj)
            else:  # as the apiserver's watch cache: the last matching state, at this version
                gone = copy.deepcopy(event.prev)
                gone["metadata"]["resourceVersion"] = str(event.rv)
                self._push("DELETED", gone)
        elif now:
            self._push("ADDED", event.obj)

    def _end(self) -> None:
        self._ended = True
        self._registry.discard(self)
        self._wake()

    def _wake(self) -> None:
        self._cond.notify_all()
        for loop, waker in self._wakers:
            with contextlib.suppress(RuntimeError):  # that loop is closed: nobody waits there
                loop.call_soon_threadsafe(waker.set)
        self._wakers.clear()

    def _time_left(self) -> float | None:
        """Seconds to the deadline (None: no deadline); ends the watch when it has passed."""
        if self._deadline is None:
            return None
        left = self._deadline - time.monotonic()
        if left <= 0 and not self._ended:
            self._end()
        return max(left, 0.0)

    # -- any thread
    def close(self) -> None:
        """Ends the watch; pending events are dropped."""
        with self._lock:
            self._events.clear()
            if not self._ended:
                self._end()

    @property
    def done(self) -> bool:
        """True once the watch has ended and every event has been taken."""
        with self._lock:
            self._time_left()
            return self._ended and not self._events

    def get(self, timeout: float | None = None) -> JsonDict | None:
        """The next event, waiting up to `timeout` s (None: until one comes or the watch ends).

        None means no event (yet: see ``done``).
        """
        until = None if timeout is None else time.monotonic() + timeout
        with self._cond:
            while not self._events and not self._ended:
                left = self._time_left()
                if self._ended:
                    break
                if until is not None:
                    mine = until - time.monotonic()
                    if mine <= 0:
                        return None
                    left = mine if left is None else min(left, mine)
                self._cond.wait(left)
            return self._events.popleft() if self._events else None

    async def aget(self) -> JsonDict | None:
        """The next event, without blocking the loop; None once the watch has ended."""
        loop = asyncio.get_running_loop()
        while True:
            with self._lock:
                if self._events:
                    return self._events.popleft()
                left = self._time_left()
                if self._ended:
                    return None
                waker = asyncio.Event()
                self._wakers.append((loop, waker))
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(waker.wait(), left)

    def __iter__(self) -> Iterator[JsonDict]:
        while (event := self.get()) is not None:
            yield event

    async def __aiter__(self) -> AsyncIterator[JsonDict]:
        while (event := await self.aget()) is not None:
            yield event


class EventHistory:
    """The last `limit` events and the open watches they go to. The store's lock guards it:
    every method is called with it held."""

    def __init__(self, lock: threading.Lock, limit: int) -> None:
        self._lock = lock
        self._events: deque[Event] = deque(maxlen=limit)
        self._evicted_rv = 0  # events up to this version have left the history
        self._watches: set[Watch] = set()

    def publish(self, event: Event) -> None:
        if len(self._events) == self._events.maxlen:
            self._evicted_rv = self._events[0].rv
        self._events.append(event)
        for watch in list(self._watches):
            watch._offer(event)

    def open(
        self,
        flt: Selection,
        current: Iterable[JsonDict],
        resource_version: str | None,
        timeout: float,
    ) -> Watch:
        """Events after `resource_version`; without one (or "0"), first ADDED for each object
        of `current` that matches. A version older than the history gets 410 Expired."""
        watch = Watch(self._lock, self._watches, flt, timeout)
        if resource_version in (None, "", "0"):
            for obj in current:
                if flt.matches(obj):
                    watch._push("ADDED", obj)
        else:
            if not resource_version.isdigit():
                message = f'resourceVersion: Invalid value: "{resource_version}": not a number'
                raise bad_request(message)
            since = int(resource_version)
            if since < self._evicted_rv:
                message = f"too old resource version: {since} ({self._evicted_rv + 1})"
                watch._push("ERROR", ApiError(410, "Expired", message).status())
                watch._end()
                return watch
            for event in self._events:
                if event.rv > since:
                    watch._offer(event)
        self._watches.add(watch)
        return watch

    def close_all(self) -> None:
        """Ends every open watch (their streams end as at a server timeout)."""
        for watch in list(self._watches):
            watch._end()
