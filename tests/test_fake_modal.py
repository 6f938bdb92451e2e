"""The real ``modal`` client against FakeModal: the Sandbox flow of the Modal provider, offline."""

from __future__ import annotations

import asyncio
import json
import threading
from pathlib import Path

import modal
import pytest
from modal_proto import api_pb2

from tests.fakes.fake_modal import FakeModal, SandboxRuntime

pytestmark = pytest.mark.timeout(30)

STEP = 10  # seconds: any single client call slower than this means a wrong setup


@pytest.fixture
def fake_modal(fake_modal: FakeModal) -> FakeModal:
    """The shared fake (tests/modal_support.py), with a tunnel answer of its own."""
    fake_modal.tunnel_target = ("127.0.0.1", 4242)
    return fake_modal


@pytest.fixture
def runtime(fake_modal: FakeModal, tmp_path: Path) -> SandboxRuntime:
    """Sandboxes that run: their entrypoints as processes (no TLS: unencrypted tunnels only)."""
    fake_modal.runtime = SandboxRuntime(tmp_path / "sandboxes", stop_grace_seconds=2)
    return fake_modal.runtime


# Listens where argv[1] says, echoes one line to one caller, and notes its argv in argv[2].
ECHO_ONCE = """
import json, socket, sys
host, port = sys.argv[1].rsplit(":", 1)
with open(sys.argv[2], "w") as notes:
    json.dump(sys.argv[1:], notes)
with socket.create_server((host, int(port))) as server:
    conn, _ = server.accept()
    with conn:
        conn.sendall(conn.makefile("rb").readline())
"""


async def step(coro):
    return await asyncio.wait_for(coro, STEP)


async def _app(name: str = "rlm-test"):
    return await step(modal.App.lookup.aio(name, create_if_missing=True))


async def _list(app, tags: dict[str, str] | None = None) -> list[str]:
    return [s.object_id async for s in modal.Sandbox.list.aio(app_id=app.app_id, tags=tags)]


async def test_env_points_the_client_at_the_fake(fake_modal: FakeModal) -> None:
    env = fake_modal.env()
    assert env["MODAL_SERVER_URL"] == f"http://127.0.0.1:{fake_modal.port}"
    assert (env["MODAL_TOKEN_ID"], env["MODAL_TOKEN_SECRET"]) == (
        fake_modal.token_id,
        fake_modal.token_secret,
    )
    assert fake_modal.token_id.startswith("ak-") and fake_modal.token_secret.startswith("as-")
    assert FakeModal().token_secret != fake_modal.token_secret  # one of its own per fake
    assert modal.config.config["server_url"] == fake_modal.url
    client = await step(modal.Client.from_env.aio())
    await step(client.hello.aio())
    assert fake_modal.calls() == ["ClientHello"]


@pytest.mark.parametrize(
    ("wrong", "refusal"),
    [("id", "Invalid token"), ("secret", "Invalid token"), ("id's shape", "Token ID is malformed")],
)
async def test_wrong_credentials_are_refused_as_modal_refuses_them(
    fake_modal: FakeModal, wrong: str, refusal: str
) -> None:
    token_id, token_secret = fake_modal.token_id, fake_modal.token_secret
    if wrong == "id":
        token_id = "ak-" + "0" * 22
    elif wrong == "secret":
        token_secret += "0"
    else:
        token_id = "not-a-token-id"
    client = await step(modal.Client.from_credentials.aio(token_id, token_secret))
    try:
        with pytest.raises(modal.exception.AuthError, match=refusal):
            await step(client.hello.aio())
        with pytest.raises(modal.exception.AuthError, match=refusal):
            await step(modal.App.lookup.aio("rlm-test", client=client, create_if_missing=True))
    finally:
        await step(client.close.aio())
    assert fake_modal.refused == ["ClientHello", "AppGetOrCreate"]
    assert fake_modal.apps == {}


