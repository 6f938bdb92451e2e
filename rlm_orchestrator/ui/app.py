"""The viewer's web app (aiohttp): the static page and its JSON API over the trace store.

Routes: `/` the page, `/static/*` its files, `/api/traces` the newest completions,
`/api/traces/{id}` one (by id or unique prefix), `/login` (GET the form, POST the token).

With a token, everything but the login form and the static files needs it: as
`Authorization: Bearer <token>`, or the cookie the login form sets (an HMAC of the token, so
the token itself is never stored in the browser). Every response carries a strict
Content-Security-Policy (scripts and styles from this origin only, no inline script), nosniff,
no framing and no referrer: what the page shows (model output, printed text) is untrusted,
and the page renders it as text only.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import ssl
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from aiohttp import web

from rlm_orchestrator.telemetry.store import TraceStore, TraceStoreError
from rlm_orchestrator.ui.model import trace_list_item, trace_view

STATIC = Path(__file__).parent / "static"
COOKIE = "rlm_ui"
CSP = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; "
    "connect-src 'self'; form-action 'self'; base-uri 'none'; frame-ancestors 'none'"
)
SECURITY_HEADERS = {
    "Content-Security-Policy": CSP,
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-store",
}
_PUBLIC = ("/login", "/static/")
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def session_value(token: str) -> str:
    """The login cookie's value: proves the token was given, without being it."""
    return hmac.new(token.encode(), b"rlm-orchestrator ui session", hashlib.sha256).hexdigest()


@dataclass(frozen=True)
class ViewerSettings:
    store: Path
    token: str | None = None  # None: no authentication (loopback only; the caller checks)
    list_limit: int = 100


def _authorized(request: web.Request, token: str) -> bool:
    header = request.headers.get("Authorization", "")
    if header.startswith("Bearer ") and hmac.compare_digest(
        header.removeprefix("Bearer ").encode(), token.encode()
    ):
        return True
    cookie = request.cookies.get(COOKIE, "")
    return hmac.compare_digest(cookie.encode(), session_value(token).encode())


def _middlewares(settings: ViewerSettings) -> list[Any]:
    @web.middleware
    async def headers(request: web.Request, handler: Handler) -> web.StreamResponse:
        try:
            response = await handler(request)
        except web.HTTPException as exc:
            response = exc
        response.headers.update(SECURITY_HEADERS)
        return response

    @web.middleware
    async def auth(request: web.Request, handler: Handler) -> web.StreamResponse:
        token = settings.token
        if token is None or request.path.startswith(_PUBLIC) or _authorized(request, token):
            return await handler(request)
        if request.path.startswith("/api/"):
            return web.json_response({"error": "unauthenticated"}, status=401)
        raise web.HTTPSeeOther("/login")

    return [headers, auth]


class Viewer:
    """The handlers, over one trace store (read in a thread: sqlite3 blocks)."""

    def __init__(self, settings: ViewerSettings) -> None:
        self.settings = settings

    def _store(self) -> TraceStore | None:
        try:
            return TraceStore(self.settings.store)
        except TraceStoreError:
            return None  # nothing recorded there yet: an empty list, not an error

    def _list(self) -> dict[str, Any]:
        store = self._store()
        if store is None:
            return {"store": str(self.settings.store), "traces": []}
        ids = store.trace_ids(self.settings.list_limit)
        traces = [trace_list_item(spans) for spans in map(store.spans, ids) if spans]
        return {"store": str(self.settings.store), "traces": traces}

    def _one(self, prefix: str) -> dict[str, Any] | None:
        store = self._store()
        if store is None:
            return None
        try:
            spans = store.spans(store.resolve(prefix))
        except TraceStoreError:
            return None
        return trace_view(spans) if spans else None

    async def page(self, request: web.Request) -> web.StreamResponse:
        return web.FileResponse(STATIC / "index.html")

    async def login_form(self, request: web.Request) -> web.StreamResponse:
        return web.FileResponse(STATIC / "login.html")

    async def login(self, request: web.Request) -> web.StreamResponse:
        token = self.settings.token
        given = str((await request.post()).get("token", ""))
        if token is None or not hmac.compare_digest(given.encode(), token.encode()):
            raise web.HTTPSeeOther("/login#failed")
        response = web.HTTPSeeOther("/")
        response.set_cookie(
            COOKIE, session_value(token), httponly=True, samesite="Strict",
            secure=request.secure, path="/",
        )  # fmt: skip
        return response

    async def traces(self, request: web.Request) -> web.StreamResponse:
        return web.json_response(await asyncio.to_thread(self._list))

    async def trace(self, request: web.Request) -> web.StreamResponse:
        view = await asyncio.to_thread(self._one, request.match_info["trace_id"])
        if view is None:
            return web.json_response({"error": "no such trace"}, status=404)
        return web.json_response(view)


def create_app(settings: ViewerSettings) -> web.Application:
    app = web.Application(middlewares=_middlewares(settings))
    viewer = Viewer(settings)
    app.router.add_get("/", viewer.page)
    app.router.add_get("/login", viewer.login_form)
    app.router.add_post("/login", viewer.login)
    app.router.add_get("/api/traces", viewer.traces)
    app.router.add_get("/api/traces/{trace_id}", viewer.trace)
    app.router.add_static("/static/", STATIC, follow_symlinks=False)
    return app


class ViewerServer:
    """The app on a TCP address, as a lifecycle: `await start()` (the port), `await stop()`."""

    def __init__(
        self, settings: ViewerSettings, listen: str, ssl_context: ssl.SSLContext | None = None
    ) -> None:
        self.settings, self.listen, self.ssl_context = settings, listen, ssl_context
        self.port = 0
        self._runner: web.AppRunner | None = None

    async def start(self) -> int:
        host, _, port = self.listen.rpartition(":")
        runner = web.AppRunner(create_app(self.settings), access_log=None)
        await runner.setup()
        site = web.TCPSite(runner, host.strip("[]"), int(port), ssl_context=self.ssl_context)
        try:
            await site.start()
        except OSError:
            await runner.cleanup()
            raise
        self._runner = runner
        self.port = int(runner.addresses[0][1])  # the one bound (port 0: a free one)
        return self.port

    @property
    def url(self) -> str:
        host = self.listen.rpartition(":")[0]
        scheme = "https" if self.ssl_context else "http"
        return f"{scheme}://{host}:{self.port}/"

    async def stop(self) -> None:
        runner, self._runner = self._runner, None
        if runner is not None:
            await runner.cleanup()
