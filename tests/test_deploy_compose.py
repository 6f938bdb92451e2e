"""deploy/: the compose file, the collector's config and the server config example.

`docker-compose config` validates and resolves the compose file without the engine or any
image (nothing is pulled, built or run). These tests skip when docker-compose is not
installed (in CI they fail); the `docker compose` v2 plugin is used instead when it is the one
present.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parents[1]
DEPLOY = REPO / "deploy"
COMPOSE_FILE = DEPLOY / "compose.yaml"
COLLECTOR_CONFIG = DEPLOY / "otel-collector.yaml"
EXAMPLE_CONFIG = DEPLOY / "orchestrator.example.toml"
DOCKERFILE = DEPLOY / "orchestrator.Dockerfile"
TOKEN = "test-token-not-a-secret"
SERVICES = {"orchestrator", "otel-collector", "jaeger"}

try:
    import yaml
except ImportError:  # PyYAML comes with litellm; without it, text checks only
    yaml = None  # type: ignore[assignment]


def _compose_command() -> list[str] | None:
    if shutil.which("docker-compose"):
        return ["docker-compose"]
    if shutil.which("docker"):
        probe = subprocess.run(["docker", "compose", "version"], capture_output=True, timeout=10)
        if probe.returncode == 0:
            return ["docker", "compose"]
    return None


COMPOSE = _compose_command()
needs_compose = pytest.mark.skipif(
    COMPOSE is None, reason="neither docker-compose nor the `docker compose` plugin is installed"
)
needs_yaml = pytest.mark.skipif(yaml is None, reason="PyYAML is not installed")


def _compose(*args: str, token: str | None = TOKEN) -> subprocess.CompletedProcess[str]:
    assert COMPOSE is not None
    # The caller's COMPOSE_* settings and keys stay out; the project name is fixed.
    env = {k: v for k, v in os.environ.items() if not k.startswith("COMPOSE_")}
    env.pop("RLM_SERVER_AUTH_TOKEN", None)
    env["OPENAI_API_KEY"] = "sk-from-the-host"
    env["COMPOSE_PROJECT_NAME"] = "rlm-deploy-test"
    if token is not None:
        env["RLM_SERVER_AUTH_TOKEN"] = token
    return subprocess.run(
        [*COMPOSE, "-f", str(COMPOSE_FILE), *args],
        capture_output=True,
        text=True,
        env=env,
        cwd=REPO,
        timeout=30,
    )


def _ports(service: dict[str, Any]) -> set[tuple[str, str]]:
    """(published, target) of each port, from the short (v1) or long (v2) syntax."""
    ports = set()
    for port in service.get("ports", []):
        if isinstance(port, dict):
            ports.add((str(port.get("published", "")), str(port["target"])))
        else:
            parts = str(port).split("/")[0].split(":")
            ports.add((parts[-2] if len(parts) > 1 else "", parts[-1]))
    return ports


def _volumes(service: dict[str, Any]) -> dict[str, tuple[str, bool]]:
    """target -> (source, read-only), from the short (v1) or long (v2) syntax."""
    volumes = {}
    for volume in service.get("volumes", []):
        if isinstance(volume, dict):
            volumes[volume["target"]] = (volume["source"], bool(volume.get("read_only")))
        else:
            source, target, *mode = str(volume).split(":")
            volumes[target] = (source, "ro" in mode)
    return volumes


def _environment(service: dict[str, Any]) -> dict[str, str]:
    environment = service.get("environment", {})
    if isinstance(environment, list):
        environment = dict(item.split("=", 1) for item in environment)
    return {k: "" if v is None else str(v) for k, v in environment.items()}


@pytest.fixture(scope="module")
def resolved() -> str:
    if COMPOSE is None:
        pytest.skip("neither docker-compose nor the `docker compose` plugin is installed")
    result = _compose("config")
    assert result.returncode == 0, result.stderr
    return result.stdout


@needs_compose
def test_compose_file_is_valid() -> None:
    result = _compose("config", "-q")
    assert result.returncode == 0, result.stderr
    assert result.stdout == ""


@needs_compose
def test_compose_refuses_to_start_without_a_token() -> None:
    result = _compose("config", "-q", token=None)
    assert result.returncode != 0
    assert "RLM_SERVER_AUTH_TOKEN" in result.stderr


def test_compose_text(resolved: str) -> None:
    """What must be there even where PyYAML is missing."""
    for name in SERVICES:
        assert f"  {name}:" in resolved
    assert "OTEL_EXPORTER_OTLP_ENDPOINT: http://otel-collector:4317" in resolved
    assert "16686" in resolved
    assert TOKEN in resolved


@needs_yaml
def test_compose_services(resolved: str) -> None:
    services = yaml.safe_load(resolved)["services"]
    assert set(services) == SERVICES

    orchestrator = services["orchestrator"]
    assert Path(orchestrator["build"]["context"]).resolve() == REPO
    assert orchestrator["build"]["dockerfile"] == "deploy/orchestrator.Dockerfile"
    assert ("50051", "50051") in _ports(orchestrator)
    env = _environment(orchestrator)
    assert env["OTEL_TRACES_EXPORTER"] == "otlp"
    assert env["OTEL_EXPORTER_OTLP_ENDPOINT"] == "http://otel-collector:4317"
    assert env["OTEL_SERVICE_NAME"] == "rlm-orchestrator"
    assert env["OPENAI_API_KEY"] == "sk-from-the-host"
    assert env["RLM_SERVER_AUTH_TOKEN"] == TOKEN
    config_source, read_only = _volumes(orchestrator)["/etc/rlm/rlm.toml"]
    assert Path(config_source).resolve() == EXAMPLE_CONFIG
    assert read_only
    assert "otel-collector" in orchestrator["depends_on"]

    collector = services["otel-collector"]
    assert collector["image"].startswith("otel/opentelemetry-collector-contrib:")
    mounted = {
        Path(source).resolve(): target for target, (source, _) in _volumes(collector).items()
    }
    assert COLLECTOR_CONFIG in mounted
    assert f"--config={mounted[COLLECTOR_CONFIG]}" in collector["command"]
    assert "jaeger" in collector["depends_on"]

    jaeger = services["jaeger"]
    assert jaeger["image"].startswith("jaegertracing/all-in-one:")
    assert ("16686", "16686") in _ports(jaeger)
    assert _environment(jaeger)["COLLECTOR_OTLP_ENABLED"] == "true"

    for service in services.values():
        if "image" in service and "build" not in service:
            tag = service["image"].rpartition(":")[2]
            assert tag and tag != "latest" and "/" not in tag, f"unpinned {service['image']}"


@needs_yaml
def test_collector_sends_otlp_traces_to_jaeger() -> None:
    config = yaml.safe_load(COLLECTOR_CONFIG.read_text())
    protocols = config["receivers"]["otlp"]["protocols"]
    assert protocols["grpc"]["endpoint"] == "0.0.0.0:4317"
    assert protocols["http"]["endpoint"] == "0.0.0.0:4318"

    traces = config["service"]["pipelines"]["traces"]
    assert "otlp" in traces["receivers"]
    assert "batch" in traces["processors"]
    # The otlp exporter (`otlp` or a named `otlp/...`) that points at Jaeger, and debug.
    to_jaeger = [
        name
        for name in traces["exporters"]
        if name.split("/")[0] == "otlp"
        and config["exporters"][name]["endpoint"] == "jaeger:4317"
        and config["exporters"][name]["tls"]["insecure"] is True
    ]
    assert to_jaeger
    assert "debug" in traces["exporters"]
    # Every component the pipelines name is defined.
    for pipeline in config["service"]["pipelines"].values():
        for kind in ("receivers", "processors", "exporters"):
            for name in pipeline.get(kind, []):
                assert name in config[kind], f"{kind}: {name} is not defined"


def test_example_config_loads(monkeypatch: pytest.MonkeyPatch) -> None:
    from rlm_orchestrator.service.settings import load_server_settings

    for name in list(os.environ):
        if name.startswith("RLM_SERVER_"):
            monkeypatch.delenv(name)
    settings = load_server_settings(EXAMPLE_CONFIG)
    assert settings.listen == "0.0.0.0:50051"
    assert settings.auth_token is None  # the token comes from the environment
    assert settings.environment == "local"
    assert len(settings.models) >= 2
    assert {m.api_key_env for m in settings.models} == {"OPENAI_API_KEY"}
    assert all(m.api_key is None for m in settings.models)

    monkeypatch.setenv("RLM_SERVER_AUTH_TOKEN", TOKEN)
    token = load_server_settings(EXAMPLE_CONFIG).auth_token
    assert token is not None and token.get_secret_value() == TOKEN


def test_dockerfile_matches_compose() -> None:
    text = DOCKERFILE.read_text()
    assert "ARG BASE_IMAGE=python:3.11-slim" in text
    assert "EXPOSE 50051" in text
    assert 'ENTRYPOINT ["rlm-orchestrator"]' in text
    assert 'CMD ["serve", "--config", "/etc/rlm/rlm.toml"]' in text
    assert "LITELLM_LOCAL_MODEL_COST_MAP=True" in text
    user = [line.split()[1] for line in text.splitlines() if line.startswith("USER ")]
    assert user and user[-1] not in ("root", "0", "0:0")


def test_dockerfile_copies_every_package_of_the_wheel() -> None:
    """`pip install .` in the image builds the wheel from what was copied: a package missing
    from the COPY lines (say, a new top-level one) would be missing from the image."""
    import tomllib

    with (REPO / "pyproject.toml").open("rb") as f:
        packages = tomllib.load(f)["tool"]["hatch"]["build"]["targets"]["wheel"]["packages"]
    text = DOCKERFILE.read_text()
    assert packages
    for package in packages:
        assert f"COPY {package}/ {package}/" in text, package


# -- the agent's launch: deploy/ agrees with rlm_orchestrator/sandbox/launch.py -------------


def test_deploy_files_name_one_agent_token_variable() -> None:
    """Every token variable in deploy/ is the server's or the agents' (the one the agent reads
    and the fleet / Kubernetes providers send from): no second name for the same secret."""
    from rlm_orchestrator.sandbox.launch import TOKEN_ENV

    named = {
        name
        for path in DEPLOY.rglob("*")
        if path.is_file()
        for name in re.findall(r"\bRLM_[A-Z_]*TOKEN[A-Z_]*\b", path.read_text(errors="replace"))
    }
    assert named == {"RLM_SERVER_AUTH_TOKEN", TOKEN_ENV}


@needs_yaml
def test_compose_gives_the_orchestrator_no_agent_token(resolved: str) -> None:
    """Its sandboxes are local (or Docker) agents: each gets a token of its own through a pipe
    (or none, behind a unix socket); no agent token belongs in the orchestrator's environment."""
    from rlm_orchestrator.sandbox.launch import TOKEN_ENV

    orchestrator = yaml.safe_load(resolved)["services"]["orchestrator"]
    assert TOKEN_ENV not in _environment(orchestrator)


def test_the_sandbox_image_runs_the_agent_the_providers_pass_flags_to() -> None:
    from rlm_orchestrator.sandbox.launch import AGENT_MODULE, CONTAINER_WORKDIR

    text = (DEPLOY / "sandbox.Dockerfile").read_text()
    assert f'ENTRYPOINT ["python3", "-m", "{AGENT_MODULE}"]' in text
    # Its only writable place is the tmpfs the providers mount and the launch's workdir is in.
    assert "mkdir -p -m 1777 /work" in text and CONTAINER_WORKDIR.startswith("/work/")
