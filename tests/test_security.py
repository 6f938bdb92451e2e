"""Bearer-token interceptor, TLS and mTLS against a real grpc.aio server on 127.0.0.1."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection, reflection_pb2, reflection_pb2_grpc

from rlm_wire.auth import (
    INVALID_TOKEN,
    BearerTokenInterceptor,
    bearer_metadata,
    channel_credentials,
    server_credentials,
)
from rlm_wire.decoding import InvalidMessageInterceptor
from rlm_wire.v1 import sandbox_pb2, sandbox_pb2_grpc
from tests.fakes.certs import TestPKI, make_test_pki

TOKEN = "test-token-not-a-secret"
TIMEOUT = 10.0
SANDBOX = sandbox_pb2.DESCRIPTOR.services_by_name["Sandbox"].full_name
ECHO = "rlm.test.Echo"  # a raw-bytes service with one method of each RPC kind

needs_openssl = pytest.mark.skipif(shutil.which("openssl") is None, reason="needs openssl")


class TinySandbox(sandbox_pb2_grpc.SandboxServicer):  # type: ignore[misc]
    calls: list[str] = []  # methods that reached the servicer, reset by serve()

    async def GetInfo(self, request: Any, context: Any) -> sandbox_pb2.GetInfoResponse:
        self.calls.append("GetInfo")
        return sandbox_pb2.GetInfoResponse(agent_version="tiny")

    async def Execute(
        self, request_iterator: Any, context: Any
    ) -> AsyncIterator[sandbox_pb2.ExecuteResponse]:
        self.calls.append("Execute")
        await context.read()  # the ExecuteStart
        result = sandbox_pb2.ExecuteResult(status=sandbox_pb2.EXECUTION_STATUS_OK)
        yield sandbox_pb2.ExecuteResponse(result=result)

    async def LoadValue(self, request_iterator: Any, context: Any) -> Any:
        self.calls.append("LoadValue")
        size = 0
        async for request in request_iterator:
            size += len(request.data)
        return sandbox_pb2.LoadValueResponse(type_name="str", length=size)

    async def GetVariable(self, request: Any, context: Any) -> sandbox_pb2.GetVariableResponse:
        self.calls.append("GetVariable")
        return sandbox_pb2.GetVariableResponse(found=False)


async def _unary_unary(request: bytes, context: Any) -> bytes:
    return request


async def _unary_stream(request: bytes, context: Any) -> None:
    await context.write(request)


async def _stream_unary(request_iterator: Any, context: Any) -> bytes:
    return b"".join([chunk async for chunk in request_iterator])


async def _stream_stream(request_iterator: Any, context: Any) -> None:
    async for chunk in request_iterator:
        await context.write(chunk)


ECHO_HANDLER = grpc.method_handlers_generic_handler(
    ECHO,
    {
        "UnaryUnary": grpc.unary_unary_rpc_method_handler(_unary_unary),
        "UnaryStream": grpc.unary_stream_rpc_method_handler(_unary_stream),
        "StreamUnary": grpc.stream_unary_rpc_method_handler(_stream_unary),
        "StreamStream": grpc.stream_stream_rpc_method_handler(_stream_stream),
    },
)


@asynccontextmanager
async def serve(
    credentials: Any = None, interceptor: BearerTokenInterceptor | None = None
) -> AsyncIterator[str]:
    """Starts a server with health, reflection, Sandbox and Echo; yields its address."""
    interceptor = interceptor or BearerTokenInterceptor(TOKEN)
    TinySandbox.calls.clear()
    server = grpc.aio.server(interceptors=[interceptor, InvalidMessageInterceptor()])
    health_pb2_grpc.add_HealthServicer_to_server(health.aio.HealthServicer(), server)
    sandbox_pb2_grpc.add_SandboxServicer_to_server(TinySandbox(), server)
    server.add_generic_rpc_handlers([ECHO_HANDLER])
    reflection.enable_server_reflection((SANDBOX, health.SERVICE_NAME), server)
    if credentials is None:
        port = server.add_insecure_port("127.0.0.1:0")
    else:
        port = server.add_secure_port("127.0.0.1:0", credentials)
    assert port
    await server.start()
    try:
        yield f"127.0.0.1:{port}"
    finally:
        await server.stop(None)


@asynccontextmanager
async def channel(address: str, credentials: Any = None) -> AsyncIterator[grpc.aio.Channel]:
    if credentials is None:
        async with grpc.aio.insecure_channel(address) as plain:
            yield plain
    else:
        async with grpc.aio.secure_channel(address, credentials) as secure:
            yield secure


async def get_info(chan: grpc.aio.Channel, metadata: Any = None) -> str:
    stub = sandbox_pb2_grpc.SandboxStub(chan)
    reply = await stub.GetInfo(sandbox_pb2.GetInfoRequest(), metadata=metadata, timeout=TIMEOUT)
    return str(reply.agent_version)


async def execute(chan: grpc.aio.Channel, metadata: Any = None) -> list[Any]:
    stub = sandbox_pb2_grpc.SandboxStub(chan)
    start = sandbox_pb2.ExecuteRequest(start=sandbox_pb2.ExecuteStart(code="x = 1"))
    call = stub.Execute(iter([start]), metadata=metadata, timeout=TIMEOUT)
    return [response async for response in call]


async def load_value(chan: grpc.aio.Channel, metadata: Any = None) -> int:
    stub = sandbox_pb2_grpc.SandboxStub(chan)
    chunks = [sandbox_pb2.LoadValueRequest(data=b"abc"), sandbox_pb2.LoadValueRequest(data=b"de")]
    reply = await stub.LoadValue(iter(chunks), metadata=metadata, timeout=TIMEOUT)
    return int(reply.length)


async def check_health(chan: grpc.aio.Channel) -> Any:
    stub = health_pb2_grpc.HealthStub(chan)
    reply = await stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=TIMEOUT)
    return reply.status


async def refused(call: Awaitable[object]) -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await call
    error: grpc.aio.AioRpcError = caught.value
    return error


# --- Echo: one call of each kind, all sending b"ping" --------------------------------------


async def echo_unary_unary(chan: grpc.aio.Channel, metadata: Any) -> list[bytes]:
    call = chan.unary_unary(f"/{ECHO}/UnaryUnary")
    return [await call(b"ping", metadata=metadata, timeout=TIMEOUT)]


async def echo_unary_stream(chan: grpc.aio.Channel, metadata: Any) -> list[bytes]:
    call = chan.unary_stream(f"/{ECHO}/UnaryStream")
    return [reply async for reply in call(b"ping", metadata=metadata, timeout=TIMEOUT)]


async def echo_stream_unary(chan: grpc.aio.Channel, metadata: Any) -> list[bytes]:
    call = chan.stream_unary(f"/{ECHO}/StreamUnary")
    return [await call(iter([b"pi", b"ng"]), metadata=metadata, timeout=TIMEOUT)]


async def echo_stream_stream(chan: grpc.aio.Channel, metadata: Any) -> list[bytes]:
    call = chan.stream_stream(f"/{ECHO}/StreamStream")
    return [reply async for reply in call(iter([b"ping"]), metadata=metadata, timeout=TIMEOUT)]


EchoCall = Callable[[grpc.aio.Channel, Any], Awaitable[list[bytes]]]
ECHO_CALLS = [echo_unary_unary, echo_unary_stream, echo_stream_unary, echo_stream_stream]


# --- the bearer token -----------------------------------------------------------------------


async def test_sandbox_calls_need_the_token() -> None:
    async with serve() as address, channel(address) as chan:
        for call in (get_info, execute, load_value):
            error = await refused(call(chan))
            assert error.code() == grpc.StatusCode.UNAUTHENTICATED, call.__name__
            assert "missing bearer token" in (error.details() or "")
            error = await refused(call(chan, bearer_metadata("wrong")))
            assert error.code() == grpc.StatusCode.UNAUTHENTICATED, call.__name__
            assert error.details() == "invalid bearer token"
        assert TinySandbox.calls == []  # refused before the servicer

        assert await get_info(chan, bearer_metadata(TOKEN)) == "tiny"
        [response] = await execute(chan, bearer_metadata(TOKEN))
        assert response.result.status == sandbox_pb2.EXECUTION_STATUS_OK
        assert await load_value(chan, bearer_metadata(TOKEN)) == 5
        assert TinySandbox.calls == ["GetInfo", "Execute", "LoadValue"]


@pytest.mark.parametrize("echo", ECHO_CALLS, ids=lambda f: f.__name__.removeprefix("echo_"))
async def test_every_rpc_kind_is_guarded(echo: EchoCall) -> None:
    async with serve() as address, channel(address) as chan:
        for metadata, problem in (
            (None, "missing bearer token"),
            ((("authorization", f"Basic {TOKEN}"),), "missing bearer token"),
            (bearer_metadata(TOKEN + "x"), "invalid bearer token"),
            (bearer_metadata(TOKEN) + bearer_metadata("other"), "invalid bearer token"),
        ):
            error = await refused(echo(chan, metadata))
            assert error.code() == grpc.StatusCode.UNAUTHENTICATED
            assert problem in (error.details() or "")
        assert await echo(chan, bearer_metadata(TOKEN)) == [b"ping"]
        # The scheme is case-insensitive (RFC 7235).
        assert await echo(chan, (("authorization", f"bearer {TOKEN}"),)) == [b"ping"]


async def test_streams_are_refused_before_the_client_sends_anything() -> None:
    """A refusal must not wait for a request message the client has not sent."""
    async with serve() as address, channel(address) as chan:
        bidi = chan.stream_stream(f"/{ECHO}/StreamStream")(timeout=TIMEOUT)
        error = await refused(bidi.read())
        assert error.code() == grpc.StatusCode.UNAUTHENTICATED
        upload = chan.stream_unary(f"/{ECHO}/StreamUnary")(timeout=TIMEOUT)
        error = await refused(upload)
        assert error.code() == grpc.StatusCode.UNAUTHENTICATED
        execute = sandbox_pb2_grpc.SandboxStub(chan).Execute(timeout=TIMEOUT)
        error = await refused(execute.read())
        assert error.code() == grpc.StatusCode.UNAUTHENTICATED


async def test_unknown_methods_do_not_reveal_themselves_without_the_token() -> None:
    async with serve() as address, channel(address) as chan:
        error = await refused(chan.unary_unary("/nope.Nothing/Call")(b"", timeout=TIMEOUT))
        assert error.code() == grpc.StatusCode.UNAUTHENTICATED
        call = chan.unary_unary("/nope.Nothing/Call")
        error = await refused(call(b"", metadata=bearer_metadata(TOKEN), timeout=TIMEOUT))
        assert error.code() == grpc.StatusCode.UNIMPLEMENTED


async def test_health_and_reflection_need_no_token() -> None:
    async with serve() as address, channel(address) as chan:
        assert await check_health(chan) == health_pb2.HealthCheckResponse.SERVING
        stub = reflection_pb2_grpc.ServerReflectionStub(chan)
        request = reflection_pb2.ServerReflectionRequest(list_services="")
        [reply] = [r async for r in stub.ServerReflectionInfo(iter([request]), timeout=TIMEOUT)]
        names = {service.name for service in reply.list_services_response.service}
        assert {SANDBOX, health.SERVICE_NAME} <= names


async def test_exempt_services_are_configurable() -> None:
    interceptor = BearerTokenInterceptor(TOKEN, exempt_services=[SANDBOX])
    async with serve(interceptor=interceptor) as address, channel(address) as chan:
        assert await get_info(chan) == "tiny"
        error = await refused(check_health(chan))
        assert error.code() == grpc.StatusCode.UNAUTHENTICATED


def test_empty_token_is_rejected_and_never_shown() -> None:
    with pytest.raises(ValueError):
        BearerTokenInterceptor("")
    assert TOKEN not in repr(BearerTokenInterceptor(TOKEN))


async def test_refusals_do_not_log_the_token(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level("DEBUG")
    async with serve() as address, channel(address) as chan:
        await refused(get_info(chan, bearer_metadata(TOKEN[:-1])))
        assert await get_info(chan, bearer_metadata(TOKEN)) == "tiny"
    assert "refused /rlm.v1.Sandbox/GetInfo" in caplog.text
    assert TOKEN[:-1] not in caplog.text


async def test_undecodable_messages_get_invalid_argument_on_every_path() -> None:
    """The unary argument, a request iterator (LoadValue), and `context.read()` (Execute)."""
    garbage = b"\xff\xfe\x00not a message"
    async with serve() as address, channel(address) as chan:
        token = bearer_metadata(TOKEN)
        calls = {
            "GetInfo": lambda: chan.unary_unary(f"/{SANDBOX}/GetInfo")(
                garbage, metadata=token, timeout=TIMEOUT
            ),
            "LoadValue": lambda: chan.stream_unary(f"/{SANDBOX}/LoadValue")(
                iter([garbage]), metadata=token, timeout=TIMEOUT
            ),
            "Execute": lambda: chan.stream_stream(f"/{SANDBOX}/Execute")(
                iter([garbage]), metadata=token, timeout=TIMEOUT
            ).read(),
        }
        for name, call in calls.items():
            error = await refused(call())
            assert error.code() == grpc.StatusCode.INVALID_ARGUMENT, name
            assert "does not decode" in (error.details() or ""), name
        assert TinySandbox.calls == ["LoadValue", "Execute"]  # the servicer never saw a message
        assert await get_info(chan, bearer_metadata(TOKEN)) == "tiny"


# --- TLS and mTLS ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> TestPKI:
    if shutil.which("openssl") is None:
        pytest.skip("needs the openssl command-line tool")
    return make_test_pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture(scope="module")
def other_pki(tmp_path_factory: pytest.TempPathFactory) -> TestPKI:
    if shutil.which("openssl") is None:
        pytest.skip("needs the openssl command-line tool")
    return make_test_pki(tmp_path_factory.mktemp("other-pki"))


def test_make_test_pki_writes_pem_files(pki: TestPKI) -> None:
    for path in (pki.ca_cert, pki.server_cert, pki.client_cert):
        assert path.read_text().startswith("-----BEGIN CERTIFICATE-----")
    for path in (pki.server_key, pki.client_key):
        assert "PRIVATE KEY-----" in path.read_text()
    assert sorted(p.name for p in Path(pki.ca_cert).parent.iterdir() if p.suffix == ".pem") == [
        "ca.pem",
        "client.pem",
        "server.pem",
    ]


async def test_tls_with_token_works_and_plaintext_is_refused(pki: TestPKI) -> None:
    credentials = server_credentials(pki.server_cert, pki.server_key, None)
    async with serve(credentials) as address:
        async with channel(address, channel_credentials(pki.ca_cert)) as chan:
            assert await check_health(chan) == health_pb2.HealthCheckResponse.SERVING
            assert await get_info(chan, bearer_metadata(TOKEN)) == "tiny"
            assert (await refused(get_info(chan))).code() == grpc.StatusCode.UNAUTHENTICATED
        # gRPC's own call credentials send the same header.
        with_token = grpc.composite_channel_credentials(
            channel_credentials(pki.ca_cert), grpc.access_token_call_credentials(TOKEN)
        )
        async with channel(address, with_token) as chan:
            [response] = await execute(chan)
            assert response.result.status == sandbox_pb2.EXECUTION_STATUS_OK
        async with channel(address) as plain:
            error = await refused(get_info(plain, bearer_metadata(TOKEN)))
            assert error.code() == grpc.StatusCode.UNAVAILABLE


async def test_tls_client_refuses_a_server_from_an_untrusted_ca(
    pki: TestPKI, other_pki: TestPKI
) -> None:
    credentials = server_credentials(pki.server_cert, pki.server_key)
    untrusting = channel_credentials(other_pki.ca_cert)
    async with serve(credentials) as address, channel(address, untrusting) as chan:
        error = await refused(get_info(chan, bearer_metadata(TOKEN)))
        assert error.code() == grpc.StatusCode.UNAVAILABLE


async def test_mtls_requires_a_client_certificate_from_the_ca(
    pki: TestPKI, other_pki: TestPKI
) -> None:
    credentials = server_credentials(pki.server_cert, pki.server_key, pki.ca_cert)
    async with serve(credentials) as address:
        async with channel(address, channel_credentials(pki.ca_cert)) as chan:
            error = await refused(get_info(chan, bearer_metadata(TOKEN)))
            assert error.code() == grpc.StatusCode.UNAVAILABLE
        foreign = channel_credentials(pki.ca_cert, other_pki.client_cert, other_pki.client_key)
        async with channel(address, foreign) as chan:
            error = await refused(get_info(chan, bearer_metadata(TOKEN)))
            assert error.code() == grpc.StatusCode.UNAVAILABLE
        mine = channel_credentials(pki.ca_cert, pki.client_cert, pki.client_key)
        async with channel(address, mine) as chan:
            assert await check_health(chan) == health_pb2.HealthCheckResponse.SERVING
            assert await get_info(chan, bearer_metadata(TOKEN)) == "tiny"
            [response] = await execute(chan, bearer_metadata(TOKEN))
            assert response.result.status == sandbox_pb2.EXECUTION_STATUS_OK


def test_channel_credentials_need_both_cert_and_key(pki: TestPKI) -> None:
    with pytest.raises(ValueError):
        channel_credentials(pki.ca_cert, cert_file=pki.client_cert)


async def test_the_agents_health_only_listener_serves_health_and_nothing_else(
    pki: TestPKI, tmp_path: Path
) -> None:
    """What the kubelet's plaintext `grpc:` probe dials, beside the TLS-only Sandbox port."""
    import os
    import socket
    import subprocess
    import sys

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        health_port = probe.getsockname()[1]
    command = [
        sys.executable,
        "-m",
        "sandbox_agent",
        "--listen",
        "127.0.0.1:0",
        "--health-listen",
        f"127.0.0.1:{health_port}",
        "--workdir",
        str(tmp_path / "work"),
        "--state-dir",
        str(tmp_path / "state"),
        "--tls-cert",
        str(pki.server_cert),
        "--tls-key",
        str(pki.server_key),
    ]
    env = {**os.environ, "RLM_AGENT_TOKEN": TOKEN}
    agent = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, text=True)  # noqa: ASYNC220
    try:
        assert agent.stdout is not None
        port = agent.stdout.readline().split()[-1]
        health_address = f"127.0.0.1:{health_port}"
        async with channel(health_address) as plain:
            assert await check_health(plain) == health_pb2.HealthCheckResponse.SERVING
            error = await refused(get_info(plain, bearer_metadata(TOKEN)))
            assert error.code() == grpc.StatusCode.UNIMPLEMENTED  # no Sandbox service there
        async with channel(f"127.0.0.1:{port}") as plain:  # the real port stays TLS-only
            assert (await refused(get_info(plain))).code() == grpc.StatusCode.UNAVAILABLE
        agent.terminate()
        assert agent.wait(10) == 0
    finally:
        if agent.poll() is None:
            agent.kill()
            agent.wait()
        if agent.stdout:
            agent.stdout.close()


