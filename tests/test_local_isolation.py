"""The jail of local sandboxes: what it reports, where the kernel refuses it, and `serve`'s
refusal to run tenants' code without it.

The kernel's refusal is real, not mocked: the agent runs in a user namespace of its own whose
`user.max_user_namespaces` is 0 (a per-namespace setting: the machine's stays untouched), and
inside a Docker container, whose seccomp profile refuses new namespaces.
"""

from __future__ import annotations

import asyncio
import logging
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import SANDBOX_IMAGE, require_docker

from rlm_orchestrator.config import LocalConfig
from rlm_orchestrator.exceptions import ConfigurationError, SandboxError
from rlm_orchestrator.sandbox import SandboxSpec
from rlm_orchestrator.sandbox.local import LocalProvider
from rlm_orchestrator.service.server import _sandbox_provider
from rlm_orchestrator.service.settings import ServerSettings

REFUSED = "none: new namespaces refused: user namespaces are disabled"


@pytest.fixture
def no_user_namespaces(tmp_path: Path) -> Iterator[str]:
    """A `python` for LocalConfig that runs in a user namespace where no new one can be made."""
    if shutil.which("unshare") is None:
        pytest.skip("needs util-linux's unshare")
    wrapper = tmp_path / "python-without-userns"
    wrapper.write_text(
        "#!/bin/sh\n"
        "exec unshare --user --map-root-user sh -c "
        '\'echo 0 > /proc/sys/user/max_user_namespaces && exec "$0" "$@"\' '
        f'{sys.executable} "$@"\n'
    )
    wrapper.chmod(0o755)
    yield str(wrapper)


async def _isolation_of(provider: LocalProvider) -> str:
    sandbox = await provider.acquire(SandboxSpec(session_id="isolation"))
    try:
        info = await sandbox.client.info()
        report = await sandbox.client.execute("print('ran')", on_output=_ignore, on_sub_call=_none)
        assert report.stdout == "ran\n"
        return info.isolation
    finally:
        await provider.aclose()


async def _ignore(stream: str, text: str) -> None:
    return None


async def _none(prompts: list[str], model: str, kind: str) -> list[object]:
    return []


def test_a_local_sandbox_reports_its_jail() -> None:
    provider = LocalProvider()
    assert asyncio.run(_isolation_of(provider)) == "namespaces"
    assert asyncio.run(LocalProvider().check_isolation()) == "namespaces"


def test_without_user_namespaces_auto_runs_unisolated_and_warns_on_every_acquire(
    no_user_namespaces: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, "rlm_orchestrator.sandbox.local")
    provider = LocalProvider(LocalConfig(python=no_user_namespaces))
    for _ in range(2):
        assert asyncio.run(_isolation_of(provider)).startswith(REFUSED)
    warnings = [r.getMessage() for r in caplog.records if "NOT isolated" in r.getMessage()]
    assert len(warnings) == 2 and REFUSED in warnings[0]


def test_without_user_namespaces_required_refuses_to_start(no_user_namespaces: str) -> None:
    provider = LocalProvider(LocalConfig(python=no_user_namespaces, isolation="required"))
    with pytest.raises(SandboxError, match="isolation is required but unavailable"):
        asyncio.run(_isolation_of(provider))
    assert asyncio.run(provider.check_isolation()).startswith(REFUSED)


def test_off_runs_without_a_jail() -> None:
    provider = LocalProvider(LocalConfig(isolation="off"))
    assert asyncio.run(_isolation_of(provider)) == "off"


def test_the_jail_reports_the_refusal_inside_a_docker_container() -> None:
    require_docker()
    probe = "mkdir -p /work/a /work/b && python3 -m sandbox_agent.jail --workdir /work/a "
    probe += "--state-dir /work/b"
    output = subprocess.run(
        [
            *("docker", "run", "--rm", "--network", "none", "--user", "65534:65534"),
            *("--read-only", "--tmpfs", "/work:rw,mode=1777", "--cap-drop", "ALL"),
            *("--entrypoint", "sh", SANDBOX_IMAGE, "-c", probe),
        ],
        capture_output=True,
        text=True,
        timeout=60,
    ).stdout
    assert output.startswith("none: new namespaces refused: not permitted"), output


# -- serve refuses unisolated local sandboxes unless the operator opts in ---------------------


def test_serve_refuses_local_sandboxes_with_isolation_off(tmp_path: Path) -> None:
    config = tmp_path / "server.toml"
    config.write_text(
        'listen = "127.0.0.1:0"\n[environment_kwargs]\nisolation = "off"\n'
        '[[models]]\nname = "m"\napi_key = "unused"\n'
    )
    command = [sys.executable, "-m", "rlm_orchestrator.cli", "serve", "--config", str(config)]
    finished = subprocess.run(command, capture_output=True, text=True, timeout=60)
    assert finished.returncode == 2
    message = " ".join(finished.stderr.split())
    assert "without isolation" in message and "allow_unisolated_sandboxes = true" in message
    assert 'environment = "docker"' in message and "user namespaces" in message


def test_serve_refuses_where_the_kernel_refuses_and_accepts_the_opt_in(
    no_user_namespaces: str, caplog: pytest.LogCaptureFixture
) -> None:
    kwargs = {"python": no_user_namespaces}
    with pytest.raises(ConfigurationError, match="user namespaces are disabled"):
        asyncio.run(_sandbox_provider(ServerSettings(environment_kwargs=kwargs)))
    caplog.set_level(logging.WARNING, "rlm_orchestrator.service")
    allowed = ServerSettings(environment_kwargs=kwargs, allow_unisolated_sandboxes=True)
    provider = asyncio.run(_sandbox_provider(allowed))
    assert isinstance(provider, LocalProvider) and provider.options.isolation == "auto"
    assert "NOT isolated" in caplog.text
    isolated = asyncio.run(_sandbox_provider(ServerSettings()))
    assert isinstance(isolated, LocalProvider) and isolated.options.isolation == "required"


def test_a_refusal_inside_the_jails_init_falls_back_cleanly(tmp_path: Path) -> None:
    """The kernel refuses a mount once the namespaces exist (here: a /tmp of -1 MB): the init
    says why and exits, and the worker's process goes on unjailed, as with no namespaces."""
    code = (
        "import sys\nfrom pathlib import Path\nfrom sandbox_agent import jail\n"
        "config = jail.JailConfig(Path(sys.argv[1]), Path(sys.argv[2]), tmp_size_mb=-1)\n"
        "print(jail.enter(config))"
    )
    for name in ("work", "state"):
        (tmp_path / name).mkdir()
    command = [sys.executable, "-c", code, str(tmp_path / "work"), str(tmp_path / "state")]
    finished = subprocess.run(command, capture_output=True, text=True, timeout=60)
    # One line, from the process that called enter() (a jailed worker would have printed
    # "namespaces"): the init reported the refusal and died, nothing else runs.
    assert finished.stdout.startswith("none: [Errno 22] mount tmpfs on /tmp/tmp"), finished
    assert finished.returncode == 0


def test_share_never_touches_a_path_outside_the_state_dir(tmp_path: Path) -> None:
    from sandbox_agent.jail import share

    state, outside = tmp_path / "state", tmp_path / "outside"
    state.mkdir()
    outside.write_text("x")
    before = outside.stat()
    share(outside, state)
    after = outside.stat()
    assert (after.st_uid, after.st_gid) == (before.st_uid, before.st_gid)
