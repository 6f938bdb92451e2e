"""A traced, scripted completion for the viewer's tests, and a headless chromium to look at it.

The completion runs in a subprocess (a tracer provider is process-global) that records into a
SQLite trace store with content (RLM_TRACE_CONTENT), against the session's scripted LM.
Chromium is Debian's (`.ci/install-test-tools` installs it under CI): `--dump-dom` gives the
DOM after the page's scripts ran (`--virtual-time-budget` lets its fetches finish first) and
`--screenshot` a PNG.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import pytest
from conftest import API_KEY, SUB_MODEL, repl

from rlm_orchestrator.testing.scripted_lm import RecordedRequest, Rule, ScriptedLMServer

SUB_CALLS = 15
# Each sub-call waits this long in the scripted LM: long enough that the 15 overlap visibly.
SUB_CALL_DELAY = 0.4
FIRST_TURN_MESSAGES = 3  # system prompt, context metadata, the turn's user prompt

ROOT_TURN_1 = "Let me ask 15 sub-models at once, then a child RLM.\n" + repl(
    f"prompts = [f'item {{i}}' for i in range({SUB_CALLS})]\n"
    "answers = llm_query_batched(prompts)\n"
    "print(len(answers), answers[0])\n"
    "child = rlm_query('the child question')\n"
    "print('child said', child)"
)
ROOT_TURN_2 = "All done.\nFINAL_VAR(child)"

_SCRIPT = """
import json, sys
from rlm_orchestrator import RLM
kwargs = json.loads(sys.argv[1])
rlm = RLM(**kwargs)
result = rlm.completion("the parent's context")
print(json.dumps({"response": result.response, "usage": result.usage_summary.to_dict()}))
"""


def _child(request: RecordedRequest) -> str:
    """The child RLM's root model: one block, then its answer."""
    if len(request.messages) == FIRST_TURN_MESSAGES:
        return repl("r = context.upper()\nprint(r)")
    return "FINAL_VAR(r)"


def script_completion(lm: ScriptedLMServer, root: list[str] | None = None) -> None:
    """Root: turn 1 runs 15 concurrent sub-calls and a child RLM, turn 2 answers."""
    lm.set_sequence("root", root or [ROOT_TURN_1, ROOT_TURN_2])
    lm.add_rule(
        Rule(r"answer \1", model=SUB_MODEL, regex=r"^item (\d+)$", delay_seconds=SUB_CALL_DELAY)
    )
    lm.add_rule(Rule(_child, model=SUB_MODEL))


@dataclass
class Recorded:
    store: Path
    response: str
    usage: dict[str, Any]


def run_traced(lm: ScriptedLMServer, store: Path, *, max_depth: int = 2) -> Recorded:
    """One completion in a subprocess, traced into `store` with content."""
    prices = {"input_cost_per_token": 1e-6, "output_cost_per_token": 2e-6}

    def backend(model: str) -> dict[str, Any]:
        return {"model_name": model, "api_base": lm.base_url, "api_key": API_KEY, **prices}

    kwargs = {
        "backend_kwargs": backend("root"),
        "other_backends": ["openai"],
        "other_backend_kwargs": [backend(SUB_MODEL)],
        "max_depth": max_depth,
        "max_iterations": 4,
    }
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OTEL_", "RLM_TRACE"))}
    env |= {"RLM_TRACE_STORE": str(store), "RLM_TRACE_CONTENT": "1"}
    done = subprocess.run(
        [sys.executable, "-c", _SCRIPT, json.dumps(kwargs)],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    return Recorded(store, result["response"], result["usage"])


def chromium() -> str:
    """Debian's chromium; skips (fails in CI: tests/skip_policy.py) when it is missing."""
    found = shutil.which("chromium") or shutil.which("chromium-browser")
    if found is None:
        pytest.skip("chromium is not installed (.ci/install-test-tools installs it)")
    return found


def _browse(url: str, *args: str, budget_ms: int = 8000) -> subprocess.CompletedProcess[str]:
    # A profile of its own, removed after: no state shared between runs, nothing left.
    with tempfile.TemporaryDirectory(prefix="chromium-") as profile:
        command = [
            chromium(),
            "--headless",
            "--no-sandbox",  # root in CI's container: chromium's own sandbox cannot start
            "--disable-gpu",
            "--disable-dev-shm-usage",  # containers' /dev/shm is often too small for it
            "--no-first-run",
            "--disable-extensions",
            f"--user-data-dir={profile}",
            f"--virtual-time-budget={budget_ms}",
            *args,
            url,
        ]
        return subprocess.run(
            command, capture_output=True, text=True, timeout=90, check=False, cwd=profile
        )


def dump_dom(url: str) -> str:
    done = _browse(url, "--dump-dom")
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


def screenshot(url: str, path: Path, width: int = 1400, height: int = 1800) -> Path:
    done = _browse(url, f"--screenshot={path}", f"--window-size={width},{height}")
    assert done.returncode == 0 and path.is_file(), done.stderr[-3000:]
    return path


# -- the dumped DOM, parsed with the standard library ----------------------------------------------

VOID = {"meta", "link", "img", "br", "hr", "input", "source", "area", "base", "col", "wbr"}


@dataclass
class Element:
    tag: str
    attrs: dict[str, str]
    children: list[Element | str]

    @property
    def classes(self) -> set[str]:
        return set(self.attrs.get("class", "").split())

    @property
    def text(self) -> str:
        return "".join(c if isinstance(c, str) else c.text for c in self.children)

    def find_all(self, tag: str | None = None, cls: str | None = None) -> list[Element]:
        found: list[Element] = []
        for child in self.children:
            if isinstance(child, Element):
                if (tag is None or child.tag == tag) and (cls is None or cls in child.classes):
                    found.append(child)
                found += child.find_all(tag, cls)
        return found

    def style(self) -> dict[str, str]:
        pairs = (p.split(":", 1) for p in self.attrs.get("style", "").split(";") if ":" in p)
        return {k.strip(): v.strip() for k, v in pairs}


class _Builder(HTMLParser):
    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.root = Element("#document", {}, [])
        self.stack = [self.root]

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        element = Element(tag, {k: v or "" for k, v in attrs}, [])
        self.stack[-1].children.append(element)
        if tag not in VOID:
            self.stack.append(element)

    def handle_endtag(self, tag: str) -> None:
        for i in range(len(self.stack) - 1, 0, -1):
            if self.stack[i].tag == tag:
                del self.stack[i:]
                return

    def handle_data(self, data: str) -> None:
        self.stack[-1].children.append(data)


def parse_dom(html: str) -> Element:
    builder = _Builder()
    builder.feed(html)
    builder.close()
    return builder.root


def percent(value: str) -> float:
    assert value.endswith("%"), value
    return float(value[:-1])


@contextlib.contextmanager
def viewer(store: Path, **env: str) -> Iterator[str]:
    """`rlm-orchestrator ui` on a free port, as a subprocess: its URL."""
    command = [sys.executable, "-m", "rlm_orchestrator.cli", "ui", "--store", str(store)]
    process = subprocess.Popen(
        [*command, "--listen", "127.0.0.1:0"],
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ, **env},
    )
    try:
        assert process.stdout is not None
        line = process.stdout.readline()
        assert line.startswith("VIEWER "), f"the viewer did not start: {line!r}"
        yield line.split()[1]
    finally:
        process.terminate()
        try:
            process.wait(15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        if process.stdout is not None:
            process.stdout.close()
