"""The scripted OpenAI-compatible server that the rest of the suite uses instead of a real LM."""

from __future__ import annotations

import asyncio
import http.client
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

from rlm_orchestrator.testing import RecordedRequest, Rule, Script, ScriptedLMServer

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def server() -> Iterator[ScriptedLMServer]:
    with ScriptedLMServer() as srv:
        yield srv


def request(
    srv: ScriptedLMServer,
    method: str = "POST",
    path: str = "/v1/chat/completions",
    body: bytes | None = None,
    headers: dict[str, str] | None = None,
) -> tuple[int, bytes, str]:
    """(status, body, content type) of one request, the connection closed afterwards."""
    conn = http.client.HTTPConnection("127.0.0.1", srv.port, timeout=10)
    try:
        conn.request(method, path, body=body, headers=headers or {})
        resp = conn.getresponse()
        return resp.status, resp.read(), resp.getheader("Content-Type", "")
    finally:
        conn.close()


def chat(
    srv: ScriptedLMServer,
    user: str = "hi",
    model: str = "root",
    *,
    messages: list[dict[str, Any]] | None = None,
    stream: bool = False,
    path: str = "/v1/chat/completions",
) -> tuple[int, Any]:
    """POST a chat completion; returns (status, parsed JSON) or (200, raw SSE text)."""
    body: dict[str, Any] = {
        "model": model,
        "messages": messages or [{"role": "user", "content": user}],
    }
    if stream:
        body["stream"] = True
    headers = {"Content-Type": "application/json", "Authorization": "Bearer sk-test"}
    status, raw, _ = request(srv, path=path, body=json.dumps(body).encode(), headers=headers)
    return status, (raw.decode() if stream and status == 200 else json.loads(raw))


def content(srv: ScriptedLMServer, user: str = "hi", model: str = "root") -> str:
    status, payload = chat(srv, user, model)
    assert status == 200, payload
    text = payload["choices"][0]["message"]["content"]
    assert isinstance(text, str)
    return text


def test_sequences_are_consumed_in_order_per_model(server: ScriptedLMServer) -> None:
    server.set_script(Script(sequences={"root": ["r1", "r2"], "openai/sub": ["s1"]}))
    assert content(server, model="root") == "r1"
    assert content(server, model="sub") == "s1"
    assert content(server, model="openai/root") == "r2"  # the prefix is ignored both ways


def test_rules_take_priority_over_sequences(server: ScriptedLMServer) -> None:
    server.set_script(
        Script(
            rules=[Rule("pong", contains="ping"), Rule("sub only", model="openai/sub")],
            sequences={"root": ["from sequence"]},
        )
    )
    assert content(server, "please ping me") == "pong"
    assert content(server, "something else") == "from sequence"
    assert content(server, "anything", model="sub") == "sub only"


def test_regex_matches_the_last_user_message_and_expands_the_reply(
    server: ScriptedLMServer,
) -> None:
    server.add_rule(Rule(r"n=\g<n>, tail=\2", regex=r"(?P<n>\d+)(.*)$"))
    messages: list[dict[str, Any]] = [
        {"role": "user", "content": "ignored 99"},
        {"role": "assistant", "content": "77"},
        {"role": "user", "content": [{"type": "text", "text": "take 42\nand more"}]},
    ]
    status, payload = chat(server, messages=messages)
    assert status == 200
    assert payload["choices"][0]["message"]["content"] == "n=42, tail=\nand more"


def test_times_limits_a_rule_and_default_answers_the_rest(server: ScriptedLMServer) -> None:
    server.set_script(Script(rules=[Rule("once", contains="x", times=1)], default="fallback"))
    assert [content(server, "x"), content(server, "x"), content(server, "y")] == [
        "once",
        "fallback",
        "fallback",
    ]