async def test_sandbox_lifecycle(fake_modal: FakeModal) -> None:
    app = await _app()
    assert app.app_id.startswith("ap-")
    sb = await step(
        modal.Sandbox.create.aio(
            "python3",
            "-m",
            "sandbox_agent",
            app=app,
            image=modal.Image.from_registry("python:3.11-slim").pip_install("grpcio"),
            h2_ports=[50051],
            timeout=600,
            idle_timeout=120,
            outbound_cidr_allowlist=["10.1.2.3/32"],
            tags={"rlm-session": "s1", "owner": "pytest"},
            cpu=1.5,
            memory=1024,
            readiness_probe=modal.Probe.with_tcp(50051),
            env={"RLM_AGENT_TOKEN": "tok"},
        )
    )
    tunnels = await step(sb.tunnels.aio())
    assert set(tunnels) == {50051}
    assert (tunnels[50051].host, tunnels[50051].port) == ("127.0.0.1", 4242)
    assert await step(sb.poll.aio()) is None

    found = await _list(app, {"rlm-session": "s1"})
    assert found == [sb.object_id]
    other = await _list(app, {"rlm-session": "s2"})
    assert other == []

    await step(sb.terminate.aio())
    assert fake_modal.sandboxes[sb.object_id].state == "terminated"
    assert await step(sb.poll.aio()) is not None
    assert await _list(app) == []

    calls = fake_modal.calls()
    assert calls[:2] == ["AppGetOrCreate", "EnvironmentGetOrCreate"]
    for name in ("ImageGetOrCreate", "AuthTokenGet", "SandboxCreateV2", "SandboxGetTunnelsV2"):
        assert name in calls, calls
    for name in ("SandboxWaitV2", "SandboxListV2", "SandboxTerminateV2"):
        assert name in calls, calls
    order = [
        calls.index(n) for n in ("SandboxCreateV2", "SandboxGetTunnelsV2", "SandboxTerminateV2")
    ]
    assert order == sorted(order)
    assert fake_modal.unimplemented == []

    (create,) = fake_modal.requests_for("SandboxCreateV2")
    d = create.definition
    assert create.app_id == app.app_id
    assert list(d.entrypoint_args) == ["python3", "-m", "sandbox_agent"]
    ports = [(p.port, p.tunnel_type) for p in d.open_ports.ports]
    assert ports == [(50051, api_pb2.TUNNEL_TYPE_H2)]
    assert d.network_access.network_access_type == api_pb2.NetworkAccess.ALLOWLIST
    assert list(d.network_access.allowed_cidrs) == ["10.1.2.3/32"]
    assert not d.block_network
    assert d.timeout_secs == 600
    assert d.idle_timeout_secs == 120
    tags = {t.tag_name: t.tag_value for t in create.tags}
    assert tags == {"rlm-session": "s1", "owner": "pytest"}
    assert d.readiness_probe.tcp_port == 50051
    assert d.resources.milli_cpu == 1500 and d.resources.memory_mb == 1024
    env = {k: v for src in create.secret_sources for k, v in src.env.contents.items()}
    assert env == {"RLM_AGENT_TOKEN": "tok"}
    # The image: the registry base, then a layer built FROM it with the pip install.
    images = [r.image for r in fake_modal.requests_for("ImageGetOrCreate")]
    assert any("FROM python:3.11-slim" in cmd for img in images for cmd in img.dockerfile_commands)
    assert d.image_id in fake_modal.images
    assert "RUN python -m pip install grpcio" in fake_modal.images[d.image_id].dockerfile_commands


async def test_block_network(fake_modal: FakeModal) -> None:
    app = await _app()
    # Modal refuses open ports with block_network: a sandbox that must stay reachable uses an
    # (empty) outbound allowlist instead.
    with pytest.raises(modal.exception.InvalidError, match="block_network"):
        await step(
            modal.Sandbox.create.aio("sleep", "1", app=app, block_network=True, h2_ports=[50051])
        )
    sb = await step(modal.Sandbox.create.aio("sleep", "100", app=app, block_network=True))
    (create,) = fake_modal.requests_for("SandboxCreateV2")
    # V2 carries it in network_access only (the legacy block_network field stays false).
    assert create.definition.network_access.network_access_type == api_pb2.NetworkAccess.BLOCKED
    assert list(create.definition.open_ports.ports) == []
    await step(sb.terminate.aio())


async def test_empty_allowlist_and_set_tags(fake_modal: FakeModal) -> None:
    app = await _app()
    sb = await step(
        modal.Sandbox.create.aio(
            "sleep", "100", app=app, outbound_cidr_allowlist=[], encrypted_ports=[8443]
        )
    )
    (create,) = fake_modal.requests_for("SandboxCreateV2")
    assert not create.definition.block_network
    assert create.definition.network_access.network_access_type == api_pb2.NetworkAccess.ALLOWLIST
    assert list(create.definition.network_access.allowed_cidrs) == []
    assert [(p.port, p.tunnel_type, p.unencrypted) for p in create.definition.open_ports.ports] == [
        (8443, api_pb2.TUNNEL_TYPE_UNSPECIFIED, False)
    ]
    assert list(create.tags) == []

    await step(sb.set_tags.aio({"rlm-session": "s9"}))
    assert fake_modal.sandboxes[sb.object_id].tags == {"rlm-session": "s9"}
    assert await step(sb.get_tags.aio()) == {"rlm-session": "s9"}
    found = await _list(app, {"rlm-session": "s9"})
    assert found == [sb.object_id]
    fake_modal.tunnel_targets[8443] = ("127.0.0.1", 9999)
    tunnels = await step(sb.tunnels.aio())
    assert (tunnels[8443].host, tunnels[8443].port) == ("127.0.0.1", 9999)
    await step(sb.terminate.aio())


