"""Every configuration surface refuses, at once and in one line naming the key, an unknown key,
a wrong type and a value out of range: RLM's arguments, environment_kwargs of each backend,
`run`'s flags, its [run] table and RLM_RUN_* variables, the server's file and RLM_SERVER_*
variables. No sandbox starts and no model is called: every refusal comes first.
"""

from __future__ import annotations

import ast
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from rlm_orchestrator import RLM
from rlm_orchestrator.cli import app
from rlm_orchestrator.config import SandboxLimits
from rlm_orchestrator.config.run import load_run_settings
from rlm_orchestrator.exceptions import ConfigurationError
from rlm_orchestrator.service.settings import ServerSettings, load_server_settings

ROOT = Path(__file__).resolve().parent.parent
LM = {"backend": "openai", "backend_kwargs": {"model_name": "m", "api_key": "unused"}}


def refused(make: Callable[[], Any], *named: str) -> str:
    """The one-line ConfigurationError `make` raises; it names each of `named`."""
    with pytest.raises(ConfigurationError) as caught:
        make()
    message = str(caught.value)
    assert "\n" not in message, message
    for name in named:
        assert name in message, message
    assert caught.value.__cause__ is None  # no pydantic report chained behind it
    return message


@pytest.fixture(autouse=True)
def _clean_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """No RLM_RUN_* / RLM_SERVER_* of the caller's, and no ./rlm.toml of the repo's."""
    import os

    for name in list(os.environ):
        if name.startswith(("RLM_RUN_", "RLM_SERVER_")):
            monkeypatch.delenv(name)
    monkeypatch.chdir(tmp_path)


# -- RLM(...) ------------------------------------------------------------------------------------


def test_rlm_arguments() -> None:
    with pytest.raises(TypeError, match="max_iteratons"):  # Python's own refusal, at once
        RLM(**LM, max_iteratons=3)  # type: ignore[call-arg]
    refused(lambda: RLM(**LM, max_iterations="abc"), "max_iterations", "'abc'")  # type: ignore[arg-type]
    refused(lambda: RLM(**LM, max_iterations=0), "max_iterations")
    refused(lambda: RLM(**LM, max_cost=-1.0), "max_cost")
    refused(lambda: RLM(**LM, timeout_seconds=float("inf")), "timeout_seconds")
    refused(lambda: RLM(**LM, max_depth=-1), "max_depth")
    refused(lambda: RLM(**LM, depth=-1), "depth")
    refused(lambda: RLM(**LM, environment="dokcer"), "environment", "'dokcer'")


# One key of each backend's own, with a wrong type and a value out of range.
BACKEND_KEYS = {
    "local": ("max_processes", "many", 2),
    "docker": ("memory_mb", "lots", 16),
    "modal": ("cpu", "fast", 0),
    "fleet": ("lease_ttl_seconds", "long", 0.5),
    "kubernetes": ("pool_size", "some", -1),
}


@pytest.mark.parametrize("environment", sorted(BACKEND_KEYS))
def test_environment_kwargs_of_each_backend(environment: str) -> None:
    key, wrong_type, out_of_range = BACKEND_KEYS[environment]

    def rlm(**kwargs: Any) -> Callable[[], RLM]:
        return lambda: RLM(**LM, environment=environment, environment_kwargs=kwargs)

    message = refused(rlm(memroy_mb=512), "environment_kwargs.memroy_mb", "unknown key")
    assert f"{environment} sandboxes take" in message  # and says which keys it takes
    refused(rlm(**{key: wrong_type}), f"environment_kwargs.{key}", repr(wrong_type))
    refused(rlm(**{key: out_of_range}), f"environment_kwargs.{key}")
    # The limits every backend shares.
    refused(rlm(exec_timeout_seconds="abc"), "environment_kwargs.exec_timeout_seconds")
    refused(rlm(exec_timeout_seconds=-1), "environment_kwargs.exec_timeout_seconds")
    refused(rlm(memory_limit_mb=-5), "environment_kwargs.memory_limit_mb")
    refused(rlm(memory_limit_mb=5), "environment_kwargs.memory_limit_mb", "at least 64")
    refused(rlm(max_output_chars=0), "environment_kwargs.max_output_chars")
    refused(rlm(startup_timeout_seconds=0), "environment_kwargs.startup_timeout_seconds")
    refused(rlm(setup_code=3), "environment_kwargs.setup_code")
    accepted = RLM(**LM, environment=environment, environment_kwargs={"memory_limit_mb": 0})
    assert accepted.sandbox.backend.type == environment
    assert accepted.sandbox.limits.memory_limit_mb == 0  # 0: no address-space limit


