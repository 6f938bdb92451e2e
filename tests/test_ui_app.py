"""The viewer without a browser: what it builds from a trace, its HTTP API, its token and
headers, and `serve`'s `ui_listen` (a real server process with its token)."""

from __future__ import annotations

import json
import shutil
import sqlite3
import ssl
import urllib.error
import urllib.request
from contextlib import closing
from pathlib import Path
from typing import Any

import pytest
from aiohttp import ClientError, ClientSession, DummyCookieJar
from aiohttp.test_utils import TestServer
from conftest import SERVER_TOKEN, repl, server_config, start_server, stop_server
from pydantic import SecretStr
from test_trace_store import _record_completion
from typer.testing import CliRunner

from rlm_orchestrator.cli import app as cli_app
from rlm_orchestrator.exceptions import ConfigurationError
from rlm_orchestrator.service.settings import ServerSettings, TenantSettings, TLSSettings
from rlm_orchestrator.service.viewer import viewer_server
from rlm_orchestrator.telemetry.store import TraceStore
from rlm_orchestrator.testing.scripted_lm import ScriptedLMServer
from rlm_orchestrator.ui.app import COOKIE, CSP, ViewerSettings, create_app, session_value
from rlm_orchestrator.ui.model import trace_list_item, trace_view
from tests.fakes.certs import make_test_pki


@pytest.fixture
def recorded(tmp_path: Path) -> tuple[Path, str]:
    db = tmp_path / "t.db"
    return db, _record_completion(db)


def test_the_view_of_a_trace(recorded: tuple[Path, str]) -> None:
    db, trace_id = recorded
    spans = TraceStore(db).spans(trace_id)
    view = trace_view(spans)
    json.dumps(view)
    assert view["status"] == "ok" and view["trace_id"] == trace_id
    root, child = view["completions"]
    assert (root["depth"], root["iterations"], root["final_source"]) == (0, 2, "text")
    assert child["depth"] == 1
    turns = root["turns"]
    assert [t["iteration"] for t in turns] == [2, 3]  # rlm.iteration 1 and 2, shown from 1
    (block,) = turns[0]["blocks"]
    assert block["child_completions"] == [child["span_id"]]
    assert block["sub_calls"] == []  # the child's LM call is the child's
    failed = turns[1]["blocks"][0]
    assert failed["error"] == "ValueError: boom" and failed["status"] == "error"
    assert view["processes"] == ["rlm-orchestrator", "rlm-sandbox-agent"]
    by_name = {s["name"]: s for s in view["spans"] if s["depth"] == 0}
    assert by_name["rlm.completion"]["start_ms"] == 0 and by_name["rlm.completion"]["critical"]
    (models,) = view["totals"]["models"]
    assert (models["calls"], models["input_tokens"], models["output_tokens"]) == (3, 2800, 330)
    work = {w["kind"]: w for w in view["totals"]["work"]}
    # The child's call hangs right under its completion here: not a turn's, so a sub-call.
    assert work["root-lm"]["count"] == 2 and work["sub-lm"]["count"] == 1
    assert not view["content_recorded"]
    item = trace_list_item(spans)
    assert item["status"] == "ok" and item["final_source"] == "text"


def test_a_trace_without_its_root_yet_is_running(recorded: tuple[Path, str]) -> None:
    """Spans are stored as they end: until the completion's own span is, it is running."""
    db, trace_id = recorded
    with closing(sqlite3.connect(db)) as conn, conn:
        conn.execute("DELETE FROM spans WHERE parent_span_id IS NULL")
    spans = TraceStore(db).spans(trace_id)
    view = trace_view(spans)
    # Recorded in 2023 (test_trace_store's clock): long stale, so not running any more.
    assert view["status"] == "incomplete"
    with closing(sqlite3.connect(db)) as conn, conn:
        shift = 10**9 * 3600 * 24 * 365 * 10  # now-ish
        conn.execute("UPDATE spans SET start_ns = start_ns + ?, end_ns = end_ns + ?", (shift,) * 2)
    spans = TraceStore(db).spans(trace_id)
    assert trace_view(spans)["status"] == "running"
    assert trace_list_item(spans)["status"] == "running"


async def _get(session: ClientSession, url: str, **kwargs: Any) -> tuple[int, dict[str, str], str]:
    async with session.get(url, allow_redirects=False, **kwargs) as response:
        return response.status, dict(response.headers), await response.text()


async def test_the_api_behind_a_token(recorded: tuple[Path, str]) -> None:
    db, trace_id = recorded
    token = "ui-test-token"
    server = TestServer(create_app(ViewerSettings(store=db, token=token)))
    await server.start_server()
    try:
        async with ClientSession(cookie_jar=DummyCookieJar()) as session:
            base = str(server.make_url("/"))
            status, headers, _ = await _get(session, base + "api/traces")
            assert status == 401 and headers["Content-Security-Policy"] == CSP
            status, headers, _ = await _get(session, base)
            assert (status, headers["Location"]) == (303, "/login")
            for public in ("login", "static/app.js", "static/style.css"):
                status, headers, _ = await _get(session, base + public)
                assert status == 200, public
                assert headers["X-Content-Type-Options"] == "nosniff"
                assert headers["Content-Security-Policy"] == CSP
            assert headers["Content-Type"].startswith("text/css")
            bearer = {"Authorization": f"Bearer {token}"}
            status, _, body = await _get(session, base + "api/traces", headers=bearer)
            assert status == 200
            assert [t["trace_id"] for t in json.loads(body)["traces"]] == [trace_id]
            status, _, body = await _get(
                session, base + f"api/traces/{trace_id[:8]}", headers=bearer
            )
            assert status == 200 and json.loads(body)["trace_id"] == trace_id
            status, headers, _ = await _get(session, base + "api/traces/ffff", headers=bearer)
            assert status == 404 and headers["Content-Security-Policy"] == CSP
            wrong = {"Authorization": "Bearer nope"}
            assert (await _get(session, base + "api/traces", headers=wrong))[0] == 401
            # The login form: a wrong token goes back to it; the right one sets the cookie.
            async with session.post(
                base + "login", data={"token": "nope"}, allow_redirects=False
            ) as response:
                assert response.headers["Location"] == "/login#failed"
                assert COOKIE not in response.cookies
            async with session.post(
                base + "login", data={"token": token}, allow_redirects=False
            ) as response:
                assert response.headers["Location"] == "/"
                morsel = response.cookies[COOKIE]
                assert morsel.value == session_value(token) != token
                assert morsel["httponly"] and morsel["samesite"] == "Strict"
            cookie = {"Cookie": f"{COOKIE}={session_value(token)}"}
            status, headers, body = await _get(session, base, headers=cookie)
            assert status == 200 and "/static/app.js" in body
            assert headers["X-Frame-Options"] == "DENY"
            assert (await _get(session, base + "api/traces", headers=cookie))[0] == 200
    finally:
        await server.close()


