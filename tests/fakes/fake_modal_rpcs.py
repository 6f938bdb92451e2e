"""The Modal RPCs FakeModal answers: apps, images and sandboxes (see :mod:`.fake_modal`).

A mixin of ``_rpc_<Method>`` handlers over FakeModal's state. A handler returns the response
(a list for server-streaming RPCs) or a coroutine the server's loop awaits; it runs with the
fake's lock held, so anything slow (starting or stopping a container) goes in the coroutine.
"""

from __future__ import annotations

import asyncio
import dataclasses
import threading
import time
from collections.abc import Callable
from typing import Any

from google.protobuf import empty_pb2
from grpclib.const import Status
from grpclib.exceptions import GRPCError
from modal_proto import api_pb2

from tests.fakes.fake_modal_runtime import SandboxRuntime

_SUCCESS = api_pb2.GenericResult.GENERIC_STATUS_SUCCESS
_TERMINATED = api_pb2.GenericResult.GENERIC_STATUS_TERMINATED
_FAILURE = api_pb2.GenericResult.GENERIC_STATUS_FAILURE


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


def _secret_env(request: api_pb2.SandboxCreateV2Request) -> dict[str, str]:
    """The variables a sandbox's secrets (and `env=`, which the client sends as one) give it."""
    env = dict(request.definition.environment_variables.contents)
    for source in request.secret_sources:
        env.update(source.env.contents)
    return env


class ModalRpcs:
    """The RPC handlers; FakeModal provides the state below."""

    apps: dict[tuple[str, str], str]
    images: dict[str, api_pb2.Image]
    sandboxes: dict[str, FakeSandbox]
    image_builder_version: str
    max_wait_block: float
    tunnel_target: tuple[str, int]
    tunnel_targets: dict[int, tuple[str, int]]
    runtime: SandboxRuntime | None
    _lock: threading.RLock
    _next_id: Callable[[str], str]

    def finish_sandbox(self, sandbox_id: str, exit_code: int = 0, exception: str = "") -> None:
        """Say a sandbox's process exited: SandboxWait returns its result, poll() its exit code."""
        with self._lock:
            sb = self.sandboxes[sandbox_id]
            if not sb.running:
                return
            sb.state = "finished"
            sb.result = api_pb2.GenericResult(
                status=_SUCCESS if exit_code == 0 and not exception else _FAILURE,
                exitcode=exit_code,
                exception=exception,
            )

    # ------------------------------------------------------------------ client and apps
    def _rpc_ClientHello(self, req: empty_pb2.Empty) -> api_pb2.ClientHelloResponse:
        return api_pb2.ClientHelloResponse(image_builder_version=self.image_builder_version)

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

    def _rpc_AppClientDisconnect(self, req: api_pb2.AppClientDisconnectRequest) -> empty_pb2.Empty:
        return empty_pb2.Empty()

    def _rpc_AppHeartbeat(self, req: api_pb2.AppHeartbeatRequest) -> empty_pb2.Empty:
        return empty_pb2.Empty()

    # ------------------------------------------------------------------ images
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

    # ------------------------------------------------------------------ sandboxes
    def _rpc_SandboxCreateV2(self, req: api_pb2.SandboxCreateV2Request) -> Any:
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
        # No tunnels here: the client then asks SandboxGetTunnelsV2.
        response = api_pb2.SandboxCreateV2Response(sandbox_id=sandbox_id, task_id=task_id)
        runtime = self.runtime
        if runtime is None:
            return response

        async def start() -> api_pb2.SandboxCreateV2Response:
            await runtime.start(sandbox_id, req.definition, _secret_env(req), self.finish_sandbox)
            return response

        return start()

    _rpc_SandboxCreate = None  # V1: not used by modal 1.6 with sandbox_v2 on (the default)

    def _sandbox(self, sandbox_id: str) -> FakeSandbox:
        sb = self.sandboxes.get(sandbox_id)
        if sb is None:
            raise GRPCError(Status.NOT_FOUND, f"Sandbox {sandbox_id} not found")
        return sb

    def _tunnels(self, sb: FakeSandbox) -> list[api_pb2.TunnelData]:
        container = self.runtime.containers.get(sb.sandbox_id) if self.runtime else None
        tunnels = []
        for port in sb.definition.open_ports.ports:
            if container is not None:
                host, tport = container.tunnels[port.port]
            else:
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

    def _rpc_SandboxTerminateV2(self, req: api_pb2.SandboxTerminateRequest) -> Any:
        sb = self._sandbox(req.sandbox_id)
        if sb.running:
            sb.state = "terminated"
            sb.result = api_pb2.GenericResult(status=_TERMINATED)
        response = api_pb2.SandboxTerminateResponse(existing_result=sb.result)
        runtime = self.runtime
        if runtime is None:
            return response

        async def stop() -> api_pb2.SandboxTerminateResponse:
            await runtime.stop(sb.sandbox_id)
            return response

        return stop()

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
