"""Shared fixtures: one scripted LM server per session, RLM factories, and the leak check.

Every test is checked for leaks: no new agent or worker process, no sandbox temp dir and no
socket may outlive it.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil
import pytest

os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")
# Secrets the orchestrator holds during the tests: none of them may reach a sandbox.
SECRET_ENV = {
    "OPENAI_API_KEY": "sk-orchestrator-secret-openai",
    "ANTHROPIC_API_KEY": "sk-orchestrator-secret-anthropic",
    "RLM_TEST_SECRET_TOKEN": "orchestrator-secret-token",
}
os.environ.update(SECRET_ENV)
# Sandboxes of this run carry this label, and their temp dirs live under this run's own
# temp dir, so that the leak check sees only this run (even beside another test run).
OWNER = f"pytest-{os.getpid()}"
os.environ["RLM_SANDBOX_OWNER"] = OWNER
RUN_TMP = Path(tempfile.mkdtemp(prefix="rlm-tests-"))
os.environ["TMPDIR"] = str(RUN_TMP)
tempfile.tempdir = str(RUN_TMP)

from modal_support import fake_modal, modal_agents  # noqa: E402, F401  (fixtures)
from skip_policy import pytest_configure  # noqa: E402, F401  (in CI a skip fails)

from rlm_orchestrator import RLM  # noqa: E402
from rlm_orchestrator.client import Client  # noqa: E402
from rlm_orchestrator.sandbox.launch import TOKEN_ENV  # noqa: E402
from rlm_orchestrator.testing.scripted_lm import Script, ScriptedLMServer  # noqa: E402
from sandbox_agent.forkserver import AGENT_TEMPLATE_NAME  # noqa: E402

ROOT_MODEL, SUB_MODEL, OTHER_MODEL = "root", "sub", "other"
API_KEY = "sk-scripted-test-key"


def _agent_processes() -> set[int]:
    found = set()
    for process in psutil.process_iter(["cmdline", "name", "ppid"]):
        if "sandbox_agent" not in " ".join(process.info["cmdline"] or []):
            continue
        if process.info["name"] == AGENT_TEMPLATE_NAME and process.info["ppid"] != os.getpid():
            continue  # a running server's fork server: it lives as long as the server
        try:
            if process.environ().get("RLM_SANDBOX_OWNER") == OWNER:
                found.add(process.pid)
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            pass
    return found


SANDBOX_IMAGE = os.environ.get("SANDBOX_IMAGE", "rlm-sandbox:latest")
# CI sets this: there, a missing engine or image fails the docker tests instead of skipping.
REQUIRE_DOCKER = os.environ.get("RLM_REQUIRE_DOCKER") == "1"


def _docker_problem() -> str | None:
    """Why the docker tests cannot run here, or None."""
    try:
        import docker

        client = docker.from_env()
        try:
            client.images.get(SANDBOX_IMAGE)
        finally:
            client.close()
    except Exception as exc:
        reason = f"{type(exc).__name__}: {exc}"
        return f"Docker engine or image {SANDBOX_IMAGE} unavailable ({reason}); make sandbox-image"
    return None


DOCKER_PROBLEM = _docker_problem()


def require_docker() -> None:
    if DOCKER_PROBLEM is None:
        return
    if REQUIRE_DOCKER:
        pytest.fail(f"RLM_REQUIRE_DOCKER=1 but {DOCKER_PROBLEM}")
    pytest.skip(DOCKER_PROBLEM)


def _our_containers(all_managed: bool = False) -> set[str]:
    if DOCKER_PROBLEM is not None:
        return set()
    import docker

    client = docker.from_env()
    try:
        label = "rlm.managed=true" if all_managed else f"rlm.owner={OWNER}"
        found = client.containers.list(all=True, filters={"label": label}, ignore_removed=True)
        # The session's fleet agents live for the whole run (and are checked at its end).
        return {c.id for c in found if all_managed or c.labels.get("rlm.role") != "fleet-agent"}
    finally:
        client.close()


def _sandbox_dirs() -> set[str]:
    return {p.name for p in RUN_TMP.glob("rlm-*")}


@pytest.fixture(scope="session", autouse=True)
def run_tmp() -> Iterator[Path]:
    yield RUN_TMP
    shutil.rmtree(RUN_TMP, ignore_errors=True)
    # After the whole suite, none of this run's containers may exist. (Scoped to this run:
    # in CI it is the only one; on a workstation another run may be going on beside it.)
    leftover = _our_containers()
    assert not leftover, f"containers with the project's label left after the tests: {leftover}"


@pytest.fixture(autouse=True)
def no_leaks() -> Iterator[None]:
    """Fails the test if it leaves an agent/worker process or a sandbox directory behind."""
    processes_before, dirs_before = _agent_processes(), _sandbox_dirs()
    containers_before = _our_containers()
    yield
    deadline = time.monotonic() + 5.0
    while True:
        leaked_processes = _agent_processes() - processes_before
        leaked_dirs = _sandbox_dirs() - dirs_before
        leaked_containers = _our_containers() - containers_before
        if not (leaked_processes or leaked_dirs or leaked_containers):
            break
        if time.monotonic() > deadline:
            break
        time.sleep(0.05)
    assert not leaked_processes, f"leaked sandbox processes: {sorted(leaked_processes)}"
    assert not leaked_dirs, f"leaked sandbox directories: {sorted(leaked_dirs)}"
    assert not leaked_containers, f"leaked sandbox containers: {sorted(leaked_containers)}"


@pytest.fixture(scope="session")
def lm_server() -> Iterator[ScriptedLMServer]:
    with ScriptedLMServer() as server:
        yield server


@pytest.fixture
def lm(lm_server: ScriptedLMServer) -> Iterator[ScriptedLMServer]:
    """The session's scripted LM, emptied for this test."""
    lm_server.reset()
    yield lm_server
    lm_server.reset()


