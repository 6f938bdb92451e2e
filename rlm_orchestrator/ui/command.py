"""`rlm-orchestrator ui`: the viewer on its own, until SIGTERM / SIGINT."""

from __future__ import annotations

import asyncio
import ipaddress
import os
import signal
from pathlib import Path

from rlm_orchestrator.exceptions import ConfigurationError

TOKEN_ENV = "RLM_UI_TOKEN"
DEFAULT_LISTEN = "127.0.0.1:8765"


def is_loopback(listen: str) -> bool:
    host = listen.rpartition(":")[0].strip("[]")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # a host name: it may resolve to anything


def check_listen(listen: str, token: str | None) -> None:
    """The viewer shows prompts, code and outputs: beyond loopback only behind a token."""
    host, sep, port = listen.rpartition(":")
    if not sep or not host or not port.isdigit():
        raise ConfigurationError(f"listen {listen!r}: expected HOST:PORT")
    if token is None and not is_loopback(listen):
        raise ConfigurationError(
            f"the viewer would listen on {listen} with no token: anyone who can reach it could "
            f"read every recorded prompt and output. Set {TOKEN_ENV}, or listen on loopback"
        )


async def run_viewer(store: Path, listen: str) -> None:
    from rlm_orchestrator.ui.app import ViewerServer, ViewerSettings

    token = os.environ.get(TOKEN_ENV) or None
    check_listen(listen, token)
    server = ViewerServer(ViewerSettings(store=store, token=token), listen)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    await server.start()
    try:
        print(f"VIEWER {server.url}", flush=True)
        await stop.wait()
    finally:
        await server.stop()