def test_exhaustion_is_a_500_naming_model_and_message(server: ScriptedLMServer) -> None:
    server.set_sequence("root", ["only"])
    assert content(server) == "only"
    status, payload = chat(server, "y" * 300)
    assert status == 500
    assert payload["error"]["message"] == (
        "scripted LM: no rule or sequence entry left for model 'root'; "
        "last user message starts: " + "y" * 200
    )
    assert payload["error"]["type"] == "server_error"
    assert (server.requests[-1].status, server.requests[-1].reply) == (500, None)


def test_error_status_answers_an_openai_error_body(server: ScriptedLMServer) -> None:
    server.set_script(Script(rules=[Rule("slow down", status=429, times=1)], default="ok"))
    status, payload = chat(server)
    assert status == 429
    assert payload == {
        "error": {
            "message": "slow down",
            "type": "rate_limit_error",
            "param": None,
            "code": "rate_limit_exceeded",
        }
    }
    assert content(server) == "ok"


def test_rule_in_a_sequence_supplies_status_and_delay_only(server: ScriptedLMServer) -> None:
    never = "no user message contains this"
    server.set_sequence(
        "root", [Rule("boom", status=500, contains=never), Rule("late", delay_seconds=0.2)]
    )
    status, payload = chat(server)
    assert (status, payload["error"]["message"]) == (500, "boom")
    started = time.monotonic()
    assert content(server) == "late"
    assert time.monotonic() - started >= 0.2


def test_callable_reply_sees_the_request(server: ScriptedLMServer) -> None:
    def reply(req: RecordedRequest) -> str:
        return f"{req.model}: {len(req.messages)} messages, last {req.last_user_message!r}"

    server.add_rule(Rule(reply))
    assert content(server, "q") == "root: 1 messages, last 'q'"


def test_response_shape_and_usage(server: ScriptedLMServer) -> None:
    server.set_sequence("root", ["z" * 9, ""])
    messages = [{"role": "system", "content": "x" * 10}, {"role": "user", "content": "y" * 7}]
    status, payload = chat(server, messages=messages, model="openai/root")
    assert status == 200
    assert payload["id"].startswith("chatcmpl-")
    assert payload["object"] == "chat.completion"
    assert isinstance(payload["created"], int)
    assert payload["model"] == "openai/root"
    choice = payload["choices"][0]
    assert choice["message"] == {"role": "assistant", "content": "z" * 9}
    assert choice["finish_reason"] == "stop"
    # ceil(17 / 4) prompt tokens, ceil(9 / 4) completion tokens
    assert payload["usage"] == {"prompt_tokens": 5, "completion_tokens": 3, "total_tokens": 8}
    _, payload = chat(server, messages=[{"role": "user", "content": ""}])
    assert payload["usage"] == {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2}


