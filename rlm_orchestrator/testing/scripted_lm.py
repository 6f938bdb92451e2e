"""A scripted OpenAI-compatible chat-completions server for tests and the offline demo.

litellm talks to it over real HTTP: ``litellm.completion(model="openai/root", messages=...,
api_base=srv.base_url, api_key="sk-test")``. A request is answered by the first matching
:class:`Rule`, else the next unused entry of ``sequences[model]``, else ``default``, else
HTTP 500 naming the model and the last user message (so a test sees what it did not expect).
Model names are compared without an ``openai/`` prefix. Standard library only, no litellm.

CLI: ``python -m rlm_orchestrator.testing.scripted_lm --script FILE.json [--host] [--port]``
prints ``READY <base_url>`` once listening and serves until SIGTERM/SIGINT.
"""

from __future__ import annotations

import argparse
import json
import re
import signal
import sys
import threading
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import KW_ONLY, dataclass, field, replace
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import FrameType
from typing import Any, cast

from rlm_orchestrator.testing import model_limits

ReplyFn = Callable[["RecordedRequest"], str]
_RULE_KEYS = frozenset({"reply", "model", "contains", "regex", "status", "times", "delay_seconds"})
_PIECE = 16  # characters per streamed chunk: small, so clients really see several chunks
_ERRORS = {400: "invalid_request_error", 401: "authentication_error", 429: "rate_limit_error"}


def _bare(model: str) -> str:
    return model.removeprefix("openai/")


def _text(content: Any) -> str:
    """A message's text: ``content`` is a string or a list of OpenAI content parts."""
    if isinstance(content, list):
        return "".join(str(p.get("text", "")) for p in content if isinstance(p, dict))
    return content if isinstance(content, str) else ""


class Headers(dict[str, str]):
    """Request headers: names stored lower-cased, looked up case-insensitively."""

    def __getitem__(self, key: str) -> str:
        return super().__getitem__(key.lower())

    def __contains__(self, key: object) -> bool:
        return super().__contains__(key.lower() if isinstance(key, str) else key)

    def get(self, key: str, default: Any = None, /) -> Any:
        return super().get(key.lower(), default)


@dataclass
class RecordedRequest:
    """A chat-completion request as received and the answer given.

    ``reply`` is the scripted text (the error message when ``status`` != 200), or None when
    nothing scripted answered (a malformed request, or no rule or sequence entry left).
    """

    model: str
    messages: list[dict[str, Any]]
    body: dict[str, Any]
    headers: dict[str, str]
    reply: str | None = None
    status: int = 200
    # time.monotonic() when the request was read: system-wide on Linux, so a benchmark can
    # compare it with a client process's start.
    received_at: float = field(default_factory=time.monotonic)

    @property
    def last_user_message(self) -> str:
        users = [m for m in self.messages if isinstance(m, dict) and m.get("role") == "user"]
        return _text(users[-1].get("content")) if users else ""

    @property
    def api_key(self) -> str | None:
        auth = self.headers.get("authorization")
        return auth.removeprefix("Bearer ") if isinstance(auth, str) else None


@dataclass
class Rule:
    """An answer given when every condition set holds.

    ``model`` equals the requested model; ``contains`` is in the last user message;
    ``regex`` searches it (``re.DOTALL``). A string ``reply`` of a rule whose ``regex``
    matched is a ``match.expand()`` template: ``\\1`` and ``\\g<name>`` insert groups, so
    literal backslashes must be doubled. ``reply`` may be a callable of the request instead.
    ``times`` caps how often the rule answers; ``status`` != 200 answers an OpenAI-style
    error whose message is the reply; ``delay_seconds`` sleeps before answering.
    """

    reply: str | ReplyFn = ""
    _: KW_ONLY
    model: str | None = None
    contains: str | None = None
    regex: str | None = None
    status: int = 200
    times: int | None = None
    delay_seconds: float = 0.0

    def __post_init__(self) -> None:
        if self.regex is not None:
            re.compile(self.regex)  # a bad pattern fails when the script is built, not mid-test

    def match(self, model: str, text: str) -> tuple[bool, re.Match[str] | None]:
        """Whether the rule applies to this request, and its regex match if any."""
        if self.model is not None and _bare(self.model) != _bare(model):
            return False, None
        if self.contains is not None and self.contains not in text:
            return False, None
        found = None if self.regex is None else re.search(self.regex, text, re.DOTALL)
        return self.regex is None or found is not None, found

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Rule:
        if unknown := set(d) - _RULE_KEYS:
            raise ValueError(f"unknown rule keys: {sorted(unknown)}")
        if not isinstance(reply := d.get("reply", ""), str):
            raise ValueError("a rule's reply must be a string")
        return cls(reply, **{k: d[k] for k in _RULE_KEYS - {"reply"} if k in d})


