"""A fake Modal control plane with real agents behind its tunnels (shared by the tests)."""

from __future__ import annotations

import asyncio
import os
import socket
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import modal
import pytest
from modal_proto import api_pb2

from rlm_orchestrator.testing.certs import TestPKI, make_test_pki
from rlm_orchestrator.testing.fake_modal import FakeModal, reset_modal_client


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
        if not tokens:
            return self.fake._rpc_SandboxCreateV2(request)  # not one of the provider's
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
                # Bounded: a wrong setup must fail, not wait for modal's minute of retries.
                client = await asyncio.wait_for(modal.Client.from_env.aio(), 10)
                await asyncio.wait_for(client.close.aio(), 10)
            reset_modal_client()


@pytest.fixture
def modal_agents(fake_modal: FakeModal, tmp_path: Path) -> Iterator[AgentsBehindTheTunnel]:
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