def test_streaming_sends_sse_chunks_usage_and_done(server: ScriptedLMServer) -> None:
    reply = "a streamed reply that spans several chunks"
    server.set_sequence("root", [reply])
    status, text = chat(server, "abcd", stream=True)
    assert status == 200
    lines = [line for line in text.split("\n") if line]
    assert all(line.startswith("data: ") for line in lines)
    assert lines[-1] == "data: [DONE]"
    chunks = [json.loads(line.removeprefix("data: ")) for line in lines[:-1]]
    assert {c["object"] for c in chunks} == {"chat.completion.chunk"}
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    deltas = [c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"]]
    assert "".join(deltas) == reply
    assert len(deltas) > 3
    assert [c["choices"][0]["finish_reason"] for c in chunks if c["choices"]][-1] == "stop"
    assert chunks[-1]["choices"] == []
    assert chunks[-1]["usage"] == {"prompt_tokens": 1, "completion_tokens": 11, "total_tokens": 12}


def test_requests_are_recorded_with_messages_and_authorization(server: ScriptedLMServer) -> None:
    server.set_script(Script(default="ok"))
    chat(server, "first", model="openai/root")
    chat(server, "second", model="sub")
    recorded = server.requests
    assert [r.model for r in recorded] == ["openai/root", "sub"]
    first = recorded[0]
    assert first.messages == [{"role": "user", "content": "first"}]
    assert first.body["messages"] == first.messages
    assert first.headers["Authorization"] == "Bearer sk-test"  # lookups ignore case
    assert first.headers["authorization"] == first.headers.get("AUTHORIZATION")
    assert first.api_key == "sk-test"
    assert (first.reply, first.status) == ("ok", 200)
    assert [r.last_user_message for r in server.requests_for("root")] == ["first"]
    recorded.clear()  # a copy: the server's record is untouched
    assert len(server.requests) == 2
    server.clear()
    assert server.requests == []


def test_malformed_requests_get_400(server: ScriptedLMServer) -> None:
    for body in (b"{not json", b"[1, 2]", b'{"model": "root"}', b""):
        status, raw, ctype = request(server, body=body)
        assert status == 400, body
        assert ctype == "application/json"
        error = json.loads(raw)["error"]
        assert error["type"] == "invalid_request_error"
        assert set(error) >= {"message", "type", "code"}
    assert [r.status for r in server.requests] == [400] * 4
    assert server.requests[2].model == "root"


def test_concurrent_requests_consume_each_entry_once(server: ScriptedLMServer) -> None:
    entries = [f"reply {i}" for i in range(20)]
    server.set_sequence("root", list(entries))
    replies: list[str] = []
    errors: list[BaseException] = []
    lock = threading.Lock()

    def worker() -> None:
        try:
            text = content(server)
        except BaseException as exc:  # reported below rather than as a thread warning
            with lock:
                errors.append(exc)
            return
        with lock:
            replies.append(text)

    threads = [threading.Thread(target=worker) for _ in entries]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert sorted(replies) == sorted(entries)


def test_script_can_change_at_run_time(server: ScriptedLMServer) -> None:
    server.set_sequence("root", ["a", "b"])
    assert content(server) == "a"
    server.set_sequence("openai/root", ["c"])  # replaces and restarts the sequence
    assert content(server) == "c"
    server.add_rule(Rule("ruled"))
    assert content(server) == "ruled"
    server.set_script(Script(default="new script"))
    assert content(server) == "new script"
    server.reset()
    assert server.requests == []
    assert chat(server)[0] == 500


def test_callers_script_is_not_mutated() -> None:
    script = Script(sequences={"root": ["a"]})
    with ScriptedLMServer(script) as srv:
        srv.add_rule(Rule("x"))
        srv.set_sequence("sub", ["y"])
    assert script == Script(sequences={"root": ["a"]})


def test_models_health_and_path_without_v1(server: ScriptedLMServer) -> None:
    server.set_script(Script(rules=[Rule("x", model="openai/sub")], sequences={"root": ["r"]}))
    status, raw, _ = request(server, "GET", "/v1/models")
    assert status == 200
    assert [m["id"] for m in json.loads(raw)["data"]] == ["sub", "root"]
    assert request(server, "GET", "/health")[:2] == (200, b'{"status": "ok"}')
    assert request(server, "GET", "/nowhere")[0] == 404
    assert (
        chat(server, model="root", path="/chat/completions")[1]["choices"][0]["message"]["content"]
        == "r"
    )


def test_lifecycle() -> None:
    srv = ScriptedLMServer(Script(default="up"))
    srv.stop()  # stopping a server that never started is fine
    with pytest.raises(RuntimeError):
        _ = srv.port
    srv.start()
    try:
        assert srv.base_url == f"http://127.0.0.1:{srv.port}/v1"
        with pytest.raises(RuntimeError):
            srv.start()
        assert content(srv) == "up"
    finally:
        srv.stop()
        srv.stop()


def test_from_dict_and_json_file(tmp_path: Path) -> None:
    data = {
        "rules": [{"reply": r"echo \1", "regex": r"say (\w+)", "times": 1}],
        "sequences": {"root": ["one", {"reply": "busy", "status": 429}], "sub": ["s"]},
        "default": "dflt",
    }
    script = Script.from_dict(data)
    assert script.rules == [Rule(r"echo \1", regex=r"say (\w+)", times=1)]
    assert script.sequences["root"] == ["one", Rule("busy", status=429)]
    path = tmp_path / "script.json"
    path.write_text(json.dumps(data))
    with ScriptedLMServer(Script.from_json_file(path)) as srv:
        assert content(srv, "say hello") == "echo hello"
        assert content(srv, "say hello") == "one"
        assert chat(srv)[0] == 429
        assert content(srv) == "dflt"
    with pytest.raises(ValueError, match="unknown rule keys"):
        Script.from_dict({"rules": [{"reply": "x", "contain": "typo"}]})
    with pytest.raises(ValueError, match="unknown script keys"):
        Script.from_dict({"rule": []})


def test_cli_prints_ready_serves_and_exits_on_sigterm(tmp_path: Path) -> None:
    script = tmp_path / "script.json"
    script.write_text(json.dumps({"sequences": {"root": ["from the cli"]}}))
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    cmd = [sys.executable, "-m", "rlm_orchestrator.testing.scripted_lm", "--script", str(script)]
    with subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=REPO
    ) as proc:
        try:
            assert proc.stdout is not None
            line = proc.stdout.readline()
            assert line.startswith("READY http://127.0.0.1:"), line
            base_url = line.split()[1]
            port = int(base_url.removesuffix("/v1").rsplit(":", 1)[1])
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
            try:
                body = {"model": "openai/root", "messages": [{"role": "user", "content": "hi"}]}
                conn.request("POST", "/v1/chat/completions", body=json.dumps(body))
                reply = json.loads(conn.getresponse().read())
            finally:
                conn.close()
            assert reply["choices"][0]["message"]["content"] == "from the cli"
            proc.send_signal(signal.SIGTERM)
            _, stderr = proc.communicate(timeout=10)
            assert proc.returncode == 0, stderr
            assert stderr == ""
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.communicate()


