"""What runs in FakeModal's sandboxes: each one's entrypoint as a real process, and its tunnels.

Without a runtime, FakeModal is a control plane only: a sandbox is a record and its tunnels
answer ``tunnel_target``. With one (``fake.runtime = SandboxRuntime(...)``), SandboxCreate
starts the definition's ``entrypoint_args`` as the container would: the whole argv, every flag,
so a command the container's program refuses fails here too. What a container gives its
process is modelled where a provider can see it:

- network: each sandbox has an address of its own in 127.0.0.0/8 (Linux routes all of it to
  loopback); an argument ``0.0.0.0:PORT`` (every interface of the container) becomes it.
- file system: an absolute path among the arguments (after the program) is a path of the
  container, kept under the sandbox's own directory (which has a /tmp); the image's ``python``
  is first on PATH (the test's interpreter, which has the agent's packages).
- environment: the definition's variables and its secrets, none of the test's (but
  ``extra_env``: a test run's own labels, e.g. for its leak checks).
- tunnels: a listener on 127.0.0.1 per open port; an encrypted (h2) tunnel terminates TLS with
  the given certificate and forwards plaintext to the container's port, as Modal's edge does;
  an unencrypted one relays TCP as is.
- lifecycle: an entrypoint that exits finishes the sandbox with its exit code (``poll()``
  sees it) and ends whatever it left running; terminate sends SIGTERM to it, then SIGKILL to
  all of the container's processes after the grace.

Not modelled: image builds (the steps are recorded, nothing is built), resources, egress rules
(the process has the host's network), timeouts.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import itertools
import os
import signal
import ssl
import subprocess
import sys
import threading
from collections.abc import Callable, Mapping
from pathlib import Path

from grpclib.const import Status
from grpclib.exceptions import GRPCError
from modal_proto import api_pb2

__all__ = ["Container", "SandboxRuntime"]

# Called with (sandbox id, exit code, why) when a container's entrypoint ends by itself.
OnExit = Callable[[str, int, str], None]


# One sequence for every runtime in the process: a sandbox of an earlier fake may still be
# exiting on its address, and a new one there would fail to bind while its tunnel reached the
# old agent (seen as UNAUTHENTICATED: the old agent's token).
_ADDRESSES = (f"127.78.{n // 250 % 250}.{n % 250 + 1}" for n in itertools.count())


@dataclasses.dataclass
class Container:
    sandbox_id: str
    argv: list[str]  # the entrypoint, as the create request gave it
    command: list[str]  # what ran: argv with the container's addresses and paths in place
    env: dict[str, str]
    address: str
    root: Path
    process: subprocess.Popen[bytes] | None = None
    exit_code: int | None = None
    # container port -> (host, port) of its tunnel
    tunnels: dict[int, tuple[str, int]] = dataclasses.field(default_factory=dict)
    servers: list[asyncio.Server] = dataclasses.field(default_factory=list)
    relays: set[asyncio.Task[None]] = dataclasses.field(default_factory=set)

    @property
    def log(self) -> str:
        """What the entrypoint wrote to stdout and stderr."""
        path = self.root / "container.log"
        return path.read_text(errors="replace") if path.exists() else ""


class SandboxRuntime:
    """Runs FakeModal's sandboxes as processes on this machine (see the module's doc)."""

    def __init__(
        self,
        root: Path,
        *,
        tls_cert: Path | None = None,
        tls_key: Path | None = None,
        tunnel_host: str = "localhost",
        extra_env: Mapping[str, str] | None = None,
        stop_grace_seconds: float = 10.0,
    ) -> None:
        self.root = root
        self.tunnel_host = tunnel_host  # the name the tunnel's certificate is for
        self.extra_env = dict(extra_env or {})
        self.stop_grace_seconds = stop_grace_seconds
        self.containers: dict[str, Container] = {}
        self._addresses = _ADDRESSES
        self._tls: ssl.SSLContext | None = None
        if tls_cert is not None:
            self._tls = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            self._tls.load_cert_chain(tls_cert, tls_key)
            self._tls.set_alpn_protocols(["h2"])  # gRPC clients insist on h2
        self._watchers: list[threading.Thread] = []

    # -- called by FakeModal, on its loop -------------------------------------------------

    async def start(
        self, sandbox_id: str, definition: api_pb2.Sandbox, env: dict[str, str], on_exit: OnExit
    ) -> None:
        argv = list(definition.entrypoint_args)
        address = next(self._addresses)
        root = self.root / sandbox_id
        container = Container(
            sandbox_id=sandbox_id,
            argv=argv,
            command=argv[:1] + [self._in_container(arg, root, address) for arg in argv[1:]],
            env={
                "PATH": f"{Path(sys.executable).parent}:/usr/local/bin:/usr/bin:/bin",
                **self.extra_env,
                **env,
            },
            address=address,
            root=root,
        )
        self.containers[sandbox_id] = container
        for port in definition.open_ports.ports:
            container.tunnels[port.port] = await self._open_tunnel(
                container, port.port, encrypted=not port.unencrypted
            )
        cwd = self._in_container(definition.workdir or "/", root, address)
        await asyncio.to_thread(self._spawn, container, cwd, on_exit)

    async def stop(self, sandbox_id: str) -> None:
        container = self.containers.get(sandbox_id)
        if container is None:
            return
        for server in container.servers:
            server.close()
        for relay in list(container.relays):
            relay.cancel()
        await asyncio.gather(*container.relays, return_exceptions=True)
        await asyncio.to_thread(self._kill, container)

    async def close(self) -> None:
        await asyncio.gather(*(self.stop(sandbox_id) for sandbox_id in list(self.containers)))
        for watcher in self._watchers:
            await asyncio.to_thread(watcher.join, self.stop_grace_seconds + 5)

    # -- the container ------------------------------------------------------------------

    @staticmethod
    def _in_container(arg: str, root: Path, address: str) -> str:
        if arg.startswith("0.0.0.0:"):
            return address + arg.removeprefix("0.0.0.0")
        if arg.startswith("/"):
            return str(root / "fs") + arg.rstrip("/")
        return arg

    def _spawn(self, container: Container, cwd: str, on_exit: OnExit) -> None:
        (container.root / "fs" / "tmp").mkdir(parents=True)  # every image has a /tmp
        Path(cwd).mkdir(parents=True, exist_ok=True)
        if not container.argv:
            return  # the image's default command: none of ours has one
        try:
            with (container.root / "container.log").open("wb") as log:
                container.process = subprocess.Popen(
                    container.command,
                    env=container.env,
                    cwd=cwd,
                    stdin=subprocess.DEVNULL,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,  # the container's processes: one group
                )
        except OSError as exc:  # no such program: the container fails to start
            container.exit_code = 127
            on_exit(container.sandbox_id, 127, f"failed to start {container.argv[0]!r}: {exc}")
            return
        watcher = threading.Thread(
            target=self._watch,
            args=(container, on_exit),
            name=f"modal-{container.sandbox_id}",
            daemon=True,
        )
        self._watchers.append(watcher)
        watcher.start()

    def _watch(self, container: Container, on_exit: OnExit) -> None:
        assert container.process is not None
        code = container.process.wait()
        # Killed by a signal: a shell's (and Modal's) 128 + the signal.
        container.exit_code = code if code >= 0 else 128 - code
        # The entrypoint is the container: what it leaves running ends with it.
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(container.process.pid, signal.SIGKILL)
        on_exit(container.sandbox_id, container.exit_code, "")

    def _kill(self, container: Container) -> None:
        process = container.process
        if process is None:
            return
        if process.poll() is not None:
            return  # its watcher ended the rest of the container
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(self.stop_grace_seconds)
        except subprocess.TimeoutExpired:
            # The leader still runs, so the group is still ours to kill.
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(process.pid, signal.SIGKILL)
            process.wait()

    # -- tunnels ------------------------------------------------------------------------

    async def _open_tunnel(
        self, container: Container, port: int, *, encrypted: bool
    ) -> tuple[str, int]:
        if encrypted and self._tls is None:
            raise GRPCError(
                Status.FAILED_PRECONDITION,
                "FakeModal's runtime has no TLS certificate for an encrypted tunnel",
            )

        async def relay(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            task = asyncio.current_task()
            assert task is not None
            container.relays.add(task)
            upstream: asyncio.StreamWriter | None = None
            try:
                up_reader, upstream = await asyncio.open_connection(container.address, port)
                await asyncio.gather(_pipe(reader, upstream), _pipe(up_reader, writer))
            except (OSError, asyncio.IncompleteReadError):
                pass  # the container is not listening (yet), or a side hung up
            finally:
                for side in (writer, upstream):
                    if side is not None:
                        await _close(side)
                container.relays.discard(task)

        server = await asyncio.start_server(
            relay, "127.0.0.1", 0, ssl=self._tls if encrypted else None
        )
        container.servers.append(server)
        return self.tunnel_host, int(server.sockets[0].getsockname()[1])


async def _pipe(source: asyncio.StreamReader, sink: asyncio.StreamWriter) -> None:
    while chunk := await source.read(65536):
        sink.write(chunk)
        await sink.drain()
    if sink.can_write_eof():
        sink.write_eof()
    else:
        sink.close()  # TLS has no half-close


async def _close(side: asyncio.StreamWriter) -> None:
    # Closed for good before the relay ends (TLS says goodbye first), so that nothing is left
    # open when the fake's loop stops.
    side.close()
    try:
        await asyncio.wait_for(side.wait_closed(), 2)
    except (OSError, TimeoutError, asyncio.CancelledError, ssl.SSLError):
        side.transport.abort()
