"""The fake Kubernetes API server over HTTP, for the real lightkube client.

``fake_kube_transport`` serves a ``FakeKubeApiServer`` in-process as an httpx2
``MockTransport`` (pass it as ``lightkube.AsyncClient(transport=...)`` with a config from
``fake_kube_config``); ``FakeKubeHttpServer`` serves it over real HTTP/1.1 on 127.0.0.1
(``write_kubeconfig`` writes a kubeconfig lightkube loads as is). Both answer through
``KubeRouter`` (``fake_kube_router``: the routes and what lightkube sends); the HTTP server
itself is ``fake_kube_httpd``. Not modelled: TLS, HTTP/2.
"""

from __future__ import annotations

import json
import threading
from collections.abc import AsyncIterator
from pathlib import Path
from typing import TYPE_CHECKING

import httpx2

from tests.fakes.fake_kube import (  # noqa: F401 (re-exported: KINDS to Kind)
    KINDS,
    ApiError,
    AuditEntry,
    FakeKubeApiServer,
    Kind,
    Watch,
)
from tests.fakes.fake_kube_httpd import KubeHttpd
from tests.fakes.fake_kube_objects import JsonDict
from tests.fakes.fake_kube_router import KubeResponse, KubeRouter, encode_event

if TYPE_CHECKING:
    from lightkube import KubeConfig

__all__ = [
    "FakeKubeHttpServer",
    "KubeResponse",
    "KubeRouter",
    "fake_kube_config",
    "fake_kube_transport",
    "kubeconfig_dict",
]


# ---------------------------------------------------------------------------- in-process
class _WatchStream(httpx2.AsyncByteStream):
    """A watch as a streamed body: each event is sent as soon as the store emits it."""

    def __init__(self, watch: Watch) -> None:
        self._watch = watch

    async def __aiter__(self) -> AsyncIterator[bytes]:
        try:
            while (event := await self._watch.aget()) is not None:
                yield encode_event(event)
        finally:
            self._watch.close()

    async def aclose(self) -> None:
        self._watch.close()


def fake_kube_transport(
    server: FakeKubeApiServer, *, token: str | None = None
) -> httpx2.MockTransport:
    """An in-process transport to `server` (any host; `token` checked when given). Hooks of
    the store run in the client's event loop thread."""
    router = KubeRouter(server, token)

    async def handler(request: httpx2.Request) -> httpx2.Response:
        response = router.handle(
            request.method, request.url.path, request.url.params, request.headers, request.content
        )
        headers = response.headers()
        if response.watch is None:
            return httpx2.Response(response.status, headers=headers, content=response.body)
        headers.append(("Transfer-Encoding", "chunked"))
        return httpx2.Response(
            response.status, headers=headers, stream=_WatchStream(response.watch)
        )

    return httpx2.MockTransport(handler)


def kubeconfig_dict(
    server_url: str, namespace: str = "default", token: str = "fake-token"
) -> JsonDict:
    """A kubeconfig with one context "fake": `server_url`, a bearer `token`, `namespace`."""
    return {
        "apiVersion": "v1",
        "kind": "Config",
        "current-context": "fake",
        "clusters": [{"name": "fake", "cluster": {"server": server_url}}],
        "users": [{"name": "fake", "user": {"token": token}}],
        "contexts": [
            {"name": "fake", "context": {"cluster": "fake", "user": "fake", "namespace": namespace}}
        ],
    }


def fake_kube_config(
    server_url: str = "http://fake-kube.invalid",
    namespace: str = "default",
    token: str = "fake-token",
) -> KubeConfig:
    """A lightkube config for ``fake_kube_transport`` (the URL is never connected to)."""
    from lightkube import KubeConfig

    return KubeConfig.from_dict(kubeconfig_dict(server_url, namespace, token))


# ---------------------------------------------------------------------------- over HTTP
class FakeKubeHttpServer:
    """`server` (a new empty store by default) over HTTP on 127.0.0.1, on a free port.

    Every request must carry ``Authorization: Bearer <token>`` (401 otherwise). ``stop()``
    ends open watches, closes every connection and joins every thread it started.
    """

    def __init__(self, server: FakeKubeApiServer | None = None, *, token: str = "fake-token"):
        self.api = server if server is not None else FakeKubeApiServer()
        self.token = token
        self._httpd: KubeHttpd | None = None
        self._thread: threading.Thread | None = None

    @property
    def port(self) -> int:
        if self._httpd is None:
            raise RuntimeError("FakeKubeHttpServer is not started")
        return self._httpd.server_port

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> FakeKubeHttpServer:
        if self._httpd is None:
            self._httpd = KubeHttpd(KubeRouter(self.api, self.token))
            self._thread = threading.Thread(
                target=self._httpd.serve_forever,
                kwargs={"poll_interval": 0.05},  # stop() waits for one poll
                name="fake-kube-http",
                daemon=True,
            )
            self._thread.start()
        return self

    def stop(self) -> None:
        httpd, thread = self._httpd, self._thread
        if httpd is None or thread is None:
            return
        self._httpd = self._thread = None
        httpd.shutdown()  # no new connections from here on
        thread.join(10)
        httpd.close()

    def __enter__(self) -> FakeKubeHttpServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def write_kubeconfig(
        self, path: str | Path, namespace: str = "default", token: str | None = None
    ) -> Path:
        """A kubeconfig for this server (JSON, which is YAML); `token` defaults to the
        server's (another one gets 401s)."""
        path = Path(path)
        config = kubeconfig_dict(self.url, namespace, token if token is not None else self.token)
        path.write_text(json.dumps(config, indent=2))
        return path
