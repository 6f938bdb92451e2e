"""The Modal provider, end to end against a fake Modal control plane (no network).

The REAL `modal` client and the REAL provider talk to FakeModal (a grpclib server speaking
Modal's API, checking the client's credentials). The fake's runtime starts each sandbox's
entrypoint exactly as the provider asked (its `command()`, every flag) with the secret it sent
(the bearer token), on an address of its own; the fake's h2 tunnel terminates TLS (a test CA)
in front of it, as Modal's edge does: everything after the control plane is the real path.
"""

from __future__ import annotations

import inspect
import shlex
import socket
from collections.abc import Sequence
from typing import Any

import modal
import pytest
from grpclib.const import Status
from grpclib.exceptions import GRPCError
from modal_proto import api_pb2
from modal_support import ModalAgents, _free_port, close_modal_client

import rlm_wire
from rlm_orchestrator.config import ModalConfig
from rlm_orchestrator.exceptions import SandboxError
from rlm_orchestrator.sandbox import SandboxSpec, SubCallOutcome
from rlm_orchestrator.sandbox.launch import agent_wheels
from rlm_orchestrator.sandbox.modal_provider import ModalProvider
from tests.fakes.fake_modal import FakeModal, reset_modal_client

pytestmark = pytest.mark.timeout(60)


def provider_for(modal_agents: ModalAgents, **options: Any) -> ModalProvider:
    return ModalProvider(ModalConfig(tls_ca_file=modal_agents.pki.ca_cert, **options))


async def no_output(stream: str, text: str) -> None:
    return None


async def answer(prompts: list[str], model: str, kind: str) -> Sequence[SubCallOutcome]:
    return [SubCallOutcome(text=p.upper()) for p in prompts]


async def test_a_modal_sandbox_runs_code_through_the_tunnel(
    fake_modal: FakeModal, modal_agents: ModalAgents
) -> None:
    fake_modal.clear_requests()
    provider = provider_for(modal_agents)
    try:
        sandbox = await provider.acquire(SandboxSpec(session_id="s-1", exec_timeout_seconds=30))
        report = await sandbox.client.execute(
            "print(llm_query('via the tunnel'))", on_output=no_output, on_sub_call=answer
        )
        assert report.stdout == "VIA THE TUNNEL\n"
        await provider.release(sandbox)
    finally:
        await provider.aclose()
    (create,) = fake_modal.requests_for("SandboxCreateV2")
    definition = create.definition
    # What we asked Modal for: an h2 tunnel on the agent's port, no egress, timeouts, tags,
    # a TCP readiness probe, our secret, the agent as the entrypoint.
    (open_port,) = definition.open_ports.ports
    assert open_port.port == 50051 and open_port.tunnel_type == api_pb2.TUNNEL_TYPE_H2
    assert list(definition.network_access.allowed_cidrs) == []
    assert definition.network_access.network_access_type == api_pb2.NetworkAccess.ALLOWLIST
    assert definition.timeout_secs == 3600 and definition.idle_timeout_secs == 300
    assert definition.readiness_probe.tcp_port == 50051
    # The token went as an ephemeral secret, not as a plain environment variable.
    assert modal_agents.tokens and modal_agents.tokens[0] not in str(definition)
    # The agent that answered ran from exactly the entrypoint the provider sent.
    (container,) = modal_agents.runtime.containers.values()
    assert container.argv == list(definition.entrypoint_args) == provider.command(sandbox.spec)
    tags = {tag.tag_name: tag.tag_value for tag in create.tags}
    assert tags["rlm.session"] == "s-1" and tags["rlm.orchestrator"].count(":") == 2
    assert fake_modal.requests_for("SandboxTerminateV2"), "release terminates the sandbox"


async def test_calls_without_the_sandbox_token_are_refused(
    modal_agents: ModalAgents,
) -> None:
    from rlm_orchestrator.sandbox.agent_client import AgentClient
    from rlm_wire.auth import channel_credentials

    provider = provider_for(modal_agents)
    try:
        sandbox = await provider.acquire(SandboxSpec(session_id="s-2"))
        stranger = AgentClient(
            sandbox.client.target, credentials=channel_credentials(modal_agents.pki.ca_cert)
        )
        try:
            with pytest.raises(SandboxError, match="UNAUTHENTICATED"):
                await stranger.info()
        finally:
            await stranger.close()
        await provider.release(sandbox)
    finally:
        await provider.aclose()