# -- serve refuses to listen beyond loopback with no authentication ------------------------


@pytest.mark.parametrize(
    ("listen", "loopback"),
    [
        ("0.0.0.0:50051", False),
        ("[::]:50051", False),
        ("10.1.2.3:50051", False),
        ("orchestrator.example:50051", False),  # a name may resolve to anything
        ("127.0.0.1:0", True),
        ("[::1]:0", True),
        ("localhost:0", True),
        ("unix:/run/rlm/server.sock", True),
    ],
)
def test_serve_refuses_to_listen_beyond_loopback_without_authentication(
    listen: str, loopback: bool, tmp_path: Path
) -> None:
    from rlm_orchestrator.exceptions import ConfigurationError
    from rlm_orchestrator.service.server import check_authentication
    from rlm_orchestrator.service.settings import ServerSettings, TLSSettings

    anonymous = ServerSettings(listen=listen)
    if loopback:
        check_authentication(anonymous)
    else:
        with pytest.raises(ConfigurationError, match="allow_unauthenticated = true"):
            check_authentication(anonymous)
    # A token, client certificates, or the explicit opt-in: accepted anywhere.
    mtls = TLSSettings(cert_file=tmp_path / "c", key_file=tmp_path / "k", client_ca_file=tmp_path)
    for settings in (
        ServerSettings(listen=listen, auth_token="a-token"),
        ServerSettings(listen=listen, tls=mtls),
        ServerSettings(listen=listen, allow_unauthenticated=True),
    ):
        check_authentication(settings)


