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
import threading
import time
from collections.abc import Callable, Iterable
from typing import Any, cast

import grpclib.const
import grpclib.server
from google.protobuf import empty_pb2
from google.protobuf.message import Message
from grpclib.const import Cardinality, Status
from grpclib.exceptions import GRPCError
from modal_proto import api_grpc, api_pb2

__all__ = ["FakeModal", "FakeSandbox", "reset_modal_client"]

_SUCCESS = api_pb2.GenericResult.GENERIC_STATUS_SUCCESS
_TERMINATED = api_pb2.GenericResult.GENERIC_STATUS_TERMINATED
_FAILURE = api_pb2.GenericResult.GENERIC_STATUS_FAILURE


def reset_modal_client() -> None:
    """Forget the modal client cached by ``modal.Client.from_env`` (it points at an old server)."""
    from modal.client import _Client

    _Client._client_from_env = None
    _Client._client_from_env_lock = None


def _fake_jwt(lifetime: float = 3600.0) -> str:
    def b64(data: dict[str, Any]) -> str:
        return base64.urlsafe_b64encode(json.dumps(data).encode()).rstrip(b"=").decode()

    return f"{b64({'alg': 'none', 'typ': 'JWT'})}.{b64({'exp': int(time.time() + lifetime)})}.fake"


@dataclasses.dataclass
class FakeSandbox:
    sandbox_id: str
    app_id: str
    task_id: str
    definition: api_pb2.Sandbox
    tags: dict[str, str]
    created_at: float
    state: str = "running"  # "running" | "finished" | "terminated"
    result: api_pb2.GenericResult | None = None

    @property
    def running(self) -> bool:
        return self.state == "running"


@dataclasses.dataclass
class _Throttle:
    remaining: int
    status: Status
    message: str


