"""A fake Modal control plane that the real ``modal`` client talks to, for tests.

``FakeModal`` is a grpclib server on 127.0.0.1 (plaintext HTTP/2) implementing the generated
``modal_proto.api_grpc.ModalClientBase`` servicer. It runs its own event loop in a background
thread, so it serves both sync and ``.aio`` client calls (the modal client runs its own loop in
its own thread too).

Usage::

    with FakeModal() as fake:
        for key, value in fake.env().items():
            monkeypatch.setenv(key, value)
        reset_modal_client()        # drop a client cached from an earlier server
        fake.tunnel_target = ("127.0.0.1", agent_port)
        ...  # the real client: modal.App.lookup / modal.Sandbox.create / ...
        fake.calls()                # ["ClientHello", "AuthTokenGet", ...]
        fake.requests_for("SandboxCreateV2")[0].definition.open_ports

Every request is recorded (``fake.requests``: list of ``(method, request message)``). RPCs the
fake does not implement fail with ``UNIMPLEMENTED`` and a message naming the method, and are
also listed in ``fake.unimplemented``. A test may override or add any RPC with
``fake.set_handler(name, fn)`` where ``fn(request) -> response`` (a list of responses for
server-streaming RPCs; a coroutine is awaited on the server's loop).

Credentials are checked as Modal checks them: every RPC must carry the token id and secret that
``fake.env()`` gives (random for each fake), or it fails with ``UNAUTHENTICATED``, which the
client raises as ``modal.exception.AuthError``; ``fake.refused`` lists the RPCs refused so.

Sandboxes are records only, unless ``fake.runtime`` is a
:class:`~tests.fakes.fake_modal_runtime.SandboxRuntime`: then each sandbox's
entrypoint runs, verbatim, as a process, and its tunnels lead to it. The RPC handlers are in
:mod:`.fake_modal_rpcs`.

The modal client reads its settings (``MODAL_SERVER_URL``, tokens) from the environment each time
a client is created, so the environment may be set after ``import modal``; but the client made by
``from_env`` is a process-wide singleton: call ``reset_modal_client()`` after changing the env.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import dataclasses
import inspect
import itertools
import json
import secrets
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from typing import Any, cast

import grpclib.const
import grpclib.server
from google.protobuf.message import Message
from grpclib.const import Cardinality, Status
from grpclib.exceptions import GRPCError
from modal_proto import api_grpc, api_pb2

from tests.fakes.fake_modal_rpcs import FakeSandbox, ModalRpcs
from tests.fakes.fake_modal_runtime import SandboxRuntime

__all__ = ["FakeModal", "FakeSandbox", "SandboxRuntime", "reset_modal_client"]


def reset_modal_client() -> None:
    """Forget what modal cached from an earlier server: the client ``modal.Client.from_env``
    made, and the environments it looked up (process-wide, by name)."""
    from modal._environments import ENVIRONMENT_CACHE
    from modal.client import _Client

    _Client._client_from_env = None
    _Client._client_from_env_lock = None
    ENVIRONMENT_CACHE.clear()


def _fake_jwt(lifetime: float = 3600.0) -> str:
    def b64(data: dict[str, Any]) -> str:
        return base64.urlsafe_b64encode(json.dumps(data).encode()).rstrip(b"=").decode()

    return f"{b64({'alg': 'none', 'typ': 'JWT'})}.{b64({'exp': int(time.time() + lifetime)})}.fake"


@dataclasses.dataclass
class _Throttle:
    remaining: int
    status: Status
    message: str


class FakeModal(ModalRpcs):
    """In-process fake of the Modal control plane for the real ``modal`` client."""

    def __init__(self, host: str = "127.0.0.1", runtime: SandboxRuntime | None = None) -> None:
        self.host = host
        self.port: int | None = None
        # The credentials the fake accepts, shaped like Modal's ("ak-..." / "as-...").
        self.token_id = "ak-" + secrets.token_hex(11)
        self.token_secret = "as-" + secrets.token_hex(11)
        # Names of RPCs refused for their credentials.
        self.refused: list[str] = []
        self.runtime = runtime
        # (method name, request message), in the order the server received them.
        self.requests: list[tuple[str, Message]] = []
        # Names of RPCs the client called that the fake does not implement.
        self.unimplemented: list[str] = []
        # What SandboxGetTunnels answers for every open port of a sandbox.
        self.tunnel_target: tuple[str, int] = ("127.0.0.1", 0)
        # Tunnels per container port, overriding tunnel_target for that port.
        self.tunnel_targets: dict[int, tuple[str, int]] = {}
        self.sandboxes: dict[str, FakeSandbox] = {}
        self.apps: dict[tuple[str, str], str] = {}  # (environment, name) -> app id
        self.images: dict[str, api_pb2.Image] = {}
        self.image_builder_version = "2024.10"
        # Longest time one SandboxWait call blocks before answering "still running".
        self.max_wait_block = 1.0
        self._throttles: dict[str, list[_Throttle]] = {}
        self._handlers: dict[str, Callable[[Any], Any]] = {}
        self._ids = itertools.count(1)
        self._lock = threading.RLock()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._server: grpclib.server.Server | None = None

    # ------------------------------------------------------------------ lifecycle
    def start(self) -> FakeModal:
        if self._thread is not None:
            return self
        started = threading.Event()
        errors: list[BaseException] = []

        def run() -> None:
            loop = asyncio.new_event_loop()
            self._loop = loop
            asyncio.set_event_loop(loop)
            try:
                self._server = grpclib.server.Server([_make_servicer(self)])
                loop.run_until_complete(self._server.start(self.host, 0))
                sockets = self._server._server.sockets  # type: ignore[union-attr]
                self.port = sockets[0].getsockname()[1]
            except BaseException as exc:
                errors.append(exc)
                started.set()
                loop.close()
                return
            started.set()
            loop.run_forever()
            loop.close()

        self._thread = threading.Thread(target=run, name="fake-modal", daemon=True)
        self._thread.start()
        if not started.wait(10):
            raise RuntimeError("FakeModal did not start within 10 s")
        if errors:
            self._thread = None
            raise errors[0]
        return self

    def stop(self) -> None:
        loop, thread, server = self._loop, self._thread, self._server
        if thread is None or loop is None:
            return

        async def shutdown() -> None:
            if self.runtime is not None:
                await self.runtime.close()
            if server is not None:
                server.close()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(server.wait_closed(), 5)

        try:
            asyncio.run_coroutine_threadsafe(shutdown(), loop).result(10)
        finally:
            loop.call_soon_threadsafe(loop.stop)
            thread.join(10)
            self._thread = None
            self._loop = None
            self._server = None

    def __enter__(self) -> FakeModal:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    async def __aenter__(self) -> FakeModal:
        return self.start()

    async def __aexit__(self, *exc: object) -> None:
        await asyncio.get_running_loop().run_in_executor(None, self.stop)

    @property
    def url(self) -> str:
        if self.port is None:
            raise RuntimeError("FakeModal is not started")
        return f"http://{self.host}:{self.port}"

    def env(self) -> dict[str, str]:
        """Environment variables that point the real modal client at this fake."""
        return {
            "MODAL_SERVER_URL": self.url,
            "MODAL_TOKEN_ID": self.token_id,
            "MODAL_TOKEN_SECRET": self.token_secret,
            "MODAL_ENVIRONMENT": "main",
            # The client is not inside a Modal container.
            "MODAL_IS_REMOTE": "0",
            # No image-build validation against the (fake) builder version.
            "MODAL_IMAGE_BUILDER_VERSION": self.image_builder_version,
            # Fail fast rather than wait out throttling.
            "MODAL_MAX_THROTTLE_WAIT": "0",
            "MODAL_LOGLEVEL": "WARNING",
        }

    # ------------------------------------------------------------------ test hooks
    def calls(self) -> list[str]:
        with self._lock:
            return [name for name, _ in self.requests]

    def requests_for(self, method: str) -> list[Any]:
        with self._lock:
            return [req for name, req in self.requests if name == method]

    def clear_requests(self) -> None:
        with self._lock:
            self.requests.clear()
            self.unimplemented.clear()
            self.refused.clear()

    def set_handler(self, method: str, handler: Callable[[Any], Any] | None) -> None:
        """Answer ``method`` with ``handler(request)`` (a list if streaming); None resets."""
        if method not in _METHODS:
            raise ValueError(f"unknown Modal RPC {method!r}")
        with self._lock:
            if handler is None:
                self._handlers.pop(method, None)
            else:
                self._handlers[method] = handler

    def throttle(
        self,
        method: str = "SandboxCreateV2",
        times: int = 1,
        status: Status = Status.RESOURCE_EXHAUSTED,
        message: str = "Rate limit exceeded (fake)",
    ) -> None:
        """Make the next ``times`` calls of ``method`` fail with ``status`` (a rate limit)."""
        if method not in _METHODS:
            raise ValueError(f"unknown Modal RPC {method!r}")
        with self._lock:
            self._throttles.setdefault(method, []).append(_Throttle(times, status, message))

    def running_sandboxes(self) -> list[FakeSandbox]:
        with self._lock:
            return [sb for sb in self.sandboxes.values() if sb.running]

    # ------------------------------------------------------------------ dispatch
    def _next_id(self, prefix: str) -> str:
        return f"{prefix}-fake{next(self._ids):06d}"

    def _authenticate(self, method: str, metadata: Mapping[str, str]) -> None:
        # The status is Modal's (the client raises AuthError for it). Of the messages, "Token ID
        # is malformed" is Modal's; the others are the fake's own words.
        token_id = metadata.get("x-modal-token-id", "")
        token_secret = metadata.get("x-modal-token-secret", "")
        if not token_id or not token_secret:
            why = "Token missing. Could not authenticate client."
        elif not token_id.startswith("ak-"):
            why = "Token ID is malformed"
        elif (token_id, token_secret) != (self.token_id, self.token_secret):
            why = f"Invalid token: {token_id} is unknown or its secret is wrong"
        else:
            return
        self.refused.append(method)
        raise GRPCError(Status.UNAUTHENTICATED, why)

    def _dispatch(self, method: str, request: Message, metadata: Mapping[str, str]) -> Any:
        with self._lock:
            self.requests.append((method, request))
            self._authenticate(method, metadata)
            throttles = self._throttles.get(method)
            if throttles:
                throttle = throttles[0]
                throttle.remaining -= 1
                if throttle.remaining <= 0:
                    throttles.pop(0)
                raise GRPCError(throttle.status, throttle.message)
            handler = self._handlers.get(method)
            if handler is None:
                handler = getattr(self, f"_rpc_{method}", None)
            if handler is None:
                self.unimplemented.append(method)
                raise GRPCError(
                    Status.UNIMPLEMENTED, f"FakeModal does not implement the Modal RPC {method}"
                )
            return handler(request)

    def _rpc_AuthTokenGet(self, req: api_pb2.AuthTokenGetRequest) -> api_pb2.AuthTokenGetResponse:
        return api_pb2.AuthTokenGetResponse(token=_fake_jwt())


# ---------------------------------------------------------------------- servicer plumbing
def _methods() -> dict[str, grpclib.const.Handler]:
    """Every RPC of the generated servicer, by method name, with its cardinality and types."""

    class _AnyAttr:
        def __getattr__(self, name: str) -> None:
            return None

    mapping = api_grpc.ModalClientBase.__mapping__(cast(Any, _AnyAttr()))
    return {path.rsplit("/", 1)[1]: handler for path, handler in mapping.items()}


_METHODS = _methods()


def _make_servicer(fake: FakeModal) -> api_grpc.ModalClientBase:
    def make(name: str, cardinality: Cardinality) -> Callable[..., Any]:
        async def rpc(self: Any, stream: grpclib.server.Stream[Any, Any]) -> None:
            if cardinality in (Cardinality.UNARY_UNARY, Cardinality.UNARY_STREAM):
                request: Any = await stream.recv_message()
            else:  # client-streaming: record the messages as one list
                request = [msg async for msg in stream]
            metadata = {k: v for k, v in (stream.metadata or {}).items() if isinstance(v, str)}
            response = fake._dispatch(name, request, metadata)
            if inspect.isawaitable(response):
                response = await response
            if cardinality in (Cardinality.UNARY_UNARY, Cardinality.STREAM_UNARY):
                await stream.send_message(response)
            else:
                for msg in response if isinstance(response, Iterable) else [response]:
                    await stream.send_message(msg)

        rpc.__name__ = name
        return rpc

    namespace = {name: make(name, handler.cardinality) for name, handler in _METHODS.items()}
    servicer_cls = type("FakeModalServicer", (api_grpc.ModalClientBase,), namespace)
    servicer: api_grpc.ModalClientBase = servicer_cls()
    return servicer
