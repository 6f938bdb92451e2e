"""The agent's launch description (rlm_orchestrator/sandbox/launch.py) against the agent itself.

What every backend renders is parsed by the agent's own argument parser (a renamed or
dropped flag fails here, not in a container), the token variable is the one the agent reads,
and the pinned wheels are one list for the Modal image and the sandbox image's build.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from rlm_orchestrator.config import DockerConfig, FleetConfig, LocalConfig, ModalConfig, PodConfig
from rlm_orchestrator.sandbox import SandboxSpec
from rlm_orchestrator.sandbox.docker import DockerProvider
from rlm_orchestrator.sandbox.kubernetes.pods import agent_args, pod_spec
from rlm_orchestrator.sandbox.kubernetes.provider import KubernetesConfig
from rlm_orchestrator.sandbox.launch import (
    AGENT_MODULE,
    TOKEN_ENV,
    AgentLaunch,
    agent_wheels,
    token_environment,
)
from rlm_orchestrator.sandbox.local import LocalProvider
from rlm_orchestrator.sandbox.modal_provider import ModalProvider
from sandbox_agent import __main__ as agent_main
from sandbox_agent.server import AgentConfig

REPO = Path(__file__).resolve().parents[1]
SPEC = SandboxSpec(
    session_id="s", exec_timeout_seconds=12.5, max_output_chars=4321, memory_limit_mb=640
)


def parsed(args: list[str]) -> AgentConfig:
    config, own_dir = agent_main.parse_args(args)
    assert own_dir is None, "every launch names the agent's work dir"
    return config


def flags_of(argv: list[str]) -> list[str]:
    """The flags of a whole command: `<python> -m sandbox_agent <flags>`."""
    assert argv[1:3] == ["-m", AGENT_MODULE], argv
    return argv[3:]


def token_pipe(token: str) -> int:
    read_end, write_end = os.pipe()
    os.write(write_end, token.encode())
    os.close(write_end)
    return read_end


def test_every_field_reaches_the_agent_as_set(tmp_path: Path) -> None:
    launch = AgentLaunch(
        listen="127.0.0.1:0",
        workdir=str(tmp_path / "w"),
        state_dir=str(tmp_path / "s"),
        max_output_chars=10**12,
        memory_limit_mb=300,
        isolation="auto",
        max_processes=64,
        tmp_size_mb=32,
        sandbox_uid=1234,
        socket_mode=0o600,
        token_fd=token_pipe("secret-token"),
        tls_cert="/c.pem",
        tls_key="/k.pem",
        health_listen="127.0.0.1:0",
        parent_pid=4242,
        orphan_timeout_seconds=30,
        fleet=True,
        lease_ttl_seconds=7.5,
        reflection=True,
    )
    config = parsed(launch.args())
    executor = config.executor
    assert (config.listen, config.health_listen) == ("127.0.0.1:0", "127.0.0.1:0")
    assert (executor.workdir, executor.state_dir) == (tmp_path / "w", tmp_path / "s")
    assert executor.max_output_chars == 10**12
    assert executor.memory_limit_mb == 300
    assert (executor.isolation, executor.max_processes, executor.tmp_size_mb) == ("auto", 64, 32)
    assert executor.sandbox_uid == 1234
    assert config.socket_mode == 0o600 and config.token == "secret-token"
    assert (config.tls_cert, config.tls_key) == (Path("/c.pem"), Path("/k.pem"))
    assert config.orphan_timeout_seconds == 30 and config.reflection
    assert config.fleet and config.lease_ttl_seconds == 7.5
    assert agent_main._flag_value(launch.args(), "--parent-pid") == "4242"


def test_what_is_not_set_is_not_passed(tmp_path: Path) -> None:
    launch = AgentLaunch(listen="unix:/a.sock", workdir=str(tmp_path), state_dir=str(tmp_path))
    args = launch.args()
    assert args == [
        "--listen",
        "unix:/a.sock",
        "--workdir",
        f"{tmp_path}",
        "--state-dir",
        f"{tmp_path}",
    ]
    bare = parsed(args)
    assert bare.executor.memory_limit_mb == 0 and bare.orphan_timeout_seconds == 0
    assert launch.argv("/py") == ["/py", "-m", "sandbox_agent", *args]
    with pytest.raises(ValueError, match="go together"):
        AgentLaunch(listen="x", tls_cert="/c.pem")


def test_a_session_sets_its_limits_and_the_backend_its_default_memory() -> None:
    base = AgentLaunch(listen="x")
    assert base.for_session(SPEC, 100).memory_limit_mb == 640
    assert base.for_session(SandboxSpec(session_id="s"), 100).memory_limit_mb == 100
    assert base.for_session(SandboxSpec(session_id="s")).memory_limit_mb == 0


def test_local_sandboxes_launch_a_jailed_agent_the_agent_understands(tmp_path: Path) -> None:
    provider = LocalProvider(LocalConfig(isolation="required", max_processes=99))
    fd = token_pipe("t")
    argv = provider._agent_command(SPEC, tmp_path, tmp_path / "agent.sock", fd)
    assert argv[0] == sys.executable
    config = parsed(flags_of(argv))
    assert config.listen == f"unix:{tmp_path / 'agent.sock'}"
    assert config.executor.workdir == tmp_path / "work"
    assert config.executor.max_output_chars == SPEC.max_output_chars
    assert config.executor.memory_limit_mb == SPEC.memory_limit_mb
    assert (config.executor.isolation, config.executor.max_processes) == ("required", 99)
    assert config.socket_mode == 0o600 and config.token == "t"
    assert agent_main._flag_value(argv, "--parent-pid") == str(os.getpid())


def test_docker_sandboxes_pass_flags_to_the_images_entrypoint() -> None:
    provider = DockerProvider(DockerConfig(memory_mb=777, orphan_timeout_seconds=9))
    config = parsed(provider.command(SandboxSpec(session_id="s")))
    assert config.listen == "unix:/sock/agent.sock"
    assert config.executor.workdir == Path("/work/code")
    assert config.executor.memory_limit_mb == 777  # the container's memory when none is asked
    assert config.orphan_timeout_seconds == 9  # (the image's entrypoint: test_deploy_compose)


def test_modal_sandboxes_launch_the_agent_with_the_sessions_limits() -> None:
    provider = ModalProvider(ModalConfig(port=6000, orphan_timeout_seconds=5))
    config = parsed(flags_of(provider.command(SPEC)))
    assert config.listen == "0.0.0.0:6000"
    assert config.executor.memory_limit_mb == SPEC.memory_limit_mb
    assert config.orphan_timeout_seconds == 5 and config.token is None  # the token: a secret


def test_kubernetes_pods_launch_the_agent_with_tls_and_a_health_port() -> None:
    options = PodConfig(port=7000, health_port=7001)
    config = parsed(agent_args(options, memory_limit_mb=512))
    assert (config.listen, config.health_listen) == ("0.0.0.0:7000", "0.0.0.0:7001")
    assert (config.tls_cert, config.tls_key) == (Path("/tls/tls.crt"), Path("/tls/tls.key"))
    assert config.executor.memory_limit_mb == 512
    plain = parsed(agent_args(PodConfig(tls_secret=None)))
    assert plain.tls_cert is None and plain.executor.memory_limit_mb == 0
    (container,) = pod_spec(options)["containers"]
    (env,) = container["env"]
    assert env["name"] == TOKEN_ENV
    mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
    assert config.tls_cert is not None and config.tls_cert.parent == Path(mounts["tls"])


def test_one_token_variable_for_the_agent_and_the_orchestrator() -> None:
    assert TOKEN_ENV == "RLM_AGENT_TOKEN"
    assert agent_main.TOKEN_ENV is TOKEN_ENV  # what the agent reads
    assert FleetConfig().token_env == KubernetesConfig().token_env == TOKEN_ENV
    assert token_environment("t") == {TOKEN_ENV: "t"}


def test_the_agents_pinned_wheels_are_one_list() -> None:
    with open(REPO / "pyproject.toml", "rb") as file:
        extra = tomllib.load(file)["project"]["optional-dependencies"]["agent"]
    assert all("==" in wheel for wheel in extra), "the agent's wheels are pinned"
    assert set(agent_wheels()) == {wheel.replace(" ", "") for wheel in extra}
    script = subprocess.run(
        [REPO / "deploy" / "build-sandbox-image.sh", "--print-requirements"],
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    )
    assert set(script.stdout.split()) == set(agent_wheels())
    # The agent's four runtime dependencies, nothing of the orchestrator's.
    names = {wheel.split("==")[0] for wheel in agent_wheels()}
    assert names == {"grpcio", "grpcio-health-checking", "grpcio-reflection", "protobuf"}
