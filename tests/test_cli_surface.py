"""The CLI's front door, as a user meets it: every bad input is one line on stderr naming what
is wrong (and the file), exit code 2 for a usage or configuration error and 1 for a failure at
run time, no traceback unless --debug; `serve` refuses a port in use; --help shows every
default and swallows no bracketed text; --version; --json without the context.

The refusals run the real CLI in a subprocess (`python -m rlm_orchestrator`), which has ended
when subprocess.run returns: nothing is left running.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import typer
from conftest import API_KEY, ServerProcess, repl
from typer.testing import CliRunner

from rlm_orchestrator.cli import DEFAULT_SERVER_LISTEN, app
from rlm_orchestrator.config.run import RunSettings
from rlm_orchestrator.testing.scripted_lm import Rule, ScriptedLMServer

CLI = [sys.executable, "-m", "rlm_orchestrator"]
NOBODY = 65534


def cli(
    *args: str, cwd: Path | None = None, env: dict[str, str] | None = None, **kwargs: Any
) -> subprocess.CompletedProcess[str]:
    base = {k: v for k, v in os.environ.items() if not k.startswith(("RLM_RUN_", "RLM_SERVER_"))}
    return subprocess.run(
        [*CLI, *args],
        capture_output=True,
        text=True,
        env={**base, "OPENAI_API_KEY": API_KEY, **(env or {})},
        cwd=cwd,
        timeout=120,
        check=False,
        **kwargs,
    )


def one_line(done: subprocess.CompletedProcess[str], code: int, *named: str) -> str:
    """The refusal: exit `code`, one line on stderr naming each of `named`, no traceback."""
    assert done.returncode == code, (done.returncode, done.stderr)
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    assert "Traceback" not in done.stderr and done.stdout == ""
    for name in named:
        assert name in lines[0], lines[0]
    return lines[0]


@pytest.fixture
def context(tmp_path: Path) -> Path:
    path = tmp_path / "context.txt"
    path.write_text("some context")
    return path


# -- bad context files ----------------------------------------------------------------------------


def test_a_missing_context_file(tmp_path: Path) -> None:
    missing = tmp_path / "missing.txt"
    one_line(cli("run", "-c", str(missing), "-q", "?"), 2, str(missing), "no such file")


def test_a_binary_context_file(tmp_path: Path) -> None:
    binary = tmp_path / "blob.bin"
    binary.write_bytes(b"\x00\xff\xfe\x80 not text")
    one_line(cli("run", "-c", str(binary), "-q", "?"), 2, str(binary), "not UTF-8")


def test_a_directory_as_context(tmp_path: Path) -> None:
    one_line(cli("run", "-c", str(tmp_path), "-q", "?"), 2, str(tmp_path), "a directory")


def test_an_unreadable_context_file(context: Path) -> None:
    context.chmod(0)
    command = [*CLI, "run", "-c", str(context), "-q", "?"]
    if os.geteuid() == 0:  # root reads any file: the CLI runs as nobody (setpriv runs it)
        setpriv = shutil.which("setpriv")
        if setpriv is None:
            pytest.skip("root reads every file, and setpriv is missing")
        command = [setpriv, f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups", *command]
    try:
        done = subprocess.run(
            command, capture_output=True, text=True, cwd="/", timeout=120, check=False
        )
    finally:
        context.chmod(0o600)
    one_line(done, 2, str(context), "not readable")


def test_invalid_json_context(tmp_path: Path) -> None:
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    one_line(cli("run", "-c", str(bad), "-q", "?"), 2, str(bad), "not valid JSON")


# -- bad settings ---------------------------------------------------------------------------------


@pytest.mark.parametrize("named", [True, False])
def test_a_malformed_rlm_toml_is_named_with_its_line(
    tmp_path: Path, context: Path, named: bool
) -> None:
    (tmp_path / "rlm.toml").write_text('[run]\nmodel = "m"\nmax_depth = \n')
    flags = ["--config", "rlm.toml"] if named else []  # ./rlm.toml is read when it is there
    done = cli("run", "-c", str(context), "-q", "?", *flags, cwd=tmp_path)
    one_line(done, 2, "rlm.toml", "line 3")


def test_a_wrong_type_in_rlm_toml(tmp_path: Path, context: Path) -> None:
    (tmp_path / "rlm.toml").write_text('[run]\nmax_iterations = "many"\n')
    done = cli("run", "-c", str(context), "-q", "?", cwd=tmp_path)
    one_line(done, 2, "rlm.toml", "run.max_iterations", "'many'")


def test_a_malformed_server_config(tmp_path: Path) -> None:
    config = tmp_path / "server.toml"
    config.write_text("listen = \n")
    one_line(cli("serve", "--config", str(config)), 2, str(config), "line 1")


# Modules that take most of a second or more to import: none may load before a refusal.
SLOW_IMPORTS = ("litellm", "openai", "httpx", "grpc", "rlm_orchestrator.rlm")


@pytest.mark.parametrize(
    ("flag", "value", "named"),
    [
        ("--backend", "bogus", "unknown backend"),
        ("--environment", "bogus", "'local'"),
    ],
)
def test_an_unknown_backend_or_environment_before_any_slow_import(
    context: Path, flag: str, value: str, named: str
) -> None:
    one_line(cli("run", "-c", str(context), "-q", "?", flag, value), 2, flag, "'bogus'", named)
    probe = (
        "import sys\n"
        "from rlm_orchestrator.cli import main\n"
        f"sys.argv = ['rlm-orchestrator', 'run', '-c', {str(context)!r}, '-q', '?', "
        f"{flag!r}, {value!r}]\n"
        "try:\n"
        "    main()\n"
        "except SystemExit as exc:\n"
        "    print('exit', exc.code)\n"
        "print(*sorted(sys.modules), sep='\\n')\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, timeout=60, check=True
    )
    first, *modules = done.stdout.splitlines()
    assert first == "exit 2"
    assert [m for m in modules if m.split(".")[0] in SLOW_IMPORTS or m in SLOW_IMPORTS] == []


@pytest.mark.parametrize(
    ("args", "named"),
    [
        (["--max-iterations", "abc"], "'--max-iterations'"),
        (["--max-iteratons", "3"], "--max-iteratons"),
        (["--query"], "--query"),
    ],
)
def test_click_usage_errors_are_one_line_too(context: Path, args: list[str], named: str) -> None:
    done = cli("run", "-c", str(context), *(["-q", "?"] if args[0] != "--query" else []), *args)
    one_line(done, 2, named)


@pytest.mark.parametrize("server", [[], ["--server", "127.0.0.1:9"]])
def test_a_negative_timeout(context: Path, server: list[str]) -> None:
    done = cli("run", "-c", str(context), "-q", "?", "--timeout", "-1", *server)
    one_line(done, 2, "--timeout", "greater than 0")


def test_an_unexpected_error_is_one_line_and_debug_shows_its_traceback(
    tmp_path: Path, context: Path
) -> None:
    """A failure at run time that is no RLMError (here: --log-dir is a file)."""
    log_dir = tmp_path / "not-a-dir"
    log_dir.write_text("")
    args = ["run", "-c", str(context), "-q", "?", "--log-dir", str(log_dir), "--quiet"]
    one_line(cli(*args), 1, "error:", "--debug")
    for debug in (cli("--debug", *args), cli(*args, "--debug")):  # before or after `run`
        assert debug.returncode == 1 and "Traceback" in debug.stderr, debug.stderr


def test_failures_at_run_time_are_one_line(context: Path) -> None:
    """Exit code 1: an LM server that cannot be reached (named by its URL), an orchestrator
    server that cannot be reached."""
    with socket.socket() as probe:  # a port nobody listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    base = f"http://127.0.0.1:{port}/v1"
    args = ["run", "-c", str(context), "-q", "?", "--quiet"]
    line = one_line(cli(*args, "--api-base", base), 1, "LMError", base)
    assert "HTTP 500" not in line
    one_line(cli(*args, "--server", f"127.0.0.1:{port}"), 1, f"127.0.0.1:{port}")


# -- serve ----------------------------------------------------------------------------------------


def test_serve_refuses_a_port_in_use(orchestrator_server: ServerProcess) -> None:
    config, address = str(orchestrator_server.config), orchestrator_server.address
    done = cli("serve", "--config", config, "--listen", address)
    one_line(done, 1, orchestrator_server.address, "address already in use")
    assert orchestrator_server.process.poll() is None  # the first one still serves


def test_the_agent_refuses_a_port_in_use() -> None:
    agent = [sys.executable, "-m", "sandbox_agent"]
    with subprocess.Popen(
        [*agent, "--listen", "127.0.0.1:0"], stdout=subprocess.PIPE, text=True
    ) as first:
        assert first.stdout is not None
        port = first.stdout.readline().split()[-1]  # LISTENING port N
        try:
            second = subprocess.run(
                [*agent, "--listen", f"127.0.0.1:{port}"],
                capture_output=True,
                text=True,
                timeout=60,
            )
            assert first.poll() is None  # the first one still serves
        finally:
            first.send_signal(signal.SIGTERM)
            first.communicate(timeout=60)
    assert second.returncode == 1 and "Traceback" not in second.stderr, second.stderr
    assert f"could not listen on 127.0.0.1:{port}" in second.stderr.splitlines()[-1]


# -- help and version -----------------------------------------------------------------------------


def _commands(command: Any, path: tuple[str, ...] = ()) -> list[tuple[tuple[str, ...], Any]]:
    """Every command under `command` (typer's own click: found by its attributes)."""
    found = [(path, command)]
    if hasattr(command, "commands"):
        for name, sub in command.commands.items():
            found += _commands(sub, (*path, name))
    return found


# Flags whose default lives in the settings (the flag itself defaults to "not given"): the
# default --help shows, and the setting's.
SETTINGS = RunSettings()
REAL_DEFAULTS = {
    "--model": SETTINGS.model,
    "--backend": SETTINGS.backend,
    "--environment": SETTINGS.environment,
    "--exec-timeout": f"{SETTINGS.sandbox.limits.exec_timeout_seconds:g}",
    "--max-iterations": str(SETTINGS.max_iterations),
    "--max-depth": str(SETTINGS.max_depth),
    "--listen": DEFAULT_SERVER_LISTEN,
}
# The same flags where another command defaults them otherwise.
COMMAND_DEFAULTS = {(("replay",), "--environment"): "the recorded one"}


def test_help_of_every_command_shows_defaults_and_keeps_brackets() -> None:
    from rlm_orchestrator.service.settings import ServerSettings

    assert ServerSettings().listen == DEFAULT_SERVER_LISTEN
    root = typer.main.get_command(app)
    commands = _commands(root)
    assert {" ".join(path) for path, _ in commands} >= {"", "run", "serve", "demo", "trace list"}
    for path, command in commands:
        result = CliRunner().invoke(app, [*path, "--help"], terminal_width=100)
        assert result.exit_code == 0, result.output
        # Compared without whitespace: the help is wrapped (at hyphens too).
        shown = "".join(result.output.split())
        texts = [command.help or ""] + [
            p.help or "" for p in command.params if p.param_type_name == "option"
        ]
        for text in texts:  # no [...] eaten by markup
            for bracketed in re.findall(r"\[[^\]]*\]", " ".join(text.split())):
                assert "".join(bracketed.split()) in shown, (path, bracketed)
        ctx = command.context_class(command, info_name=" ".join(path) or "rlm-orchestrator")
        for param in command.params:
            if param.param_type_name != "option" or param.hidden or param.is_flag:
                continue
            record = param.get_help_record(ctx)
            assert record is not None
            help_text = " ".join(record[1].split())
            flag = max(param.opts, key=len)
            real = COMMAND_DEFAULTS.get((path, flag), REAL_DEFAULTS.get(flag))
            # Only where the flag's own default is "not given" (a real default is shown as is).
            if real is not None and param.default is None:
                assert f"[default: ({real})]" in help_text, (path, flag, help_text)
            elif param.default is not None:
                assert "[default: " in help_text, (path, flag, help_text)
            assert "".join(help_text.split()) in shown, (path, flag)
    run_help = CliRunner().invoke(app, ["run", "--help"], terminal_width=100).output
    assert "local, docker, modal, fleet, kubernetes" in " ".join(run_help.split())


def test_the_agent_help_shows_its_defaults() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "sandbox_agent", "--help"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    shown = " ".join(done.stdout.split())
    assert done.returncode == 0 and "(default: None)" not in shown
    for text in ("(default: 1000000)", "(default: off)", "(default: 666)", "(default: 128)"):
        assert text in shown, text


def test_version_of_both_commands() -> None:
    from rlm_orchestrator import __version__

    assert cli("--version").stdout == f"rlm-orchestrator {__version__}\n"
    agent = subprocess.run(
        [sys.executable, "-m", "sandbox_agent", "--version"], capture_output=True, text=True
    )
    assert agent.stdout == f"rlm-sandbox-agent {__version__}\n"


# -- results --------------------------------------------------------------------------------------


def test_json_leaves_the_context_out_and_api_key_is_sent(
    lm: ScriptedLMServer, tmp_path: Path
) -> None:
    context = tmp_path / "big.txt"
    context.write_text("CONTEXT-MARKER " * 2000)
    lm.set_sequence("cli-root", [repl("print(len(context))"), "FINAL(counted)"])
    args = ["run", "-c", str(context), "-q", "how long?", "--model", "cli-root"]
    args += ["--api-base", lm.base_url, "--api-key", "sk-from-the-flag", "--json", "--quiet"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.stderr
    data = json.loads(result.stdout)
    assert data["response"] == "counted" and "CONTEXT-MARKER" not in result.stdout
    assert lm.requests[0].api_key == "sk-from-the-flag"


def test_an_openai_compatible_server_needs_no_key_through_litellm(
    lm: ScriptedLMServer, context: Path
) -> None:
    """litellm's OpenAI client refuses to call without a key: the run sends a placeholder to a
    server of its own --api-base, with no OPENAI_API_KEY anywhere."""
    lm.set_sequence("keyless", ["FINAL(no key needed)"])
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OPENAI_", "RLM_RUN_"))}
    env["RLM_RUN_TRANSPORT"] = "litellm"
    api_base = ["--api-base", lm.base_url, "--quiet"]
    done = subprocess.run(
        [*CLI, "run", "-c", str(context), "-q", "?", "--model", "keyless", *api_base],
        capture_output=True,
        text=True,
        env=env,
        timeout=180,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout == "no key needed\n"


def test_ctrl_c_is_one_line_and_leaves_nothing(lm: ScriptedLMServer, context: Path) -> None:
    """SIGINT while the root model is thinking: exit 130, "interrupted", no traceback and no
    warning of the interpreter's teardown ("coroutine ... was never awaited", "Task was
    destroyed"); the sandbox is gone (the fixtures check for leaked agent processes)."""
    lm.set_sequence("slow", [Rule("FINAL(too late)", delay_seconds=5)])
    env = {**os.environ, "OPENAI_API_KEY": API_KEY}
    args = ["run", "-c", str(context), "-q", "?", "--model", "slow", "--api-base", lm.base_url]
    with subprocess.Popen(
        [*CLI, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env
    ) as process:
        assert process.stderr is not None
        seen = []
        for line in process.stderr:  # until the first turn has started
            seen.append(line)
            if "turn 1" in line:
                break
        process.send_signal(signal.SIGINT)
        out, rest = process.communicate(timeout=120)
    stderr = "".join(seen) + rest
    assert process.returncode == 130, stderr
    assert rest.strip() == "interrupted", stderr
    assert out == ""