async def test_the_tcp_tunnel_mode_reaches_the_agent(modal_agents: ModalAgents) -> None:
    provider = ModalProvider(ModalConfig(tunnel_mode="tcp"))
    try:
        sandbox = await provider.acquire(SandboxSpec(session_id="s-tcp"))
        report = await sandbox.client.execute(
            "print(6 * 7)", on_output=no_output, on_sub_call=answer
        )
        assert report.stdout == "42\n"
        await provider.release(sandbox)
    finally:
        await provider.aclose()
    (create,) = modal_agents.fake.requests_for("SandboxCreateV2")
    (open_port,) = create.definition.open_ports.ports
    assert open_port.unencrypted and open_port.tunnel_type == api_pb2.TUNNEL_TYPE_UNSPECIFIED


class BadFlagProvider(ModalProvider):
    def command(self, spec: SandboxSpec) -> list[str]:
        return [*super().command(spec), "--no-such-flag"]


async def test_an_agent_that_exits_at_start_fails_the_acquire_at_once(
    modal_agents: ModalAgents,
) -> None:
    provider = BadFlagProvider(ModalConfig(tls_ca_file=modal_agents.pki.ca_cert))
    try:
        with pytest.raises(SandboxError, match="exited at start with code 2"):
            await provider.acquire(SandboxSpec(session_id="s-bad", startup_timeout_seconds=60))
    finally:
        await provider.aclose()
    (container,) = modal_agents.runtime.containers.values()
    assert "unrecognized arguments: --no-such-flag" in container.log
    assert modal_agents.fake.requests_for("SandboxTerminateV2"), "a failed start is cleaned up"


