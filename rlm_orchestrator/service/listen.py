"""Binding the server's address: a port in use is refused at once, never shared.

gRPC binds with SO_REUSEPORT unless told not to (SERVER_OPTIONS turns it off): a second
server on a port in use would otherwise print LISTENING and take half of the first one's
calls. The port is also tried before the server's slow start (the LM client's import, warm
sandboxes), so that the refusal comes first.
"""

from __future__ import annotations

import errno
import socket
from typing import Any

import grpc


class AddressInUseError(OSError):
    """The address the server would listen on is taken (or cannot be bound)."""

    def __init__(self, listen: str, why: str = "address already in use") -> None:
        super().__init__(errno.EADDRINUSE, f"cannot listen on {listen}: {why}")


def _host_port(listen: str) -> tuple[str, int] | None:
    """(host, port) of a HOST:PORT address with a port of its own; None for anything else
    (port 0, unix:..., a scheme gRPC resolves itself)."""
    host, sep, port = listen.rpartition(":")
    if not sep or not port.isdigit() or int(port) == 0 or host.startswith(("unix", "vsock")):
        return None
    return host.strip("[]") or "0.0.0.0", int(port)


def check_port_free(listen: str) -> None:
    """AddressInUseError when something already listens on `listen`'s port."""
    target = _host_port(listen)
    if target is None:
        return
    try:
        infos = socket.getaddrinfo(*target, type=socket.SOCK_STREAM)
    except OSError:
        return  # gRPC's own bind reports an address it cannot resolve
    family, kind, proto, _, address = infos[0]
    with socket.socket(family, kind, proto) as probe:
        # As gRPC binds: a port whose last connections are in TIME_WAIT is free.
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind(address)
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                raise AddressInUseError(listen) from None
            raise AddressInUseError(listen, exc.strerror or str(exc)) from None


def bind(server: grpc.aio.Server, listen: str, credentials: Any = None) -> int:
    """The port `server` listens on; AddressInUseError when gRPC cannot bind it."""
    try:
        if credentials is not None:
            port: int = server.add_secure_port(listen, credentials)
        else:
            port = server.add_insecure_port(listen)
    except RuntimeError as exc:  # grpc.aio: "Failed to bind to address ..."
        raise AddressInUseError(listen) from exc
    if port == 0:  # older grpc: 0 instead of an exception
        raise AddressInUseError(listen)
    return port
