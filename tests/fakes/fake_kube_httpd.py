"""The HTTP/1.1 server behind ``FakeKubeHttpServer``: a ``KubeRouter`` on 127.0.0.1.

One thread per connection, keep-alive, watches streamed with chunked transfer-encoding. The
server tracks its connections, their threads and the watches being streamed, so that
``KubeHttpd.close`` can end and join every one of them.
"""

from __future__ import annotations

import contextlib
import http.server
import select
import socket
import socketserver
import sys
import threading
import time
import urllib.parse
from typing import Any

from tests.fakes.fake_kube import Watch
from tests.fakes.fake_kube_router import KubeRouter, encode_event

__all__ = ["KubeHttpd"]


class KubeHttpd(socketserver.ThreadingMixIn, http.server.HTTPServer):
    """`router` on 127.0.0.1, on a free port; ``shutdown()`` then ``close()`` to stop."""

    daemon_threads = True

    def __init__(self, router: KubeRouter) -> None:
        self.router = router
        self.lock = threading.Lock()
        self.threads: list[threading.Thread] = []  # one per connection
        self.sockets: set[socket.socket] = set()  # open connections
        self.watches: set[Watch] = set()  # watches being streamed
        self.closing = False
        super().__init__(("127.0.0.1", 0), _Handler)

    def server_bind(self) -> None:
        # HTTPServer.server_bind resolves the host name, slow where there is no DNS.
        socketserver.TCPServer.server_bind(self)
        self.server_name, self.server_port = "127.0.0.1", int(self.server_address[1])

    def process_request(self, request: Any, client_address: Any) -> None:
        # Threads and sockets are tracked so that close() can end and join every one of them.
        thread = threading.Thread(
            target=self.process_request_thread,
            args=(request, client_address),
            name="fake-kube-http-conn",
            daemon=True,
        )
        with self.lock:
            self.threads = [t for t in self.threads if t.is_alive()] + [thread]
            self.sockets.add(request)
        thread.start()

    def handle_error(self, request: Any, client_address: Any) -> None:
        if not isinstance(sys.exc_info()[1], OSError):  # a client hanging up is no error
            super().handle_error(request, client_address)

    def shutdown_request(self, request: Any) -> None:
        with self.lock:
            self.sockets.discard(request)
        super().shutdown_request(request)

    def close(self) -> None:
        """After ``shutdown()``: ends open watches, closes every connection, joins every
        connection thread, and closes the listening socket."""
        with self.lock:
            self.closing = True
            watches, sockets, threads = list(self.watches), list(self.sockets), self.threads
        for watch in watches:
            watch.close()
        deadline = time.monotonic() + 2  # let the streams end cleanly, with their last chunk
        while time.monotonic() < deadline:
            with self.lock:
                if not self.watches:
                    break
            time.sleep(0.01)
        for sock in sockets:  # idle keep-alive connections: their readers see EOF
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
        for thread in threads:
            thread.join(10)
        self.server_close()


class _Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive; watches use chunked transfer-encoding
    disable_nagle_algorithm = True  # headers and body are separate writes: no 40 ms stalls
    server: KubeHttpd

    def log_message(self, format: str, *args: Any) -> None:  # tests read the audit log instead
        pass

    def do_GET(self) -> None:
        split = urllib.parse.urlsplit(self.path)
        query = dict(urllib.parse.parse_qsl(split.query, keep_blank_values=True))
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length) if length else b""
        path, headers = urllib.parse.unquote(split.path), dict(self.headers.items())
        response = self.server.router.handle(self.command, path, query, headers, body)
        self.send_response(response.status)
        for header, value in response.headers():
            self.send_header(header, value)
        if response.watch is None:
            self.send_header("Content-Length", str(len(response.body)))
            self.end_headers()
            self.wfile.write(response.body)
        else:
            self.send_header("Transfer-Encoding", "chunked")
            self.end_headers()
            self._stream(response.watch)

    do_POST = do_PATCH = do_PUT = do_DELETE = do_GET

    def _stream(self, watch: Watch) -> None:
        with self.server.lock:
            self.server.watches.add(watch)
            if self.server.closing:
                watch.close()
        try:
            while True:
                event = watch.get(timeout=0.1)
                if event is not None:
                    line = encode_event(event)
                    self.wfile.write(b"%x\r\n%s\r\n" % (len(line), line))
                elif watch.done:
                    break
                elif self._peer_closed():
                    self.close_connection = True
                    return
            self.wfile.write(b"0\r\n\r\n")
        except OSError:  # the client went away mid-stream
            self.close_connection = True
        finally:
            watch.close()
            with self.server.lock:
                self.server.watches.discard(watch)

    def _peer_closed(self) -> bool:
        """Whether the client closed the connection (it sends nothing else during a watch)."""
        try:
            readable, _, _ = select.select([self.connection], [], [], 0)
            return bool(readable) and not self.connection.recv(1, socket.MSG_PEEK)
        except OSError:
            return True