class FakeModal:
    """In-process fake of the Modal control plane for the real ``modal`` client."""

    def __init__(self, host: str = "127.0.0.1") -> None:
        self.host = host
        self.port: int | None = None
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
            "MODAL_TOKEN_ID": "ak-fake",
            "MODAL_TOKEN_SECRET": "as-fake",
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

    def finish_sandbox(self, sandbox_id: str, exit_code: int = 0, exception: str = "") -> None:
        """Say a sandbox's process exited: SandboxWait returns its result, poll() its exit code."""
        with self._lock:
            sb = self.sandboxes[sandbox_id]
            sb.state = "finished"
            sb.result = api_pb2.GenericResult(
                status=_SUCCESS if exit_code == 0 and not exception else _FAILURE,
                exitcode=exit_code,
                exception=exception,
            )

    def running_sandboxes(self) -> list[FakeSandbox]:
        with self._lock:
            return [sb for sb in self.sandboxes.values() if sb.running]

    # ------------------------------------------------------------------ dispatch
    def _next_id(self, prefix: str) -> str:
        return f"{prefix}-fake{next(self._ids):06d}"

    def _dispatch(self, method: str, request: Message) -> Any:
        with self._lock:
            self.requests.append((method, request))
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

    # ------------------------------------------------------------------ RPCs
    def _rpc_ClientHello(self, req: empty_pb2.Empty) -> api_pb2.ClientHelloResponse:
        return api_pb2.ClientHelloResponse(image_builder_version=self.image_builder_version)

    def _rpc_AuthTokenGet(self, req: api_pb2.AuthTokenGetRequest) -> api_pb2.AuthTokenGetResponse:
        return api_pb2.AuthTokenGetResponse(token=_fake_jwt())

    def _rpc_AppGetOrCreate(
        self, req: api_pb2.AppGetOrCreateRequest
    ) -> api_pb2.AppGetOrCreateResponse:
        key = (req.environment_name, req.app_name)
        if key not in self.apps:
            if req.object_creation_type != api_pb2.OBJECT_CREATION_TYPE_CREATE_IF_MISSING:
                raise GRPCError(Status.NOT_FOUND, f"App '{req.app_name}' not found")
            self.apps[key] = self._next_id("ap")
        return api_pb2.AppGetOrCreateResponse(app_id=self.apps[key])

    def _rpc_EnvironmentGetOrCreate(
        self, req: api_pb2.EnvironmentGetOrCreateRequest
    ) -> api_pb2.EnvironmentGetOrCreateResponse:
        name = req.deployment_name or "main"
        return api_pb2.EnvironmentGetOrCreateResponse(
            environment_id="en-fake-" + name,
            metadata=api_pb2.EnvironmentMetadata(
                name=name,
                settings=api_pb2.EnvironmentSettings(
                    image_builder_version=self.image_builder_version
                ),
            ),
        )

    def _rpc_ImageGetOrCreate(
        self, req: api_pb2.ImageGetOrCreateRequest
    ) -> api_pb2.ImageGetOrCreateResponse:
        image_id = self._next_id("im")
        self.images[image_id] = req.image
        return api_pb2.ImageGetOrCreateResponse(
            image_id=image_id,
            result=api_pb2.GenericResult(status=_SUCCESS),
            metadata=api_pb2.ImageMetadata(image_builder_version=self.image_builder_version),
        )

    def _rpc_ImageJoinStreaming(
        self, req: api_pb2.ImageJoinStreamingRequest
    ) -> list[api_pb2.ImageJoinStreamingResponse]:
        return [
            api_pb2.ImageJoinStreamingResponse(
                result=api_pb2.GenericResult(status=_SUCCESS),
                metadata=api_pb2.ImageMetadata(image_builder_version=self.image_builder_version),
                eof=True,
            )
        ]

    def _rpc_SandboxCreateV2(
        self, req: api_pb2.SandboxCreateV2Request
    ) -> api_pb2.SandboxCreateV2Response:
        sandbox_id = self._next_id("sb")
        task_id = self._next_id("ta")
        self.sandboxes[sandbox_id] = FakeSandbox(
            sandbox_id=sandbox_id,
            app_id=req.app_id,
            task_id=task_id,
            definition=req.definition,
            tags={t.tag_name: t.tag_value for t in req.tags},
            created_at=time.time(),
        )
        # No tunnels here: the client then asks SandboxGetTunnelsV2, which honours tunnel_target
        # as it is at that moment.
        return api_pb2.SandboxCreateV2Response(sandbox_id=sandbox_id, task_id=task_id)

    _rpc_SandboxCreate = None  # V1: not used by modal 1.6 with sandbox_v2 on (the default)

    def _sandbox(self, sandbox_id: str) -> FakeSandbox:
        sb = self.sandboxes.get(sandbox_id)
        if sb is None:
            raise GRPCError(Status.NOT_FOUND, f"Sandbox {sandbox_id} not found")
        return sb

    def _tunnels(self, sb: FakeSandbox) -> list[api_pb2.TunnelData]:
        tunnels = []
        for port in sb.definition.open_ports.ports:
            host, tport = self.tunnel_targets.get(port.port, self.tunnel_target)
            if port.unencrypted:
                tunnels.append(
                    api_pb2.TunnelData(
                        container_port=port.port,
                        host=host,
                        port=tport,
                        unencrypted_host=host,
                        unencrypted_port=tport,
                    )
                )
            else:
                tunnels.append(api_pb2.TunnelData(container_port=port.port, host=host, port=tport))
        return tunnels

    def _rpc_SandboxGetTunnelsV2(
        self, req: api_pb2.SandboxGetTunnelsRequest
    ) -> api_pb2.SandboxGetTunnelsResponse:
        sb = self._sandbox(req.sandbox_id)
        return api_pb2.SandboxGetTunnelsResponse(
            result=api_pb2.GenericResult(status=_SUCCESS), tunnels=self._tunnels(sb)
        )

    _rpc_SandboxGetTunnels = _rpc_SandboxGetTunnelsV2

    def _rpc_SandboxWaitV2(self, req: api_pb2.SandboxWaitRequest) -> Any:
        # timeout=0 is poll(): answer at once. Otherwise wait (at most `max_wait_block` s) for the
        # sandbox to finish, like the real server's long poll; an empty result makes the client
        # ask again.
        sb = self._sandbox(req.sandbox_id)
        if sb.result is not None or req.timeout <= 0:
            return (
                api_pb2.SandboxWaitResponse(result=sb.result)
                if sb.result
                else api_pb2.SandboxWaitResponse()
            )

        async def long_poll() -> api_pb2.SandboxWaitResponse:
            deadline = time.monotonic() + min(req.timeout, self.max_wait_block)
            while time.monotonic() < deadline:
                await asyncio.sleep(0.02)
                with self._lock:
                    if sb.result is not None:
                        return api_pb2.SandboxWaitResponse(result=sb.result)
            return api_pb2.SandboxWaitResponse()

        return long_poll()

    _rpc_SandboxWait = _rpc_SandboxWaitV2

    def _rpc_SandboxListV2(self, req: api_pb2.SandboxListRequest) -> api_pb2.SandboxListResponse:
        wanted = {t.tag_name: t.tag_value for t in req.tags}
        found = []
        for sb in sorted(self.sandboxes.values(), key=lambda s: s.created_at, reverse=True):
            if req.app_id and sb.app_id != req.app_id:
                continue
            if not req.include_finished and not sb.running:
                continue
            if req.before_timestamp and sb.created_at >= req.before_timestamp:
                continue
            if any(sb.tags.get(k) != v for k, v in wanted.items()):
                continue
            found.append(
                api_pb2.SandboxInfo(
                    id=sb.sandbox_id,
                    app_id=sb.app_id,
                    created_at=sb.created_at,
                    tags=[api_pb2.SandboxTag(tag_name=k, tag_value=v) for k, v in sb.tags.items()],
                    task_info=api_pb2.TaskInfo(id=sb.task_id, result=sb.result),
                )
            )
        return api_pb2.SandboxListResponse(sandboxes=found)

    _rpc_SandboxList = _rpc_SandboxListV2

    def _rpc_SandboxTerminateV2(
        self, req: api_pb2.SandboxTerminateRequest
    ) -> api_pb2.SandboxTerminateResponse:
        sb = self._sandbox(req.sandbox_id)
        if sb.running:
            sb.state = "terminated"
            sb.result = api_pb2.GenericResult(status=_TERMINATED)
        return api_pb2.SandboxTerminateResponse(existing_result=sb.result)

    _rpc_SandboxTerminate = _rpc_SandboxTerminateV2

    def _rpc_SandboxTagsSetV2(self, req: api_pb2.SandboxTagsSetRequest) -> empty_pb2.Empty:
        sb = self._sandbox(req.sandbox_id)
        sb.tags = {t.tag_name: t.tag_value for t in req.tags}
        return empty_pb2.Empty()

    _rpc_SandboxTagsSet = _rpc_SandboxTagsSetV2

    def _rpc_SandboxTagsGetV2(
        self, req: api_pb2.SandboxTagsGetRequest
    ) -> api_pb2.SandboxTagsGetResponse:
        sb = self._sandbox(req.sandbox_id)
        return api_pb2.SandboxTagsGetResponse(
            tags=[api_pb2.SandboxTag(tag_name=k, tag_value=v) for k, v in sb.tags.items()]
        )

    _rpc_SandboxTagsGet = _rpc_SandboxTagsGetV2

    def _rpc_SandboxGetTaskIdV2(
        self, req: api_pb2.SandboxGetTaskIdRequest
    ) -> api_pb2.SandboxGetTaskIdResponse:
        sb = self._sandbox(req.sandbox_id)
        if sb.result is not None:
            return api_pb2.SandboxGetTaskIdResponse(task_id=sb.task_id, task_result=sb.result)
        return api_pb2.SandboxGetTaskIdResponse(task_id=sb.task_id)

    _rpc_SandboxGetTaskId = _rpc_SandboxGetTaskIdV2

    def _rpc_AppClientDisconnect(self, req: api_pb2.AppClientDisconnectRequest) -> empty_pb2.Empty:
        return empty_pb2.Empty()

    def _rpc_AppHeartbeat(self, req: api_pb2.AppHeartbeatRequest) -> empty_pb2.Empty:
        return empty_pb2.Empty()


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
            response = fake._dispatch(name, request)
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
