"""```python fences as code (issue 19): off by default (```repl is the contract); with
`code_fences=("repl", "python")` a model that only ever writes ```python blocks gets them run,
in process and through a server (the request option `code_fences`, or the server's default).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from conftest import ROOT_MODEL, server_config, start_server, stop_server

from rlm_orchestrator import RLM, ConfigurationError
from rlm_orchestrator.exceptions import InvalidRequestError
from rlm_orchestrator.service.settings import load_server_settings
from rlm_orchestrator.testing.scripted_lm import ScriptedLMServer

MakeRLM = Callable[..., RLM]


def python(code: str) -> str:
    """A root response as a model that ignores the ```repl instruction writes it."""
    return f"Let me look at the context.\n```python\n{code}\n```"


# A model that never writes ```repl: it counts, then answers with the variable.
PYTHON_ONLY = [python("n = len(context.split())\nprint('words:', n)"), "FINAL_VAR(n)"]


def test_python_fences_run_when_accepted(make_rlm: MakeRLM, lm: ScriptedLMServer) -> None:
    rlm = make_rlm(root=PYTHON_ONLY, code_fences=("repl", "python"))
    result = rlm.completion("one two three", root_prompt="how many words?")
    assert (result.response, result.answer_source) == ("3", "final_var")
    shown = str(lm.requests_for(ROOT_MODEL)[1].messages[-2]["content"])
    assert "words: 3" in shown


def test_python_fences_do_not_run_by_default(make_rlm: MakeRLM, lm: ScriptedLMServer) -> None:
    # Nothing runs: FINAL_VAR(n) names a variable that does not exist; the model is told.
    rlm = make_rlm(root=[*PYTHON_ONLY, "FINAL(gave up)"])
    assert rlm.completion("one two three").response == "gave up"
    requests = lm.requests_for(ROOT_MODEL)
    assert "words: 3" not in str(requests[1].messages)
    assert "no variable named 'n'" in str(requests[2].messages[-2]["content"])


def test_a_final_in_an_accepted_fence_is_code(make_rlm: MakeRLM, lm: ScriptedLMServer) -> None:
    # FINAL_VAR inside a ```python block runs in the sandbox: the answer comes from the code.
    rlm = make_rlm(root=[python("x = 'ran'\nFINAL_VAR('x')")], code_fences="repl,python")
    result = rlm.completion("ctx")
    assert (result.response, result.answer_source) == ("ran", "final_var_in_code")


@pytest.mark.not_through_server("a check of the in-process RLM's constructor")
@pytest.mark.parametrize("bad", [(), ("repl", ""), ("re pl",), "repl,", 42])
def test_bad_fence_languages_are_refused(make_rlm: MakeRLM, bad: Any) -> None:
    with pytest.raises(ConfigurationError, match="code_fences"):
        make_rlm(root=[], code_fences=bad)


def test_a_server_refuses_bad_fence_languages(orchestrator_server: Any) -> None:
    client = orchestrator_server.client()
    try:
        with pytest.raises(InvalidRequestError, match="code_fences"):
            client.completion("ctx", None, code_fences=["repl", "not a word"])
    finally:
        client.close()


def test_a_servers_default_applies_and_a_request_or_session_overrides_it(
    lm: ScriptedLMServer, tmp_path: Path
) -> None:
    config = server_config(lm, tmp_path, code_fences=["repl", "python"])
    server = start_server(config)
    try:
        with server.client() as client:
            lm.set_sequence(ROOT_MODEL, PYTHON_ONLY)
            assert client.completion("one two three").response == "3"  # the server's default
            lm.set_sequence(ROOT_MODEL, [*PYTHON_ONLY, "FINAL(not run)"])
            assert client.completion("a b", code_fences=["repl"]).response == "not run"
            with client.create_session(code_fences=["repl"]) as session:
                lm.set_sequence(ROOT_MODEL, PYTHON_ONLY)
                # The request's list replaces the session's (not appended to it).
                assert session.completion("x y", code_fences=["python"]).response == "2"
    finally:
        stop_server(server)


def test_the_servers_setting_comes_from_its_file_or_a_variable(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = tmp_path / "server.toml"
    config.write_text('code_fences = ["repl", "python"]\n')
    assert load_server_settings(config).code_fences == ("repl", "python")
    monkeypatch.setenv("RLM_SERVER_CODE_FENCES", "python,py")
    assert load_server_settings(config).code_fences == ("python", "py")
    monkeypatch.setenv("RLM_SERVER_CODE_FENCES", "")
    with pytest.raises(ConfigurationError, match="RLM_SERVER_CODE_FENCES"):
        load_server_settings(config)