async def test_finished_sandbox_poll_and_wait(fake_modal: FakeModal) -> None:
    app = await _app()
    sb = await step(modal.Sandbox.create.aio("false", app=app))
    assert await step(sb.poll.aio()) is None
    # wait() long-polls: finish the sandbox while it waits.
    threading.Timer(0.3, fake_modal.finish_sandbox, args=(sb.object_id, 3)).start()
    await step(sb.wait.aio(raise_on_termination=False))
    assert sb.returncode == 3
    assert await step(sb.poll.aio()) == 3
    assert await _list(app) == []
    assert fake_modal.sandboxes[sb.object_id].state == "finished"


async def test_throttled_create(fake_modal: FakeModal) -> None:
    app = await _app()
    fake_modal.throttle("SandboxCreateV2", times=2)
    for _ in range(2):
        with pytest.raises(modal.exception.ResourceExhaustedError, match="Rate limit"):
            await step(modal.Sandbox.create.aio("true", app=app))
    sb = await step(modal.Sandbox.create.aio("true", app=app))
    assert fake_modal.calls().count("SandboxCreateV2") == 3
    assert list(fake_modal.sandboxes) == [sb.object_id]
    await step(sb.terminate.aio())


async def test_unimplemented_rpc_is_named(fake_modal: FakeModal) -> None:
    await _app()
    with pytest.raises(modal.exception.Error, match="SandboxGetFromNameV2"):
        await step(modal.Sandbox.from_name.aio("rlm-test", "no-such-sandbox"))
    assert fake_modal.unimplemented == ["SandboxGetFromNameV2"]


async def test_set_handler_overrides_an_rpc(fake_modal: FakeModal) -> None:
    fake_modal.set_handler(
        "AppGetOrCreate", lambda req: api_pb2.AppGetOrCreateResponse(app_id="ap-custom")
    )
    assert (await _app()).app_id == "ap-custom"
    fake_modal.set_handler("AppGetOrCreate", None)
    assert (await _app("other")).app_id != "ap-custom"
    with pytest.raises(ValueError):
        fake_modal.set_handler("NoSuchRpc", lambda req: None)


async def test_lookup_without_create_is_not_found(fake_modal: FakeModal) -> None:
    with pytest.raises(modal.exception.NotFoundError):
        await step(modal.App.lookup.aio("missing-app"))


def test_stop_is_idempotent_and_port_is_free() -> None:
    fake = FakeModal().start()
    port = fake.port
    assert port
    fake.stop()
    fake.stop()
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", port))


async def test_the_runtime_runs_the_entrypoint_verbatim_behind_its_tunnel(
    fake_modal: FakeModal, runtime: SandboxRuntime
) -> None:
    app = await _app()
    sb = await step(
        modal.Sandbox.create.aio(
            "python3", "-c", ECHO_ONCE, "0.0.0.0:7000", "/tmp/notes.json",
            app=app, unencrypted_ports=[7000], env={"GREETING": "hi"},
        )
    )  # fmt: skip
    container = runtime.containers[sb.object_id]
    assert container.argv == ["python3", "-c", ECHO_ONCE, "0.0.0.0:7000", "/tmp/notes.json"]
    assert container.env["GREETING"] == "hi" and "RLM_SANDBOX_OWNER" not in container.env
    host, port = (await step(sb.tunnels.aio()))[7000].tcp_socket
    deadline = asyncio.get_running_loop().time() + STEP
    reply = b""
    while not reply and asyncio.get_running_loop().time() < deadline:
        try:  # the tunnel hangs up while nothing listens in the container yet
            reader, writer = await asyncio.open_connection(host, port)
            writer.write(b"ping\n")
            reply = await asyncio.wait_for(reader.readline(), STEP)
            writer.close()
            await writer.wait_closed()
        except OSError:
            pass
        await asyncio.sleep(0.05)
    assert reply == b"ping\n"
    await step(sb.wait.aio(raise_on_termination=False))
    assert sb.returncode == 0
    # Its own address for "every interface", its own files for container paths.
    notes = container.root / "fs" / "tmp" / "notes.json"
    listen, path = json.loads(notes.read_text())
    assert listen.startswith("127.78.") and listen.endswith(":7000") and path == str(notes)


async def test_the_runtime_reports_exits_and_stops_what_runs(
    fake_modal: FakeModal, runtime: SandboxRuntime
) -> None:
    app = await _app()
    failing = await step(
        modal.Sandbox.create.aio("python3", "-c", "import sys; sys.exit('bad flag')", app=app)
    )
    await step(failing.wait.aio(raise_on_termination=False))
    assert failing.returncode == 1
    assert "bad flag" in runtime.containers[failing.object_id].log
    missing = await step(modal.Sandbox.create.aio("no-such-program", app=app))
    await step(missing.wait.aio(raise_on_termination=False))
    assert missing.returncode == 127
    sleeper = await step(modal.Sandbox.create.aio("sleep", "600", app=app))
    process = runtime.containers[sleeper.object_id].process
    assert process is not None and process.poll() is None
    await step(sleeper.terminate.aio())
    assert process.poll() is not None