# -- rlm-orchestrator run ------------------------------------------------------------------------


def run_cli(tmp_path: Path, *args: str, env: dict[str, str] | None = None) -> tuple[int, str]:
    context = tmp_path / "context.txt"
    context.write_text("x")
    result = CliRunner().invoke(app, ["run", "-c", str(context), "-q", "?", *args], env=env)
    return result.exit_code, " ".join(result.stderr.split())


def test_run_flags(tmp_path: Path) -> None:
    code, stderr = run_cli(tmp_path, "--max-iteratons", "3")
    assert code == 2 and "--max-iteratons" in stderr
    code, stderr = run_cli(tmp_path, "--max-iterations", "abc")  # typer's own refusal
    assert code == 2 and "Invalid value for '--max-iterations'" in stderr
    for flag, value in (
        ("--max-iterations", "0"),
        ("--max-depth", "-1"),
        ("--exec-timeout", "-1"),
        ("--timeout", "0"),
        ("--max-cost", "-1"),
    ):
        code, stderr = run_cli(tmp_path, flag, value)
        assert code == 2 and f"configuration error: {flag}:" in stderr, stderr
    code, stderr = run_cli(tmp_path, "--environment", "dokcer")
    assert code == 2 and "--environment" in stderr and "'dokcer'" in stderr


def test_run_flags_that_mean_nothing_in_its_mode_are_refused(tmp_path: Path) -> None:
    for flag, value in (
        ("--backend", "anthropic"),
        ("--api-base", "http://x"),
        ("--environment", "docker"),
        ("--log-dir", "logs"),
        ("--config", "rlm.toml"),
    ):
        code, stderr = run_cli(tmp_path, "--server", "127.0.0.1:9", flag, value)
        assert code == 2 and f"{flag} means nothing with --server" in stderr, stderr
    code, stderr = run_cli(tmp_path, "--tls-ca", "ca.crt")
    assert code == 2 and "--tls-ca means nothing without --server" in stderr
    code, stderr = run_cli(tmp_path, "--token", "t")
    assert code == 2 and "--token means nothing without --server" in stderr
    # With --server, the flags are checked here too, before any call.
    code, stderr = run_cli(tmp_path, "--server", "127.0.0.1:9", "--max-iterations", "0")
    assert code == 2 and "--max-iterations" in stderr


def test_run_table_of_rlm_toml(tmp_path: Path) -> None:
    path = tmp_path / "rlm.toml"
    for text, named in (
        ("[run]\nmax_iteratons = 3\n", "rlm.toml: run.max_iteratons: unknown key"),
        ('[run]\nmax_iterations = "abc"\n', "rlm.toml: run.max_iterations"),
        ("[run]\nmax_depth = -1\n", "rlm.toml: run.max_depth"),
        (
            '[run]\nenvironment = "docker"\n[run.environment_kwargs]\nmemroy_mb = 1\n',
            "rlm.toml: run.environment_kwargs.memroy_mb: unknown key",
        ),
        (
            "[run.environment_kwargs]\nmemory_limit_mb = -5\n",
            "rlm.toml: run.environment_kwargs.memory_limit_mb",
        ),
        (
            '[run.environment_kwargs]\nexec_timeout_seconds = "abc"\n',
            "rlm.toml: run.environment_kwargs.exec_timeout_seconds",
        ),
        # A file for both commands is read by neither: the server's keys are refused here.
        ('listen = "127.0.0.1:50051"\n[run]\nmodel = "m"\n', "rlm.toml: listen"),
    ):
        path.write_text(text)
        refused(lambda: load_run_settings({}), named)
    path.write_text('[run.environment_kwargs]\nsetup_code = "import math"\nmemory_limit_mb = 0\n')
    assert load_run_settings({}).sandbox.limits.memory_limit_mb == 0  # as RLM takes them


