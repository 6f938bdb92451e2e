"""The lean transport finds its proxy in the environment once per URL, as litellm's clients
do (HTTP(S)_PROXY, NO_PROXY), without aiohttp's per-request environment lookups."""

from __future__ import annotations

import asyncio

import pytest

from rlm_orchestrator import lm_http


def test_proxy_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("http_proxy", "https_proxy", "no_proxy", "HTTPS_PROXY", "NO_PROXY"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HTTP_PROXY", "http://user:secret@proxy.example:3128")
    monkeypatch.setenv("NO_PROXY", "skipped.example")

    async def main() -> None:
        sessions = lm_http.Sessions()
        try:
            session = sessions.get()
            assert sessions.get() is session  # one per event loop
            url, proxy, auth = session.target("http://llm.example/v1/chat/completions")
            assert str(url) == "http://llm.example/v1/chat/completions"
            assert str(proxy) == "http://proxy.example:3128"
            assert (auth.login, auth.password) == ("user", "secret")
            assert session.target("http://skipped.example/v1/chat/completions")[1:] == (
                None,
                None,
            )
            # https URLs use HTTPS_PROXY only (unset here).
            assert session.target("https://llm.example/v1/chat/completions")[1] is None
        finally:
            await sessions.aclose()

    asyncio.run(main())
