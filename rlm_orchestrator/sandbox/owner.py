"""Who owns a sandbox: `host:pid:process-start`, and whether that orchestrator is gone.

Providers label their sandboxes with it, so that any orchestrator on the same host can tell
an orphan (its owner's process no longer exists) from a live neighbour's sandbox. The
process start time makes a recycled pid harmless.
"""

from __future__ import annotations

import os
import socket
from pathlib import Path


def process_start(pid: int) -> str:
    """The kernel's start time of a process (empty when there is no such process)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return ""


def orchestrator_id() -> str:
    pid = os.getpid()
    return f"{socket.gethostname()}:{pid}:{process_start(pid)}"


def owner_gone(owner: str) -> bool:
    """True only when `owner` is an orchestrator of this host whose process has ended."""
    host, _, rest = owner.partition(":")
    pid, _, start = rest.partition(":")
    if host != socket.gethostname() or not pid.isdigit():
        return False  # another machine's: only its expiry can tell
    return process_start(int(pid)) != start