@dataclass
class Script:
    """Rules (tried in order), per-model reply sequences (consumed in order), a default.

    A sequence entry that is a :class:`Rule` supplies reply, status and delay; its match
    conditions are ignored. :meth:`from_dict` takes the same shape as JSON:
    ``{"rules": [{"reply": "..", "regex": ".."}], "sequences": {"root": ["..", {"reply":
    "busy", "status": 429}]}, "default": ".."}``.
    """

    rules: list[Rule] = field(default_factory=list)
    sequences: dict[str, list[str | Rule]] = field(default_factory=dict)
    default: str | None = None

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Script:
        if unknown := set(d) - {"rules", "sequences", "default"}:
            raise ValueError(f"unknown script keys: {sorted(unknown)}")
        if not isinstance(default := d.get("default"), str | None):
            raise ValueError("the script default must be a string")
        sequences: dict[str, list[str | Rule]] = {
            str(model): [e if isinstance(e, str) else Rule.from_dict(e) for e in entries]
            for model, entries in d.get("sequences", {}).items()
        }
        return cls([Rule.from_dict(r) for r in d.get("rules", [])], sequences, default)

    @classmethod
    def from_json_file(cls, path: str | Path) -> Script:
        return cls.from_dict(json.loads(Path(path).read_text(encoding="utf-8")))