def test_run_never_reads_a_server_config(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    server_config = 'listen = "127.0.0.1:0"\nsub_model = "mini"\n[[models]]\nname = "mini"\n'
    (tmp_path / "rlm.toml").write_text(server_config)
    settings = load_run_settings({})  # ./rlm.toml without [run]: not run's, not read
    assert settings.unread_file == Path("rlm.toml") and settings.sub_model is None
    monkeypatch.setenv("RLM_RUN_CONFIG", "rlm.toml")  # named on purpose: refused
    refused(lambda: load_run_settings({}), "rlm.toml", "no [run] table")
    monkeypatch.delenv("RLM_RUN_CONFIG")
    refused(lambda: load_run_settings({}, Path("missing.toml")), "missing.toml", "not exist")


def test_run_environment_variables(monkeypatch: pytest.MonkeyPatch) -> None:
    for name, value, named in (
        ("RLM_RUN_MAX_ITERATONS", "3", "did you mean RLM_RUN_MAX_ITERATIONS?"),
        ("RLM_RUN_MAX_ITERATIONS", "abc", "RLM_RUN_MAX_ITERATIONS"),
        ("RLM_RUN_MAX_COST", "-1", "RLM_RUN_MAX_COST"),
        ("RLM_RUN_ENVIRONMENT_KWARGS__MEMROY_MB", "1", "environment_kwargs.memroy_mb"),
        ("RLM_RUN_ENVIRONMENT_KWARGS__EXEC_TIMEOUT_SECONDS", "-1", "exec_timeout_seconds"),
    ):
        monkeypatch.setenv(name, value)
        refused(lambda: load_run_settings({}), name, named)
        monkeypatch.delenv(name)
    monkeypatch.setenv("RLM_MAX_ITERATIONS", "3")  # its name before RLM_RUN_
    refused(lambda: load_run_settings({}), "RLM_MAX_ITERATIONS", "RLM_RUN_MAX_ITERATIONS")
    monkeypatch.delenv("RLM_MAX_ITERATIONS")
    # Flags win over variables, variables over the file.
    (Path("rlm.toml")).write_text('[run]\nmodel = "from-file"\nmax_depth = 2\n')
    monkeypatch.setenv("RLM_RUN_MODEL", "from-env")
    settings = load_run_settings({"max_depth": 0})
    assert (settings.model, settings.max_depth) == ("from-env", 0)


# -- rlm-orchestrator serve ----------------------------------------------------------------------


def test_server_file(tmp_path: Path) -> None:
    path = tmp_path / "server.toml"
    for text, named in (
        ("max_dpeth = 2\n", "server.toml: max_dpeth: unknown key"),
        ('max_depth = "two"\n', "server.toml: max_depth"),
        ("exec_timeout_seconds = -1\n", "server.toml: exec_timeout_seconds"),
        ('environment = "dokcer"\n', "server.toml: environment"),
        ('[[models]]\nname = "m"\nmax_concurency = 2\n', "server.toml: models[0].max_concurency"),
        (
            'environment = "docker"\n[environment_kwargs]\nimgae = "x"\n',
            "server.toml: environment_kwargs.imgae: unknown key",
        ),
        (
            '[environment_kwargs]\nmax_output_chars = "many"\n',
            "server.toml: environment_kwargs.max_output_chars",
        ),
        (
            "[environment_kwargs]\nmemory_limit_mb = -5\n",
            "server.toml: environment_kwargs.memory_limit_mb",
        ),
        # One place for the block timeout: the top-level ceiling, which requests stay under.
        (
            "[environment_kwargs]\nexec_timeout_seconds = 60\n",
            "server.toml: environment_kwargs.exec_timeout_seconds: set it at the top level",
        ),
        # run's settings are not the server's.
        ('[run]\nmodel = "m"\n', "server.toml: run:"),
    ):
        path.write_text(text)
        refused(lambda: load_server_settings(path), named)


def test_server_environment_variables(monkeypatch: pytest.MonkeyPatch) -> None:
    for name, value, named in (
        ("RLM_SERVER_MAX_DPETH", "2", "did you mean RLM_SERVER_MAX_DEPTH?"),
        ("RLM_SERVER_MAX_DEPTH", "two", "RLM_SERVER_MAX_DEPTH"),
        ("RLM_SERVER_MAX_SANDBOXES", "0", "RLM_SERVER_MAX_SANDBOXES"),
        ("RLM_SERVER_ENVIRONMENT_KWARGS", '{"memroy": 1}', "environment_kwargs.memroy"),
        ("RLM_SERVER_ENVIRONMENT_KWARGS__MEMORY_LIMIT_MB", "-5", "memory_limit_mb"),
    ):
        monkeypatch.setenv(name, value)
        refused(lambda: load_server_settings(), name, named)
        monkeypatch.delenv(name)
    monkeypatch.setenv("RLM_SERVER_TOKEN", "a client's")  # not the server's: allowed
    assert load_server_settings().max_depth == 1


def test_server_sets_the_limits_of_its_sandboxes(tmp_path: Path) -> None:
    """startup_timeout_seconds, max_output_chars and memory_limit_mb come from the server's
    environment_kwargs; each block's timeout from the request, under the top-level ceiling."""
    from rlm_orchestrator.config import LocalConfig
    from rlm_orchestrator.router import LMClientConfig, LMRouter
    from rlm_orchestrator.sandbox import create_provider
    from rlm_orchestrator.sandbox.limits import SandboxPool
    from rlm_orchestrator.service.admission import request_limits
    from rlm_orchestrator.service.orchestrator_service import OrchestratorService
    from rlm_orchestrator.service.tenants import Tenants
    from rlm_wire.v1 import orchestrator_pb2 as pb

    path = tmp_path / "server.toml"
    path.write_text(
        "exec_timeout_seconds = 600\n[environment_kwargs]\nstartup_timeout_seconds = 120\n"
        "max_output_chars = 5000\nmemory_limit_mb = 256\n"
    )
    settings = load_server_settings(path)
    router = LMRouter(LMClientConfig.from_backend("openai", {"model_name": "m"}), [])
    pool = SandboxPool(create_provider(LocalConfig()), limit=1)  # made, never used
    service = OrchestratorService(settings, router, pool, Tenants(settings))
    options = pb.CompletionOptions(exec_timeout_seconds=7.0)
    runner = service._make_runner(router, request_limits(options, settings), options, pool)
    assert runner.settings.sandbox == SandboxLimits(
        exec_timeout_seconds=7.0,
        max_output_chars=5000,
        memory_limit_mb=256,
        startup_timeout_seconds=120,
    )


def test_deployed_server_configs_load() -> None:
    for path in (
        ROOT / "deploy" / "orchestrator.example.toml",
        ROOT / "deploy" / "kubernetes" / "base" / "orchestrator-config" / "rlm.toml",
        ROOT / "deploy" / "kubernetes" / "overlays" / "pod-per-session" / "rlm.toml",
    ):
        assert isinstance(load_server_settings(path), ServerSettings)


# -- the agent -----------------------------------------------------------------------------------


def test_the_agent_has_no_exec_timeout_flag() -> None:
    """Every Execute call carries its block's timeout: a launch flag would be overridden."""
    from sandbox_agent.__main__ import parse_args

    with pytest.raises(SystemExit):
        parse_args(["--listen", "unix:/tmp/x.sock", "--exec-timeout", "3"])


# -- each default defined once -------------------------------------------------------------------

# The big ones, as settings, keyword arguments and the agent's flags.
DEFAULTED = {
    "exec_timeout_seconds": "--exec-timeout",
    "max_output_chars": "--max-output-chars",
    "memory_limit_mb": "--memory-limit-mb",
    "startup_timeout_seconds": "--startup-timeout",
    "max_iterations": "--max-iterations",
    "max_depth": "--max-depth",
}


def _literal(node: ast.AST | None) -> bool:
    """A number written out (0, the "not set" of the agent's flags, is no default)."""
    return (
        isinstance(node, ast.Constant)
        and isinstance(node.value, int | float)
        and not isinstance(node.value, bool)
        and node.value != 0
    )


def _default_sites(tree: ast.AST) -> list[tuple[str, int]]:
    """(name, line) of every number written as a default of one of DEFAULTED."""
    sites: list[tuple[str, int]] = []
    flags = {flag: name for name, flag in DEFAULTED.items()}
    for node in ast.walk(tree):
        if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            value = node.value
            if isinstance(value, ast.Call):  # Field(300.0, ...) / Field(default=300.0)
                value = next(
                    (k.value for k in value.keywords if k.arg == "default"),
                    value.args[0] if value.args else None,
                )
            if node.target.id in DEFAULTED and _literal(value):
                sites.append((node.target.id, node.lineno))
        elif isinstance(node, ast.Assign):
            for target in node.targets:  # DEFAULT_EXEC_TIMEOUT_SECONDS = 300.0
                name = (
                    target.id.removeprefix("DEFAULT_").lower()
                    if isinstance(target, ast.Name)
                    else ""
                )
                if name in DEFAULTED and _literal(node.value):
                    sites.append((name, node.lineno))
        elif isinstance(node, ast.arguments):
            positional = node.posonlyargs + node.args
            pairs = list(
                zip(positional[len(positional) - len(node.defaults) :], node.defaults, strict=True)
            )
            pairs += [
                (a, d)
                for a, d in zip(node.kwonlyargs, node.kw_defaults, strict=True)
                if d is not None
            ]
            sites += [(a.arg, d.lineno) for a, d in pairs if a.arg in DEFAULTED and _literal(d)]
        elif isinstance(node, ast.Call):
            sites += [
                (k.arg, k.value.lineno)
                for k in node.keywords
                if k.arg in DEFAULTED and _literal(k.value)
            ]
            first = node.args[0] if node.args else None
            key = first.value if isinstance(first, ast.Constant) else None
            if isinstance(key, str):  # .get("max_output_chars", 1_000_000), add_argument(...)
                fallback = node.args[1] if len(node.args) > 1 else None
                default = next((k.value for k in node.keywords if k.arg == "default"), fallback)
                name = flags.get(key, key)
                if name in DEFAULTED and _literal(default):
                    sites.append((name, node.lineno))
    return sites


def test_each_default_is_written_once() -> None:
    sites: dict[str, list[str]] = {name: [] for name in DEFAULTED}
    for package in ("rlm_orchestrator", "sandbox_agent"):
        for path in sorted((ROOT / package).rglob("*.py")):
            if "_proto" in path.parts:
                continue
            relative = path.relative_to(ROOT)
            for name, line in _default_sites(ast.parse(path.read_text(), str(path))):
                sites[name].append(f"{relative}:{line}")
    written_twice = {name: where for name, where in sites.items() if len(where) > 1}
    assert not written_twice, f"defaults written more than once: {written_twice}"
    # And the ones both sides use are the agent's, taken by the orchestrator's models.
    from sandbox_agent.executor import ExecutorConfig
    from sandbox_agent.limits import DEFAULT_EXEC_TIMEOUT_SECONDS, DEFAULT_MAX_OUTPUT_CHARS

    limits = SandboxLimits()
    assert limits.exec_timeout_seconds == DEFAULT_EXEC_TIMEOUT_SECONDS
    assert limits.max_output_chars == DEFAULT_MAX_OUTPUT_CHARS
    fields = ExecutorConfig.__dataclass_fields__
    assert fields["exec_timeout_seconds"].default == DEFAULT_EXEC_TIMEOUT_SECONDS
    assert ServerSettings().exec_timeout_seconds == DEFAULT_EXEC_TIMEOUT_SECONDS
