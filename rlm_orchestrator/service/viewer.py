"""`serve`'s viewer (`ui_listen`): the `rlm-orchestrator ui` web app, in the server's process.

It reads the trace store the server writes (RLM_TRACE_STORE) and shows every tenant's
completions, so only the operator's `auth_token` opens it (as a bearer header, or through its
login form, which sets a cookie); a server with tenants and no `auth_token` refuses to start it.
A server with no authentication at all serves it on loopback only (unless
allow_unauthenticated). With `[tls]` it is HTTPS with the same certificate (and client
certificates required when `client_ca_file` is set).
"""

from __future__ import annotations

import os
import ssl
from pathlib import Path

from rlm_orchestrator.exceptions import ConfigurationError
from rlm_orchestrator.service.settings import ServerSettings
from rlm_orchestrator.telemetry.tracing import STORE_ENV
from rlm_orchestrator.ui.app import ViewerServer, ViewerSettings
from rlm_orchestrator.ui.command import check_listen


def viewer_server(settings: ServerSettings) -> ViewerServer | None:
    """The viewer `settings` ask for (not started), or None; ConfigurationError if refused."""
    listen = settings.ui_listen
    if listen is None:
        return None
    store = os.environ.get(STORE_ENV)
    if not store:
        raise ConfigurationError(f"ui_listen: the viewer reads the trace store: set {STORE_ENV}")
    token = settings.auth_token.get_secret_value() if settings.auth_token else None
    if token is None and settings.tenants:
        raise ConfigurationError(
            "ui_listen: the viewer shows every tenant's completions and opens with the "
            "operator's auth_token, which is not set"
        )
    if token is None and not settings.allow_unauthenticated:
        check_listen(listen, None)
    tls = settings.tls
    context = None
    if tls is not None:
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        context.load_cert_chain(tls.cert_file, tls.key_file)
        if tls.client_ca_file is not None:
            context.load_verify_locations(tls.client_ca_file)
            context.verify_mode = ssl.CERT_REQUIRED
    return ViewerServer(ViewerSettings(store=Path(store), token=token), listen, context)
