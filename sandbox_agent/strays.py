"""What user code started outside the worker's process group dies with the worker.

`setsid()` (or a double fork) takes a process out of the group that the agent kills. In the
local jail that does not matter: the pid namespace ends with the worker. Elsewhere (a
container's agent, a local one where the kernel refuses namespaces) the agent is a *child
subreaper*: what the worker leaves behind, orphaned, becomes the agent's child instead of
init's, and the agent kills it when the worker is replaced or stopped.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal

PR_SET_CHILD_SUBREAPER = 36
_ROUNDS = 1000  # each round kills what the previous one orphaned; bounded by the pid limit
_REAP_POLL_SECONDS = 0.005
_REAP_WAIT_SECONDS = 2.0


def adopt_orphans() -> None:
    """Make this process the reaper of its descendants' orphans (no privilege needed)."""
    from sandbox_agent import syscalls

    with contextlib.suppress(OSError):
        syscalls.prctl(PR_SET_CHILD_SUBREAPER, 1)


def _children() -> list[int]:
    me = os.getpid()
    found = []
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat", "rb") as stat:
                fields = stat.read().rsplit(b")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if len(fields) > 1 and int(fields[1]) == me:  # fields: state, ppid, ...
            found.append(int(name))
    return found


async def kill_strays(spare: frozenset[int] = frozenset()) -> int:
    """SIGKILL every child of this process but `spare` (call it when it should have no other)
    and what they orphan in turn, reaping each; returns how many there were."""
    killed = 0
    for _ in range(_ROUNDS):
        strays = [pid for pid in _children() if pid not in spare]
        if not strays:
            break
        for pid in strays:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        for pid in strays:
            await _reap(pid)
        killed += len(strays)
    return killed


async def _reap(pid: int) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + _REAP_WAIT_SECONDS
    while loop.time() < deadline:
        try:
            done, _ = os.waitpid(pid, os.WNOHANG)  # noqa: ASYNC222  (WNOHANG: never blocks)
        except ChildProcessError:
            return
        if done:
            return
        await asyncio.sleep(_REAP_POLL_SECONDS)
