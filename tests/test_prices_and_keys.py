"""Prices and keys for local models from every surface (issue 19): `run`'s price flags,
variables and [run] table; a max_cost that an unpriced model makes unenforceable is said (RLM's
UnpricedModelWarning, run's warning line, a Notice to a server request); keyless
OpenAI-compatible servers need no dummy key on either transport, and a provider that does need
one is refused up front instead of failing after retries. The scripted LM over real HTTP.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import warnings
from pathlib import Path
from typing import Any

import pytest
from conftest import ROOT_MODEL, SUB_MODEL, backend_kwargs, repl
from typer.testing import CliRunner

from rlm_orchestrator import RLM, ConfigurationError, UnpricedModelWarning
from rlm_orchestrator import events as ev
from rlm_orchestrator.cli import app
from rlm_orchestrator.config.run import load_run_settings
from rlm_orchestrator.service.settings import ModelSettings
from rlm_orchestrator.testing.scripted_lm import ScriptedLMServer

CLI = [sys.executable, "-m", "rlm_orchestrator"]


def run_in_process(*args: str) -> tuple[int, str, str]:
    result = CliRunner().invoke(app, list(args))
    if result.exception and not isinstance(result.exception, SystemExit):
        raise result.exception
    return result.exit_code, result.stdout, result.stderr


@pytest.fixture
def context(tmp_path: Path) -> Path:
    path = tmp_path / "context.txt"
    path.write_text("alpha beta gamma")
    return path


@pytest.fixture
def no_run_variables(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    for name in list(os.environ):
        if name.startswith("RLM_RUN_"):
            monkeypatch.delenv(name)
    monkeypatch.chdir(tmp_path)  # no ./rlm.toml


# --- the warning: max_cost with a model that has no price ------------------------------------


def test_max_cost_with_an_unpriced_model_warns(lm: ScriptedLMServer) -> None:
    with pytest.warns(UnpricedModelWarning, match=r"max_cost=\$1 cannot be enforced.*'root'"):
        RLM(backend_kwargs=backend_kwargs(lm, ROOT_MODEL), max_cost=1.0)


def test_the_warning_names_only_the_unpriced_models(lm: ScriptedLMServer) -> None:
    priced_root = backend_kwargs(lm, ROOT_MODEL, input_cost_per_token=0.0)
    with pytest.warns(UnpricedModelWarning) as caught:
        RLM(
            backend_kwargs=priced_root,
            other_backends=["openai"],
            other_backend_kwargs=[backend_kwargs(lm, SUB_MODEL)],
            max_cost=1.0,
        )
    (warning,) = caught
    assert "'sub'" in str(warning.message) and "'root'" not in str(warning.message)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"input_cost_per_token": 1e-6},  # a price set, whatever litellm knows
        {"output_cost_per_token": 0.0},  # free, said on purpose
        {"model_name": "gpt-4o-mini"},  # in litellm's price table
    ],
)
def test_a_priced_model_or_no_budget_gives_no_warning(
    lm: ScriptedLMServer, kwargs: dict[str, Any]
) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        RLM(backend_kwargs={**backend_kwargs(lm, ROOT_MODEL), **kwargs}, max_cost=1.0)
        RLM(backend_kwargs=backend_kwargs(lm, ROOT_MODEL))  # no max_cost


def test_a_model_litellm_prices_at_zero_cannot_hold_a_budget(lm: ScriptedLMServer) -> None:
    # litellm's table lists some local and free-tier models at $0: a budget never stops them.
    kwargs = {"model_name": "gemma-3-27b-it", "api_key": "k"}
    with pytest.warns(UnpricedModelWarning, match="'gemma-3-27b-it'"):
        RLM(backend="gemini", backend_kwargs=kwargs, max_cost=1.0)


def test_run_warns_on_one_line_even_when_quiet(
    lm: ScriptedLMServer, context: Path, no_run_variables: None
) -> None:
    lm.set_sequence("local-model", ["FINAL(done)"])
    args = ["run", "-c", str(context), "-q", "?", "--model", "local-model"]
    code, stdout, stderr = run_in_process(
        *args, "--api-base", lm.base_url, "--max-cost", "0.5", "--quiet"
    )
    assert code == 0, stderr
    assert stdout == "done\n"
    (line,) = stderr.strip().splitlines()
    assert line.startswith("warning: max_cost=$0.5 cannot be enforced for the model 'local-model'")
    assert "--input-cost-per-token" in line


# --- prices from run's flags, variables and [run] table --------------------------------------


def test_run_prices_the_root_and_sub_model_from_its_flags(
    lm: ScriptedLMServer, context: Path, no_run_variables: None
) -> None:
    lm.set_sequence("local-root", [repl("print(llm_query('hi'))"), "FINAL(done)"])
    lm.set_sequence("local-sub", ["hello"])
    code, stdout, stderr = run_in_process(
        "run",
        "-c",
        str(context),
        "-q",
        "?",
        "--model",
        "local-root",
        "--sub-model",
        "local-sub",
        "--api-base",
        lm.base_url,
        "--input-cost-per-token",
        "0.001",
        "--output-cost-per-token",
        "0.002",
        "--max-cost",
        "100",
        "--json",
        "--quiet",
    )
    assert code == 0, stderr
    assert "warning" not in stderr
    usage = json.loads(stdout)["usage_summary"]["model_usage_summaries"]
    assert set(usage) == {"local-root", "local-sub"}
    for model in usage.values():
        expected = model["total_input_tokens"] * 0.001 + model["total_output_tokens"] * 0.002
        assert model["total_cost"] == pytest.approx(expected) and expected > 0


def test_run_stops_a_priced_local_model_at_max_cost(
    lm: ScriptedLMServer, context: Path, no_run_variables: None
) -> None:
    lm.set_sequence("local-root", [repl("x = 1"), "FINAL(never)"])
    args = ["run", "-c", str(context), "-q", "?", "--model", "local-root"]
    code, stdout, stderr = run_in_process(
        *args, "--api-base", lm.base_url, "--input-cost-per-token", "0.01", "--max-cost", "0.01"
    )
    assert code == 1 and stdout == ""
    assert "CostLimitExceededError" in stderr
    assert len(lm.requests_for("local-root")) == 1


def test_prices_come_from_variables_and_the_run_table(
    no_run_variables: None, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    (tmp_path / "rlm.toml").write_text(
        "[run]\ninput_cost_per_token = 1e-7\noutput_cost_per_token = 2e-7\n"
    )
    settings = load_run_settings({})
    assert (settings.input_cost_per_token, settings.output_cost_per_token) == (1e-7, 2e-7)
    monkeypatch.setenv("RLM_RUN_OUTPUT_COST_PER_TOKEN", "3e-7")
    assert load_run_settings({}).output_cost_per_token == 3e-7
    flags = {"output_cost_per_token": 4e-7}
    assert load_run_settings(flags).output_cost_per_token == 4e-7


def test_a_negative_price_is_refused_naming_where_it_came_from(
    no_run_variables: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    with pytest.raises(ConfigurationError, match="--input-cost-per-token"):
        load_run_settings({"input_cost_per_token": -1.0})
    monkeypatch.setenv("RLM_RUN_OUTPUT_COST_PER_TOKEN", "-1")
    with pytest.raises(ConfigurationError, match="RLM_RUN_OUTPUT_COST_PER_TOKEN"):
        load_run_settings({})


def test_price_flags_mean_nothing_with_server(no_run_variables: None, context: Path) -> None:
    args = ["run", "-c", str(context), "-q", "?", "--server", "127.0.0.1:1"]
    code, _, stderr = run_in_process(*args, "--input-cost-per-token", "0.1")
    assert code == 2 and "--input-cost-per-token means nothing with --server" in stderr


def test_a_servers_model_takes_prices_and_refuses_negative_ones() -> None:
    model = ModelSettings(name="local", api_base="http://127.0.0.1:1/v1", input_cost_per_token=1e-6)
    assert model.client_config().input_cost_per_token == 1e-6
    with pytest.raises(ValueError, match="output_cost_per_token"):
        ModelSettings(name="local", output_cost_per_token=-1.0)


def test_a_server_request_with_max_cost_and_an_unpriced_model_gets_a_notice(
    orchestrator_server: Any, lm: ScriptedLMServer
) -> None:
    notices: list[str] = []

    def on_event(event: ev.Event) -> None:
        if isinstance(event, ev.Notice):
            notices.append(event.text)

    client = orchestrator_server.client()
    try:
        lm.set_sequence(ROOT_MODEL, ["FINAL(a)", "FINAL(b)"])
        assert client.completion("ctx", None, on_event=on_event).response == "a"
        assert notices == []  # no budget: nothing to say
        client.completion("ctx", None, max_cost=1.0, on_event=on_event)
    finally:
        client.close()
    (notice,) = notices
    assert "max_cost=$1 cannot be enforced for the models 'root', 'sub'" in notice


# --- keys: keyless servers of one's own, and providers that need one -------------------------


@pytest.mark.parametrize("backend", ["openai", "vllm"])
def test_a_keyless_server_needs_no_key_on_the_lean_path(
    lm: ScriptedLMServer,
    context: Path,
    no_run_variables: None,
    monkeypatch: pytest.MonkeyPatch,
    backend: str,
) -> None:
    for name in ("OPENAI_API_KEY", "HOSTED_VLLM_API_KEY"):
        monkeypatch.delenv(name, raising=False)
    lm.set_sequence("anything", ["FINAL(no key needed)"])
    args = ["run", "-c", str(context), "-q", "?", "--model", "anything", "--backend", backend]
    code, stdout, stderr = run_in_process(*args, "--api-base", lm.base_url, "--quiet")
    assert code == 0, stderr
    assert stdout == "no key needed\n"
    (request,) = lm.requests
    # litellm sends vLLM a "fake-api-key"; the lean path does the same, and OpenAI none.
    assert request.api_key == (None if backend == "openai" else "fake-api-key")


def test_a_keyless_vllm_server_needs_no_key_through_litellm(
    lm: ScriptedLMServer, context: Path
) -> None:
    lm.set_sequence("anything", ["FINAL(no key needed)"])
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("OPENAI_", "RLM_RUN_", "HOSTED_VLLM_"))
    }
    env["RLM_RUN_TRANSPORT"] = "litellm"
    args = ["run", "-c", str(context), "-q", "?", "--model", "anything", "--backend", "vllm"]
    done = subprocess.run(
        [*CLI, *args, "--api-base", lm.base_url, "--quiet"],
        capture_output=True,
        text=True,
        env=env,
        timeout=180,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout == "no key needed\n"


@pytest.mark.parametrize("transport", ["auto", "litellm"])
def test_a_provider_that_needs_a_key_is_refused_before_any_call(
    context: Path, no_run_variables: None, monkeypatch: pytest.MonkeyPatch, transport: str
) -> None:
    """No api_base: OpenAI's own API, which needs a key. Refused at once (exit 2), not after
    4 "HTTP 500" attempts of a call litellm never sent."""
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    monkeypatch.setenv("RLM_RUN_TRANSPORT", transport)
    args = ["run", "-c", str(context), "-q", "?", "--model", "gpt-4o-mini", "--quiet"]
    code, stdout, stderr = run_in_process(*args)
    assert (code, stdout) == (2, "")
    (line,) = stderr.strip().splitlines()
    assert "no API key for openai: set OPENAI_API_KEY" in line and "500" not in line


def test_rlm_refuses_a_missing_key_before_a_sandbox_starts(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv("ANTHROPIC_API_KEY", raising=False)
    rlm = RLM(backend="anthropic", backend_kwargs={"model_name": "claude-sonnet-4-5"})
    with pytest.raises(ConfigurationError, match="set ANTHROPIC_API_KEY"):
        rlm.completion("ctx")
    # With a key from the environment, or a server of one's own, nothing is refused up front.
    monkeypatch.setenv("ANTHROPIC_API_KEY", "sk-ant-test")
    from rlm_orchestrator.lm_keys import missing_key

    assert missing_key(rlm.root_config) is None