def backend_kwargs(server: ScriptedLMServer, model: str, **extra: Any) -> dict[str, Any]:
    return {
        "model_name": model,
        "api_base": server.base_url,
        "api_key": API_KEY,
        "retry_initial_delay": 0.01,
        **extra,
    }


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    # The semantics suite runs twice: in-process RLM, and through a real server via the SDK.
    if "make_rlm" in metafunc.fixturenames and metafunc.module.__name__.startswith(
        "test_semantics"
    ):
        vias = ["local", "server", "docker"]
        if metafunc.definition.get_closest_marker("not_through_server"):
            vias.remove("server")  # documented not applicable: the variant does not exist
        if metafunc.module.__name__ == "test_semantics":
            vias.append("modal")  # against the fake Modal control plane (test_modal.py)
            vias.append("fleet")  # 4 agent containers on a private network (fleet_support.py)
            vias.append("kubernetes")  # a pod per session in a fake cluster (kube_support.py)
        metafunc.parametrize("via", vias, indirect=True)


@pytest.fixture
def via(request: pytest.FixtureRequest) -> str:
    return str(getattr(request, "param", "local"))


@pytest.fixture
def make_rlm(
    lm: ScriptedLMServer, via: str, request: pytest.FixtureRequest
) -> Iterator[Callable[..., Any]]:
    """RLM against the scripted server: root model "root", sub-calls to "sub".

    With via == "server", the same arguments drive a RemoteRLM: the SDK against a real
    `rlm-orchestrator serve` whose models are the same scripted ones.
    """
    made: list[RemoteRLM] = []

    def factory(
        *,
        root: list[str] | None = None,
        sub: list[str] | None = None,
        script: Script | None = None,
        **kwargs: Any,
    ) -> Any:
        if script is not None:
            lm.set_script(script)
        if root is not None:
            lm.set_sequence(ROOT_MODEL, list(root))
        if sub is not None:
            lm.set_sequence(SUB_MODEL, list(sub))
        defaults = {
            "backend": "openai",
            "backend_kwargs": backend_kwargs(lm, ROOT_MODEL),
            "other_backends": ["openai"],
            "other_backend_kwargs": [backend_kwargs(lm, SUB_MODEL)],
            "environment": "local",
        }
        if via == "fleet":
            require_docker()
            fleet = request.getfixturevalue("docker_fleet")
            request.getfixturevalue("monkeypatch").setenv(TOKEN_ENV, fleet_token)
            environment_kwargs = {**kwargs.pop("environment_kwargs", {}), **fleet.options()}
            return RLM(
                **{
                    **defaults,
                    **kwargs,
                    "environment": "fleet",
                    "environment_kwargs": environment_kwargs,
                }
            )
        if via == "kubernetes":
            cluster = request.getfixturevalue("fake_cluster")
            environment_kwargs = {**kwargs.pop("environment_kwargs", {}), **cluster.options()}
            return RLM(
                **{
                    **defaults,
                    **kwargs,
                    "environment": "kubernetes",
                    "environment_kwargs": environment_kwargs,
                }
            )
        if via == "modal":
            behind = request.getfixturevalue("modal_agents")
            environment_kwargs = {
                **kwargs.pop("environment_kwargs", {}),
                "tls_ca_file": behind.pki.ca_cert,
            }
            return RLM(
                **{
                    **defaults,
                    **kwargs,
                    "environment": "modal",
                    "environment_kwargs": environment_kwargs,
                }
            )
        if via == "docker":
            require_docker()
            environment_kwargs = {**kwargs.pop("environment_kwargs", {}), "image": SANDBOX_IMAGE}
            return RLM(
                **{
                    **defaults,
                    **kwargs,
                    "environment": "docker",
                    "environment_kwargs": environment_kwargs,
                }
            )
        if via == "server":
            server = request.getfixturevalue("orchestrator_server")
            remote = RemoteRLM(
                server, {k: v for k, v in kwargs.items() if defaults.get(k, object()) != v}
            )
            made.append(remote)
            return remote
        return RLM(**{**defaults, **kwargs})

    yield factory
    for remote in made:
        remote.close()