def _import_litellm() -> Any:
    os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")  # no network at import
    import litellm

    return litellm


@contextmanager
def closed_event_loop() -> Iterator[None]:
    """Gives litellm's sync path an event loop, and closes it.

    litellm.completion() calls asyncio.get_event_loop() for its service hooks; on the main
    thread that creates and installs a loop nobody closes, which later surfaces as a
    ResourceWarning (an error under filterwarnings=error) in whichever test collects it.
    """
    loop = asyncio.new_event_loop()
    asyncio.set_event_loop(loop)
    try:
        yield
    finally:
        asyncio.set_event_loop(None)
        loop.close()


ROOT_SCRIPT = Script(rules=[Rule(r"the answer is \1", regex=r"what is (\d+)\?")])


def test_litellm_completion_against_the_server() -> None:
    litellm = _import_litellm()
    with ScriptedLMServer(ROOT_SCRIPT) as srv, closed_event_loop():
        messages = [{"role": "user", "content": "what is 42?"}]
        response = litellm.completion(
            model="openai/root", messages=messages, api_base=srv.base_url, api_key="sk-test"
        )
        assert response.choices[0].message.content == "the answer is 42"
        assert response.usage.prompt_tokens == 3  # ceil(11 / 4)
        assert response.usage.completion_tokens == 4  # ceil(16 / 4)
        assert [(r.model, r.api_key) for r in srv.requests] == [("root", "sk-test")]


async def test_litellm_acompletion_against_the_server() -> None:
    litellm = _import_litellm()
    with ScriptedLMServer(ROOT_SCRIPT) as srv:
        messages = [{"role": "user", "content": "what is 7?"}]
        response = await litellm.acompletion(
            model="openai/root", messages=messages, api_base=srv.base_url, api_key="sk-test"
        )
        assert response.choices[0].message.content == "the answer is 7"
        assert response.usage.total_tokens == 3 + 4
        assert srv.requests[0].messages == messages