async def test_without_a_token_and_without_a_store(tmp_path: Path) -> None:
    server = TestServer(create_app(ViewerSettings(store=tmp_path / "none.db")))
    await server.start_server()
    try:
        async with ClientSession() as session:
            status, _, body = await _get(session, str(server.make_url("/api/traces")))
            assert status == 200 and json.loads(body)["traces"] == []
    finally:
        await server.close()
    assert not (tmp_path / "none.db").exists()


def test_who_may_start_the_viewer(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv("RLM_TRACE_STORE", raising=False)
    assert viewer_server(ServerSettings()) is None
    with pytest.raises(ConfigurationError, match="RLM_TRACE_STORE"):
        viewer_server(ServerSettings(ui_listen="127.0.0.1:0"))
    monkeypatch.setenv("RLM_TRACE_STORE", str(tmp_path / "t.db"))
    tenant = TenantSettings(name="a", token=SecretStr("t" * 32))
    with pytest.raises(ConfigurationError, match="auth_token"):
        viewer_server(ServerSettings(ui_listen="127.0.0.1:0", tenants=[tenant]))
    with pytest.raises(ConfigurationError, match="no token"):
        viewer_server(ServerSettings(ui_listen="0.0.0.0:0"))
    viewer = viewer_server(ServerSettings(ui_listen="0.0.0.0:0", auth_token=SecretStr("x" * 32)))
    assert viewer is not None and viewer.settings.token == "x" * 32
    loopback = viewer_server(ServerSettings(ui_listen="127.0.0.1:0"))
    assert loopback is not None and loopback.settings.token is None
    result = CliRunner().invoke(cli_app, ["ui", "--listen", "0.0.0.0:0"])
    assert result.exit_code != 0 and "RLM_UI_TOKEN" in result.output


def _http(url: str, token: str | None = None) -> tuple[int, str]:
    request = urllib.request.Request(url)
    if token:
        request.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


@pytest.mark.slow
def test_serve_shows_its_completions_behind_its_token(
    lm: ScriptedLMServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("RLM_TRACE_STORE", str(tmp_path / "traces.db"))
    server = start_server(server_config(lm, tmp_path, ui_listen="127.0.0.1:0"))
    try:
        assert server.process.stdout is not None
        line = server.process.stdout.readline()
        assert line.startswith("VIEWER http://127.0.0.1:"), line
        url = line.split()[1]
        lm.set_sequence("root", [repl("print('hi')"), "FINAL(done)"])
        with server.client() as client:
            assert client.completion("context", "question?").response == "done"
        assert _http(url + "api/traces")[0] == 401
        assert _http(url + "api/traces", "wrong")[0] == 401
        status, body = _http(url + "api/traces", SERVER_TOKEN)
        assert status == 200
        (listed,) = json.loads(body)["traces"]
        # Flushed as the completion ended; the RPC's span (its parent) follows within a second.
        assert listed["final_source"] == "final" and listed["status"] in ("ok", "running")
        status, body = _http(url + "api/traces/" + listed["trace_id"], SERVER_TOKEN)
        assert status == 200 and json.loads(body)["completions"][0]["iterations"] == 2
    finally:
        stop_server(server)


async def test_with_tls_the_viewer_is_https_with_client_certificates(
    recorded: tuple[Path, str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    if shutil.which("openssl") is None:
        pytest.skip("openssl is not installed (.ci/install-test-tools installs it)")
    pki = make_test_pki(tmp_path / "pki")
    monkeypatch.setenv("RLM_TRACE_STORE", str(recorded[0]))
    tls = TLSSettings(
        cert_file=pki.server_cert, key_file=pki.server_key, client_ca_file=pki.ca_cert
    )
    token = "t" * 32
    settings = ServerSettings(ui_listen="localhost:0", auth_token=SecretStr(token), tls=tls)
    viewer = viewer_server(settings)
    assert viewer is not None
    await viewer.start()
    try:
        assert viewer.url.startswith("https://localhost:")
        trusted = ssl.create_default_context(cafile=pki.ca_cert)
        bearer = {"Authorization": f"Bearer {token}"}
        async with ClientSession() as session:
            with pytest.raises(ClientError):  # no client certificate
                await _get(session, viewer.url + "api/traces", headers=bearer, ssl=trusted)
            trusted.load_cert_chain(pki.client_cert, pki.client_key)
            status, _, body = await _get(
                session, viewer.url + "api/traces", headers=bearer, ssl=trusted
            )
            assert status == 200 and json.loads(body)["traces"][0]["trace_id"] == recorded[1]
    finally:
        await viewer.stop()