class ScriptedLMServer:
    """The scripted server, on a daemon thread; binds in :meth:`start`."""

    def __init__(
        self,
        script: Script | None = None,
        host: str = "127.0.0.1",
        port: int = 0,
        *,
        context_window: int | None = None,
    ):
        self._script = script or Script()
        # Tokens a request may take, prompt and max_tokens together (model_limits.py).
        self.context_window = context_window
        self._host, self._wanted_port = host, port
        self._lock = threading.Lock()
        self._requests: list[RecordedRequest] = []
        self._next: dict[str, int] = {}  # bare model -> index of its next sequence entry
        self._uses: dict[int, int] = {}  # id(rule) -> times it answered
        self._httpd: _HTTPServer | None = None
        self._thread: threading.Thread | None = None

    def start(self) -> ScriptedLMServer:
        if self._httpd is not None:
            raise RuntimeError("ScriptedLMServer already started")
        self._httpd = _HTTPServer((self._host, self._wanted_port), _Handler)
        self._httpd.owner = self
        # A short poll interval makes stop() fast: shutdown() waits for the loop to notice.
        self._thread = threading.Thread(
            target=self._httpd.serve_forever, args=(0.05,), name="scripted-lm", daemon=True
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        httpd, thread, self._httpd, self._thread = self._httpd, self._thread, None, None
        if httpd is not None and thread is not None:
            httpd.shutdown()
            httpd.server_close()
            thread.join()

    def __enter__(self) -> ScriptedLMServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def port(self) -> int:
        if self._httpd is None:
            raise RuntimeError("ScriptedLMServer is not running")
        return int(self._httpd.server_address[1])

    @property
    def base_url(self) -> str:
        return f"http://{self._host}:{self.port}/v1"

    @property
    def requests(self) -> list[RecordedRequest]:
        with self._lock:
            return list(self._requests)

    def requests_for(self, model: str) -> list[RecordedRequest]:
        return [r for r in self.requests if _bare(r.model) == _bare(model)]

    def clear(self) -> None:
        """Forget the recorded requests; the script and its progress stay."""
        with self._lock:
            self._requests.clear()

    def add_rule(self, rule: Rule) -> None:
        with self._lock:  # copy-on-write: never mutate the caller's Script
            self._script = replace(self._script, rules=[*self._script.rules, rule])

    def set_sequence(self, model: str, entries: Sequence[str | Rule]) -> None:
        """Replace the sequence of ``model`` and restart it from its first entry."""
        with self._lock:
            seqs = {m: e for m, e in self._script.sequences.items() if _bare(m) != _bare(model)}
            self._script = replace(self._script, sequences={**seqs, model: list(entries)})
            self._next.pop(_bare(model), None)

    def set_script(self, script: Script) -> None:
        with self._lock:
            self._script, self._next, self._uses = script, {}, {}

    def reset(self) -> None:
        """An empty script and no recorded requests."""
        self.set_script(Script())
        self.clear()

    def _model_names(self) -> list[str]:
        with self._lock:
            names = [r.model for r in self._script.rules if r.model]
            return list(dict.fromkeys(_bare(m) for m in [*names, *self._script.sequences]))

    def _choose(self, model: str, text: str) -> tuple[Rule, re.Match[str] | None] | None:
        # Under the lock, so `times` and sequence positions hold with concurrent requests.
        with self._lock:
            for rule in self._script.rules:
                used = self._uses.get(id(rule), 0)
                matched, found = rule.match(model, text)
                if matched and (rule.times is None or used < rule.times):
                    self._uses[id(rule)] = used + 1
                    return rule, found
            bare = _bare(model)
            for name, entries in self._script.sequences.items():
                if _bare(name) == bare and (index := self._next.get(bare, 0)) < len(entries):
                    self._next[bare] = index + 1
                    entry = entries[index]
                    return (entry if isinstance(entry, Rule) else Rule(entry)), None
            default = self._script.default
            return None if default is None else (Rule(default), None)

    def _answer(self, body: dict[str, Any], headers: Headers) -> tuple[int, str, float]:
        """Choose and record the answer: (status, reply or error message, delay)."""
        record = RecordedRequest(str(body.get("model", "")), body["messages"], body, headers)
        text, chosen = record.last_user_message, None
        if (choice := self._choose(record.model, text)) is None:
            record.status = 500
            message = (
                f"scripted LM: no rule or sequence entry left for model '{record.model}'; "
                f"last user message starts: {text[:200]}"
            )
        else:
            chosen, found = choice
            try:
                if callable(chosen.reply):
                    record.reply = chosen.reply(record)
                else:
                    record.reply = found.expand(chosen.reply) if found else chosen.reply
                record.status, message = chosen.status, record.reply
            except Exception as exc:  # a broken script must fail the request, not hang it
                record.status, message = 500, f"scripted LM: reply failed: {exc!r}"
        # Recorded before answering, so a client holding its response finds the record.
        with self._lock:
            self._requests.append(record)
        return record.status, message, chosen.delay_seconds if chosen else 0.0


class _HTTPServer(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 128  # the default listen backlog of 5 refuses bursts of parallel calls
    owner: ScriptedLMServer

    def handle_error(self, request: Any, client_address: Any) -> None:
        # A client that hung up (say its timeout fired during a delay) is not a server bug.
        if not isinstance(sys.exc_info()[1], ConnectionError):
            super().handle_error(request, client_address)


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.0"  # a connection per request: nothing lingers after stop()

    def log_message(self, format: str, *args: Any) -> None:
        pass  # access logs would drown test output

    def do_GET(self) -> None:
        path = self.path.split("?")[0].rstrip("/")
        if path == "/health":
            self._json(200, {"status": "ok"})
        elif path in ("/v1/models", "/models"):
            names = cast(_HTTPServer, self.server).owner._model_names()
            data = [
                {"id": n, "object": "model", "created": 0, "owned_by": "scripted"} for n in names
            ]
            self._json(200, {"object": "list", "data": data})
        else:
            self._error(404, f"no route for GET {path}", "not_found")

    def do_POST(self) -> None:
        owner, path = cast(_HTTPServer, self.server).owner, self.path.split("?")[0].rstrip("/")
        if path not in ("/v1/chat/completions", "/chat/completions"):
            return self._error(404, f"no route for POST {path}", "not_found")
        headers = Headers({k.lower(): v for k, v in self.headers.items()})
        try:
            body = json.loads(self.rfile.read(max(0, int(headers.get("content-length") or 0))))
        except ValueError:  # bad Content-Length, UTF-8 or JSON
            body = None
        if not isinstance(body, dict) or not isinstance(body.get("messages"), list):
            bad = body if isinstance(body, dict) else {}
            record = RecordedRequest(str(bad.get("model", "")), [], bad, headers, None, 400)
            with owner._lock:
                owner._requests.append(record)
            what = "needs a 'messages' list" if isinstance(body, dict) else "is not a JSON object"
            return self._error(400, f"request body {what}", "invalid_request")
        prompt = model_limits.prompt_tokens(body["messages"], _text)
        if (refused := model_limits.refusal(body, prompt, owner.context_window)) is not None:
            # Refused before the script is asked, as a real server refuses before generating.
            record = RecordedRequest(str(body.get("model", "")), body["messages"], body, headers)
            record.status, record.reply = 400, refused
            with owner._lock:
                owner._requests.append(record)
            return self._error(400, refused)
        status, message, delay = owner._answer(body, headers)
        time.sleep(delay)
        if status != 200:
            return self._error(status, message)
        message, finish, usage = model_limits.cut(body, message, prompt, owner.context_window)
        head = {"id": f"chatcmpl-{uuid.uuid4().hex[:24]}", "created": int(time.time())}
        head["model"] = body.get("model", "")
        if body.get("stream"):
            return self._stream(head, message, usage, finish)
        reply = {"role": "assistant", "content": message}
        choice = {"index": 0, "message": reply, "logprobs": None, "finish_reason": finish}
        self._json(200, {**head, "object": "chat.completion", "choices": [choice], "usage": usage})

    def _stream(self, head: dict[str, Any], reply: str, usage: dict[str, int], finish: str) -> None:
        def chunk(delta: dict[str, str], finish: str | None = None) -> dict[str, Any]:
            choice = {"index": 0, "delta": delta, "finish_reason": finish}
            return {**head, "object": "chat.completion.chunk", "choices": [choice], "usage": None}

        pieces = [reply[i : i + _PIECE] for i in range(0, len(reply), _PIECE)]
        events = [chunk({"role": "assistant", "content": ""})]
        events += [chunk({"content": piece}) for piece in pieces] + [chunk({}, finish)]
        # As OpenAI does with include_usage: a last chunk without choices carries the usage.
        events.append({**chunk({}), "choices": [], "usage": usage})
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.end_headers()
        for event in [*(json.dumps(e) for e in events), "[DONE]"]:
            self.wfile.write(f"data: {event}\n\n".encode())
            self.wfile.flush()

    def _json(self, status: int, payload: object) -> None:
        data = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _error(self, status: int, message: str, code: str | None = None) -> None:
        kind = _ERRORS.get(status, "server_error" if status >= 500 else "api_error")
        code = code or ("rate_limit_exceeded" if status == 429 else kind)
        self._json(
            status, {"error": {"message": message, "type": kind, "param": None, "code": code}}
        )


def main(argv: Sequence[str] | None = None) -> int:
    """Serve a JSON script (see :meth:`Script.from_dict`) until SIGTERM or SIGINT."""
    parser = argparse.ArgumentParser(prog="python -m rlm_orchestrator.testing.scripted_lm")
    parser.add_argument("--script", required=True, type=Path, help="JSON script file")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0, help="0 picks a free port")
    args = parser.parse_args(argv)
    script, stopping = Script.from_json_file(args.script), threading.Event()

    def on_signal(signum: int, frame: FrameType | None) -> None:
        stopping.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    with ScriptedLMServer(script, args.host, args.port) as server:
        print(f"READY {server.base_url}", flush=True)
        stopping.wait()
    return 0


if __name__ == "__main__":
    sys.exit(main())
