"""LM failures named for what they are, on both transports: a server answering HTTP 200 with
something that is no chat completion is not "HTTP 500"; a server that cannot be reached is
named by its URL, with no status; and an OpenAI-compatible server that takes no key is called
without one (no dummy OPENAI_API_KEY needed)."""

from __future__ import annotations

import socket
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest

from rlm_orchestrator.exceptions import LMError
from rlm_orchestrator.router import LMClientConfig, LMRouter
from rlm_orchestrator.testing.scripted_lm import ScriptedLMServer

TRANSPORTS = ("http", "litellm")


class _Garbage(BaseHTTPRequestHandler):
    def do_POST(self) -> None:
        self.rfile.read(int(self.headers.get("Content-Length", 0)))
        body = self.server.body  # type: ignore[attr-defined]
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:
        pass


@pytest.fixture
def garbage_server() -> Iterator[ThreadingHTTPServer]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Garbage)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()
    thread.join()


@pytest.fixture(scope="module", autouse=True)
def _litellm_imported() -> None:
    import litellm  # noqa: F401  (its import, once for the module)


def _router(api_base: str, transport: str, **extra: Any) -> LMRouter:
    kwargs = {"model_name": "m", "api_base": api_base, "transport": transport, "max_retries": 0}
    return LMRouter(LMClientConfig.from_backend("openai", {**kwargs, **extra}))


async def _error(router: LMRouter) -> LMError:
    try:
        with pytest.raises(LMError) as caught:
            await router.complete("hello?")
    finally:
        await router.finish_callbacks()
    return caught.value


@pytest.mark.parametrize("transport", TRANSPORTS)
@pytest.mark.parametrize("body", [b"<html>not json</html>", b'{"no": "choices"}'])
async def test_http_200_with_garbage_is_no_http_500(
    garbage_server: ThreadingHTTPServer, transport: str, body: bytes
) -> None:
    garbage_server.body = body  # type: ignore[attr-defined]
    base = f"http://127.0.0.1:{garbage_server.server_address[1]}/v1"
    error = await _error(_router(base, transport, api_key="k"))
    assert "HTTP 500" not in str(error) and error.status_code != 500, str(error)


@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_an_unreachable_server_is_named_by_its_url(transport: str) -> None:
    with socket.socket() as probe:  # a port nobody listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    base = f"http://127.0.0.1:{port}/v1"
    error = await _error(_router(base, transport, api_key="k"))
    assert base in str(error) and "HTTP 500" not in str(error), str(error)
    assert error.status_code is None


async def test_a_server_that_takes_no_key_needs_none(
    lm: ScriptedLMServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The lean path sends no Authorization header. litellm's path (its OpenAI client wants a
    key) is run by the CLI in a subprocess: tests/test_cli_surface.py."""
    transport = "http"
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    lm.set_sequence("m", ["no key needed"])
    router = _router(lm.base_url, transport)
    try:
        answer = await router.complete("hello?")
    finally:
        await router.finish_callbacks()
    assert answer.text == "no key needed"
