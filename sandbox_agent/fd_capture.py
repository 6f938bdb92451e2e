"""Capture of what reaches file descriptors 1 and 2 of the worker.

`print` goes through sys.stdout, but C extensions and child processes (`os.system("ls")`,
`subprocess.run`) write to the descriptors themselves. Each descriptor is pointed at a pipe
that a thread reads into the same OutputCapture, so that output is not lost either.
"""

from __future__ import annotations

import codecs
import fcntl
import os
import select
import struct
import termios
import threading
import uuid

from sandbox_agent.capture import OutputCapture

DRAIN_TIMEOUT = 2.0


class FdCapture:
    """Redirects one descriptor into the capture and can wait until its pipe is drained."""

    def __init__(self, fd: int, stream: int, capture: OutputCapture) -> None:
        self._stream = stream
        self._capture = capture
        read_end, write_end = os.pipe()
        os.dup2(write_end, fd)
        os.close(write_end)
        self._fd = fd
        self._read_end = read_end
        self._lock = threading.Lock()
        self._busy = False
        self._token: str | None = None
        self._drained = threading.Event()
        threading.Thread(target=self._pump, name=f"fd{fd}-capture", daemon=True).start()

    def _pump(self) -> None:
        decoder = codecs.getincrementaldecoder("utf-8")("replace")
        carry = ""
        readable = select.poll()
        readable.register(self._read_end, select.POLLIN)
        while True:
            # Busy from before the read: once read, bytes are out of the pipe but not yet in
            # the capture, and drain() must not take the empty pipe for "all delivered".
            readable.poll()
            with self._lock:
                self._busy = True
            data = os.read(self._read_end, 65536)
            if not data:
                return
            text = carry + decoder.decode(data)
            carry = ""
            token = self._token
            if token is not None:
                index = text.find(token)
                if index >= 0:
                    self._capture.write(self._stream, text[:index])
                    self._capture.write(self._stream, text[index + len(token) :])
                    self._token = None
                    self._drained.set()
                    text = ""
                else:
                    # Keep what could be the start of the token for the next read.
                    carry = text[-(len(token) - 1) :]
                    text = text[: -(len(token) - 1)]
            self._capture.write(self._stream, text)
            with self._lock:
                self._busy = False

    def _pipe_is_empty(self) -> bool:
        pending = fcntl.ioctl(self._read_end, termios.FIONREAD, struct.pack("i", 0))
        return bool(struct.unpack("i", pending)[0] == 0)

    def drain(self) -> None:
        """Return once everything written to the descriptor so far is in the capture."""
        with self._lock:
            if not self._busy and self._pipe_is_empty():
                return  # the common case: no C-level output, no round trip needed
        token = f"\x00rlm-drain-{uuid.uuid4().hex}\x00"
        self._drained.clear()
        self._token = token
        os.write(self._fd, token.encode())
        self._drained.wait(DRAIN_TIMEOUT)
        self._token = None