async def test_a_wrong_modal_token_is_refused_clearly_and_the_right_one_works(
    fake_modal: FakeModal, modal_agents: ModalAgents, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("MODAL_TOKEN_SECRET", "as-not-the-secret")
    reset_modal_client()
    provider = provider_for(modal_agents)
    try:
        with pytest.raises(SandboxError, match="Modal refused the credentials: Invalid token"):
            await provider.acquire(SandboxSpec(session_id="s-wrong"))
    finally:
        await provider.aclose()
    assert fake_modal.refused and "SandboxCreateV2" not in fake_modal.calls()
    await close_modal_client()
    monkeypatch.setenv("MODAL_TOKEN_SECRET", fake_modal.token_secret)
    provider = provider_for(modal_agents)
    try:
        await provider.release(await provider.acquire(SandboxSpec(session_id="s-right")))
    finally:
        await provider.aclose()
    assert "SandboxCreateV2" in fake_modal.calls()


async def test_no_modal_token_is_refused_clearly(
    fake_modal: FakeModal, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("MODAL_TOKEN_ID")
    monkeypatch.delenv("MODAL_TOKEN_SECRET")
    reset_modal_client()
    provider = ModalProvider()
    try:
        with pytest.raises(
            SandboxError, match=r"Modal refused the credentials: Token missing.*MODAL_TOKEN_ID"
        ):
            await provider.acquire(SandboxSpec(session_id="s-none"))
    finally:
        await provider.aclose()
    assert "SandboxCreateV2" not in fake_modal.calls()


async def test_a_create_modal_refuses_is_a_sandbox_error(
    fake_modal: FakeModal, modal_agents: ModalAgents
) -> None:
    def refuse(request: api_pb2.SandboxCreateV2Request) -> None:
        raise GRPCError(Status.FAILED_PRECONDITION, "the workspace has reached its sandbox limit")

    fake_modal.set_handler("SandboxCreateV2", refuse)
    provider = provider_for(modal_agents)
    try:
        with pytest.raises(
            SandboxError,
            match="Modal refused to create the sandbox: the workspace has reached its sandbox",
        ):
            await provider.acquire(SandboxSpec(session_id="s-refused"))
    finally:
        await provider.aclose()
    assert fake_modal.calls().count("SandboxCreateV2") == 1  # a refusal is not retried


async def test_throttled_creates_are_retried(
    fake_modal: FakeModal, modal_agents: ModalAgents
) -> None:
    fake_modal.throttle("SandboxCreateV2", times=2)
    provider = provider_for(modal_agents, creates_per_second=50.0)
    try:
        sandbox = await provider.acquire(SandboxSpec(session_id="s-3"))
        await provider.release(sandbox)
    finally:
        await provider.aclose()
    assert len(fake_modal.requests_for("SandboxCreateV2")) == 3


async def test_an_unreachable_control_plane_fails_fast_with_the_fix(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("MODAL_SERVER_URL", f"http://127.0.0.1:{_free_port()}")
    monkeypatch.setenv("MODAL_TOKEN_ID", "ak-fake")
    monkeypatch.setenv("MODAL_TOKEN_SECRET", "as-fake")
    reset_modal_client()
    provider = ModalProvider(ModalConfig(control_timeout_seconds=2.0))
    try:
        with pytest.raises(SandboxError, match="MODAL_TOKEN_ID"):
            await provider.acquire(SandboxSpec(session_id="s-4"))
    finally:
        await provider.aclose()
        reset_modal_client()


def test_sandbox_create_signature_contract() -> None:
    # A modal upgrade that renames or drops what we pass must fail here, loudly.
    parameters = inspect.signature(modal.Sandbox.create).parameters
    provider = ModalProvider()
    for name in (
        "app",
        "image",
        "secrets",
        "timeout",
        "idle_timeout",
        "cpu",
        "memory",
        "region",
        "outbound_cidr_allowlist",
        "readiness_probe",
        "tags",
        "h2_ports",
        "unencrypted_ports",
    ):
        assert name in parameters, f"modal.Sandbox.create lost {name!r}"
    assert set(provider.create_kwargs(SandboxSpec(session_id="x"), "t")) - {"app"} <= set(
        parameters
    )


async def test_the_image_pins_the_agent_wheels_and_adds_its_source(
    fake_modal: FakeModal, modal_agents: ModalAgents
) -> None:
    provider = provider_for(modal_agents)
    try:
        sandbox = await provider.acquire(SandboxSpec(session_id="s-5"))
        await provider.release(sandbox)
    finally:
        await provider.aclose()
    steps = "\n".join(
        command for image in fake_modal.images.values() for command in image.dockerfile_commands
    )
    # The agent's pinned wheels, the list the sandbox image's build installs too (launch.py).
    (install,) = {line for line in steps.splitlines() if "pip install" in line and "==" in line}
    assert set(agent_wheels()) == {w for w in shlex.split(install) if "==" in w}, install
    assert "litellm" not in steps
    (create,) = fake_modal.requests_for("SandboxCreateV2")[-1:]
    assert "mo-agent" in create.definition.mount_ids  # sandbox_agent's source, as a mount
    # The mounts carry the agent and, of the wire, only what it imports (not the orchestrator's
    # or the router's generated code).
    mounts = fake_modal.requests_for("MountGetOrCreate")
    mounted = {file.filename for mount in mounts for file in mount.files}
    wire = {name for name in mounted if name.startswith("/root/rlm_wire/")}
    assert wire == {f"/root/rlm_wire/{name}" for name in rlm_wire.AGENT_FILES}
    assert {"/root/sandbox_agent/__main__.py", "/root/sandbox_agent/server.py"} <= mounted


async def test_orphans_of_a_dead_orchestrator_are_swept(
    fake_modal: FakeModal, modal_agents: ModalAgents
) -> None:
    app = await modal.App.lookup.aio("rlm-sandboxes", create_if_missing=True)
    dead_owner = f"{socket.gethostname()}:999999999:1"  # no such process on this host
    orphan = await modal.Sandbox.create.aio(
        "sleep", "60", app=app, tags={"rlm.orchestrator": dead_owner, "rlm.session": "old"}
    )
    provider = provider_for(modal_agents)
    try:
        sandbox = await provider.acquire(SandboxSpec(session_id="s-6"))  # sweeps first
        await provider.release(sandbox)
    finally:
        await provider.aclose()
    terminated = {r.sandbox_id for r in fake_modal.requests_for("SandboxTerminateV2")}
    assert orphan.object_id in terminated


@pytest.mark.modal_live
async def test_live_modal_round_trip() -> None:
    # Collected only with RLM_MODAL_LIVE=1 (conftest), for users with a Modal account: without
    # real credentials it fails, saying so.
    provider = ModalProvider()
    try:
        sandbox = await provider.acquire(
            SandboxSpec(session_id="live", startup_timeout_seconds=300)
        )
        report = await sandbox.client.execute(
            "import socket\ntry:\n    socket.create_connection(('1.1.1.1', 443), timeout=3)\n"
            "    print('EGRESS')\nexcept OSError:\n    print('no egress')\nprint(llm_query('x'))",
            on_output=no_output,
            on_sub_call=answer,
        )
        assert report.stdout == "no egress\nX\n"
        await provider.release(sandbox)
    finally:
        await provider.aclose()