class RemoteRLM:
    """RLM's surface over the client SDK, for running the semantics suite through a server."""

    _OPTIONS = {
        "max_iterations",
        "max_depth",
        "timeout_seconds",
        "iteration_timeout_seconds",
        "max_cost",
        "final_with_code",
        "answer_convention",
        "code_fences",
    }

    def __init__(self, server: ServerProcess, kwargs: dict[str, Any]) -> None:
        self.options: dict[str, Any] = {}
        self.persistent = False
        for key, value in kwargs.items():
            if key in self._OPTIONS:
                self.options[key] = value
            elif key == "custom_system_prompt":
                self.options["system_prompt"] = value
            elif key == "environment_kwargs" and set(value) <= {"exec_timeout_seconds"}:
                self.options.update(value)
            elif key == "persistent":
                self.persistent = bool(value)
            elif key == "on_event":
                self.options["on_event"] = value
            else:
                pytest.fail(
                    f"{key}={value!r} has no equivalent through the server: mark the test "
                    "@pytest.mark.not_through_server(why) so that its [server] variant is not made"
                )
        self.client = server.client()
        self.session: Any = None

    def completion(self, context: Any, root_prompt: str | None = None) -> Any:
        if self.persistent:
            if self.session is None:
                self.session = self.client.create_session()
            return self.session.completion(context, root_prompt, **self.options)
        return self.client.completion(context, root_prompt, **self.options)

    def close(self) -> None:
        if self.session is not None:
            self.session.close()
            self.session = None
        self.client.close()

    def __enter__(self) -> RemoteRLM:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def repl(code: str) -> str:
    """A root-LM response running one block."""
    return f"```repl\n{code}\n```"


# -- the orchestrator server, as a real subprocess ---------------------------------------------

SERVER_TOKEN = "server-test-token"


@dataclass
class ServerProcess:
    address: str
    process: subprocess.Popen[str]
    config: Path

    def client(self, **kwargs: Any) -> Client:
        kwargs.setdefault("token", SERVER_TOKEN)
        return Client(self.address, **kwargs)


def server_config(
    lm: ScriptedLMServer, directory: Path, *, max_tokens: int | None = None, **extra: Any
) -> Path:
    """A TOML config serving root/sub/other (and a priced sub) from the scripted LM; each
    model's `max_tokens` when given."""
    lines = [f"{key} = {json.dumps(value)}" for key, value in extra.items()]
    lines += ['listen = "127.0.0.1:0"', f'auth_token = "{SERVER_TOKEN}"', 'sub_model = "sub"']
    for name, price in (
        (ROOT_MODEL, None),
        (SUB_MODEL, None),
        (OTHER_MODEL, None),
        ("priced-sub", 0.01),
    ):
        lines += [
            "[[models]]",
            f'name = "{name}"',
            f'model_name = "{SUB_MODEL if price else name}"',
            f'api_base = "{lm.base_url}"',
            'api_key_env = "OPENAI_API_KEY"',
            "retry_initial_delay = 0.01",
        ]
        if price:
            lines.append(f"input_cost_per_token = {price}")
        if max_tokens is not None:
            lines.append(f"max_tokens = {max_tokens}")
    path = directory / f"server-{uuid.uuid4().hex[:8]}.toml"
    path.write_text("\n".join(lines) + "\n")
    return path


def start_server(config: Path, timeout: float = 90.0) -> ServerProcess:
    command = [sys.executable, "-m", "rlm_orchestrator.cli", "serve", "--config", str(config)]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, text=True)
    assert process.stdout is not None
    line = process.stdout.readline()  # LISTENING host:port, once the router is ready
    if not line.startswith("LISTENING"):
        process.kill()
        process.wait()
        raise RuntimeError(f"the server did not start: {line!r}")
    return ServerProcess(line.split()[1], process, config)


def stop_server(server: ServerProcess) -> None:
    server.process.terminate()
    try:
        server.process.wait(30)
    except subprocess.TimeoutExpired:
        server.process.kill()
        server.process.wait()
    if server.process.stdout:
        server.process.stdout.close()


@pytest.fixture(scope="session")
def orchestrator_server(lm_server: ScriptedLMServer) -> Iterator[ServerProcess]:
    """One `rlm-orchestrator serve` for the session (tests share it, one at a time)."""
    # Depth 1 unless a request asks for 2 (the ceiling): rlm_query tests need children.
    config = server_config(
        lm_server, RUN_TMP, max_context_bytes=100_000_000, max_depth=2, default_max_depth=1
    )
    server = start_server(config)
    yield server
    stop_server(server)


# Fixtures shared with other modules; imported last, as they import from this one.
from fleet_support import TOKEN as fleet_token  # noqa: E402
from fleet_support import docker_fleet  # noqa: E402, F401
from hostile_support import tenant_server  # noqa: E402, F401
from kube_support import fake_cluster, kube_pki  # noqa: E402, F401