def test_serve_exits_with_the_reason_when_it_would_authenticate_nobody(tmp_path: Path) -> None:
    config = tmp_path / "server.toml"
    config.write_text('listen = "0.0.0.0:0"\n[[models]]\nname = "m"\napi_key = "unused"\n')
    command = [sys.executable, "-m", "rlm_orchestrator.cli", "serve", "--config", str(config)]
    env = {k: v for k, v in os.environ.items() if k != "RLM_SERVER_AUTH_TOKEN"}
    finished = subprocess.run(command, capture_output=True, text=True, timeout=60, env=env)
    assert finished.returncode == 2
    message = " ".join(finished.stderr.split())
    assert "with no authentication" in message and "allow_unauthenticated = true" in message


def test_tenants_need_tokens_of_their_own(monkeypatch: pytest.MonkeyPatch) -> None:
    from pydantic import ValidationError

    from rlm_orchestrator.exceptions import ConfigurationError
    from rlm_orchestrator.service.settings import ServerSettings, TenantSettings
    from rlm_orchestrator.service.tenants import ANONYMOUS, Tenants

    monkeypatch.delenv("RLM_TOKEN_OF_A", raising=False)
    with pytest.raises(ConfigurationError, match="'a': environment variable RLM_TOKEN_OF_A"):
        Tenants(ServerSettings(tenants=[TenantSettings(name="a", token_env="RLM_TOKEN_OF_A")]))
    with pytest.raises(ValidationError, match="tenant names must be unique"):
        ServerSettings(auth_token="t", tenants=[TenantSettings(name="default", token="u")])
    with pytest.raises(ValueError, match="the same token"):
        Tenants(ServerSettings(auth_token="same", tenants=[TenantSettings(name="a", token="same")]))
    monkeypatch.setenv("RLM_TOKEN_OF_A", "token-a")
    tenants = Tenants(
        ServerSettings(
            auth_token="token-d", tenants=[TenantSettings(name="a", token_env="RLM_TOKEN_OF_A")]
        )
    )
    assert sorted(tenants.tokens()) == ["token-a", "token-d"]
    assert tenants.identify([("authorization", "Bearer token-a")]).name == "a"
    assert tenants.identify([("authorization", "bearer token-d")]).name == "default"
    assert Tenants(ServerSettings()).identify([]) is ANONYMOUS


async def test_the_token_interceptor_accepts_any_tenants_token() -> None:
    interceptor = BearerTokenInterceptor(["token-a", "token-b"])
    assert interceptor._check([("authorization", "Bearer token-b")]) is None
    assert interceptor._check([("authorization", "Bearer token-c")]) == INVALID_TOKEN
    with pytest.raises(ValueError):
        BearerTokenInterceptor(["token-a", ""])
