"""The Modal provider, end to end against a fake Modal control plane (no network).

The REAL `modal` client and the REAL provider talk to FakeModal (a grpclib server speaking
Modal's API). When the provider creates the sandbox's secret (its bearer token), the test
starts a real agent with that token and TLS (a test CA) on 127.0.0.1, and the fake's tunnel
answer points at it: everything after the control plane is the real path.
"""

from __future__ import annotations

import inspect
import os
import socket
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest

modal = pytest.importorskip("modal")

from modal_proto import api_pb2  # noqa: E402

from rlm_orchestrator.exceptions import SandboxError  # noqa: E402
from rlm_orchestrator.sandbox import SandboxSpec, SubCallOutcome  # noqa: E402
from rlm_orchestrator.sandbox.modal_provider import ModalOptions, ModalProvider  # noqa: E402
from rlm_orchestrator.testing.certs import TestPKI, make_test_pki  # noqa: E402
from rlm_orchestrator.testing.fake_modal import FakeModal, reset_modal_client  # noqa: E402

pytestmark = pytest.mark.timeout(60)


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


class AgentsBehindTheTunnel:
    """Starts a real agent for each sandbox secret the provider creates."""

    def __init__(self, fake: FakeModal, pki: TestPKI, workdir: Path) -> None:
        self.fake = fake
        self.pki = pki
        self.workdir = workdir
        self.tokens: list[str] = []
        self.processes: list[subprocess.Popen[bytes]] = []

    def on_create(self, request: api_pb2.SandboxCreateV2Request) -> Any:
        """The sandbox "starts": a real agent with the token the provider sent as a secret."""
        tokens = [
            source.env.contents["RLM_AGENT_TOKEN"]
            for source in request.secret_sources
            if "RLM_AGENT_TOKEN" in source.env.contents
        ]
        token = tokens[0]
        self.tokens.append(token)
        port = _free_port()
        env = {**os.environ, "RLM_AGENT_TOKEN": token}
        command = [
            sys.executable,
            "-m",
            "sandbox_agent",
            "--listen",
            f"127.0.0.1:{port}",
            "--workdir",
            str(self.workdir / f"w{port}"),
            "--state-dir",
            str(self.workdir / f"s{port}"),
            "--tls-cert",
            str(self.pki.server_cert),
            "--tls-key",
            str(self.pki.server_key),
        ]
        self.processes.append(subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL))
        self.fake.tunnel_target = ("localhost", port)
        return self.fake._rpc_SandboxCreateV2(request)

    def stop(self) -> None:
        for process in self.processes:
            process.terminate()
            process.wait(10)


@pytest.fixture
async def fake_modal(monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[FakeModal]:
    async with FakeModal() as fake:
        for key, value in fake.env().items():
            monkeypatch.setenv(key, value)
        reset_modal_client()
        try:
            yield fake
        finally:
            from modal.client import _Client

            if _Client._client_from_env is not None:
                client = await modal.Client.from_env.aio()
                await client.close.aio()
            reset_modal_client()


@pytest.fixture
def agents(fake_modal: FakeModal, tmp_path: Path) -> Iterator[AgentsBehindTheTunnel]:
    behind = AgentsBehindTheTunnel(fake_modal, make_test_pki(tmp_path / "pki"), tmp_path)
    fake_modal.set_handler("SandboxCreateV2", behind.on_create)
    # The image's local source (our agent) is uploaded as a mount: accept every file.
    uploaded: list[str] = []
    fake_modal.set_handler(
        "MountBatchedCheckExistence",
        lambda r: api_pb2.MountBatchedCheckExistenceResponse(
            missing_sha256_hex_hashes=list(r.sha256_hex_hashes)
        ),
    )
    fake_modal.set_handler(
        "MountPutFile",
        lambda r: uploaded.append(r.sha256_hex) or api_pb2.MountPutFileResponse(exists=True),
    )
    fake_modal.set_handler(
        "MountGetOrCreate",
        lambda r: api_pb2.MountGetOrCreateResponse(
            mount_id="mo-agent",
            handle_metadata=api_pb2.MountHandleMetadata(content_checksum_sha256_hex="0" * 64),
        ),
    )
    yield behind
    behind.stop()


def provider_for(agents: AgentsBehindTheTunnel, **options: Any) -> ModalProvider:
    return ModalProvider(ModalOptions(tls_ca_file=agents.pki.ca_cert, **options))


async def no_output(stream: str, text: str) -> None:
    return None


async def answer(prompts: list[str], model: str, kind: str) -> Sequence[SubCallOutcome]:
    return [SubCallOutcome(text=p.upper()) for p in prompts]


async def test_a_modal_sandbox_runs_code_through_the_tunnel(
    fake_modal: FakeModal, agents: AgentsBehindTheTunnel
) -> None:
    fake_modal.clear_requests()
    provider = provider_for(agents)
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
    assert agents.tokens and agents.tokens[0] not in str(definition)
    assert definition.entrypoint_args[:3] == ["python", "-m", "sandbox_agent"]
    tags = {tag.tag_name: tag.tag_value for tag in create.tags}
    assert tags["rlm.session"] == "s-1" and tags["rlm.orchestrator"].count(":") == 2
    assert fake_modal.requests_for("SandboxTerminateV2"), "release terminates the sandbox"


async def test_calls_without_the_sandbox_token_are_refused(agents: AgentsBehindTheTunnel) -> None:
    from rlm_orchestrator.sandbox.agent_client import AgentClient
    from sandbox_agent.auth import channel_credentials

    provider = provider_for(agents)
    try:
        sandbox = await provider.acquire(SandboxSpec(session_id="s-2"))
        stranger = AgentClient(
            sandbox.client.target, credentials=channel_credentials(agents.pki.ca_cert)
        )
        try:
            with pytest.raises(SandboxError, match="UNAUTHENTICATED"):
                await stranger.info()
        finally:
            await stranger.close()
        await provider.release(sandbox)
    finally:
        await provider.aclose()


async def test_throttled_creates_are_retried(
    fake_modal: FakeModal, agents: AgentsBehindTheTunnel
) -> None:
    fake_modal.throttle("SandboxCreateV2", times=2)
    provider = provider_for(agents, creates_per_second=50.0)
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
    provider = ModalProvider(ModalOptions(control_timeout_seconds=2.0))
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
