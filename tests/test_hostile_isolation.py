"""Hostile sandboxes (issue 13, findings 2, 3 and 7): a local sandbox attacks other sessions,
the orchestrator and the machine; forked children, fork bombs and memory hogs; a sandbox tied to
the thread that started it. Index of the hostile tests: test_hostile.py."""

from __future__ import annotations

import asyncio
import os
import threading
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import psutil
import pytest
from conftest import (
    API_KEY,
    ROOT_MODEL,
    RUN_TMP,
    SECRET_ENV,
    SERVER_TOKEN,
    ServerProcess,
    repl,
)
from hostile_support import (
    processes_with,
    shown_to_model,
    wait_until_gone,
)

from rlm_orchestrator import RLM
from rlm_orchestrator.testing.scripted_lm import ScriptedLMServer
from rlm_wire.v1 import sandbox_pb2_grpc

# -- finding 2: local sandboxes isolate nothing ------------------------------------------------

# The attacker's code. It is told where everything is; each attempt prints what it got.
ATTACK = """
import json, os, socket
targets = {targets!r}
found = {{}}

def attempt(name, action):
    try:
        found[name] = "GOT " + repr(action())[:300]
    except Exception as exc:
        found[name] = "refused: " + type(exc).__name__

def read(path):
    with open(path, "rb") as source:
        return source.read()

def memory(pid):
    # What a same-user process can do: the orchestrator's heap, searched for keys.
    hits = []
    with open(f"/proc/{{pid}}/mem", "rb") as mem:
        for line in read(f"/proc/{{pid}}/maps").decode().splitlines():
            span, perms = line.split()[:2]
            if "r" in perms and ("[heap]" in line or len(line.split()) < 6):
                start, end = (int(x, 16) for x in span.split("-"))
                try:
                    mem.seek(start)
                    chunk = mem.read(min(end - start, 64 << 20))
                except OSError:
                    continue
                at = chunk.find(b"sk-")
                while at >= 0 and len(hits) < 50:
                    hits.append(chunk[at:at + 40])
                    at = chunk.find(b"sk-", at + 1)
    return hits

def unix(path):
    with socket.socket(socket.AF_UNIX) as connection:
        connection.settimeout(2)
        connection.connect(path)
        return "connected"

def tcp(host, port):
    with socket.create_connection((host, port), timeout=2):
        return "connected"

def foreign_processes():
    mine = {{os.getpid(), os.getppid()}}
    others = [p for p in os.listdir("/proc") if p.isdigit() and int(p) not in mine]
    others = [p for p in others if read(f"/proc/{{p}}/cmdline").find(b"sandbox_agent.worker") < 0]
    if not others:
        raise LookupError("no other process in sight")
    return others

for index, path in enumerate(targets["files"]):
    attempt(f"file {{index}}", lambda path=path: read(path))
attempt("list the victim's dir", lambda: os.listdir(targets["root"]))
for pid in targets["pids"]:
    attempt(f"environ of {{pid}}", lambda pid=pid: read(f"/proc/{{pid}}/environ"))
    attempt(f"memory of {{pid}}", lambda pid=pid: memory(pid))
    attempt(f"signal {{pid}}", lambda pid=pid: os.kill(pid, 0))
attempt("victim's agent socket", lambda: unix(targets["socket"]))
attempt("docker socket", lambda: unix("/var/run/docker.sock"))
attempt("scripted LM", lambda: tcp("127.0.0.1", targets["lm_port"]))
attempt("public address", lambda: tcp("1.1.1.1", 443))
attempt("other processes", foreign_processes)
print("ATTACK", json.dumps(found, sort_keys=True))
"""


def attack_code(root: Path, pids: list[int], lm: ScriptedLMServer, extra_files: list[Path]) -> str:
    files = [str(p) for p in sorted(root.rglob("*")) if p.is_file()] + [str(p) for p in extra_files]
    targets = {
        "root": str(root),
        "files": files,
        "pids": pids,
        "socket": str(root / "agent.sock"),
        "lm_port": int(lm.base_url.rsplit(":", 1)[1].split("/")[0]),
    }
    return ATTACK.format(targets=targets)


def assert_everything_refused(shown: str, secrets: list[str]) -> None:
    assert "ATTACK {" in shown, shown[-3000:]
    report = shown.split("ATTACK ", 1)[1].split("\n", 1)[0]
    for secret in secrets:
        assert secret not in shown, f"the attacker got {secret!r}"
    assert '"GOT' not in report, report


def sandbox_pids(agent_pid: int) -> list[int]:
    """The agent and every process under it (the victim's worker, its jail's init...)."""
    agent = psutil.Process(agent_pid)
    return [agent_pid, *(child.pid for child in agent.children(recursive=True))]


def test_a_session_cannot_reach_another_session_or_the_orchestrator(
    make_rlm: Callable[..., RLM], lm: ScriptedLMServer
) -> None:
    marker = uuid.uuid4().hex
    victim_context, victim_value = f"context-secret-{marker}", f"variable-secret-{marker}"
    victim = make_rlm(persistent=True, root=[repl(f"kept = {victim_value!r}"), "FINAL(first)"])
    try:
        assert victim.completion(victim_context).response == "first"
        assert victim._session is not None
        state = victim._session.sandbox.provider_state
        assert state.isolation == "namespaces"
        pids = [os.getpid(), *sandbox_pids(state.process.pid)]
        code = attack_code(state.root, pids, lm, extra_files=[])

        attacker = make_rlm(root=[repl(code), "FINAL(done)"])
        assert attacker.completion("attacker's context").response == "done"
        secrets = [victim_context, victim_value, state.token, API_KEY, *SECRET_ENV.values()]
        assert_everything_refused(shown_to_model(lm), secrets)

        # Without its token, even the orchestrator's own user cannot call the victim's agent.
        assert (state.root.stat().st_mode & 0o777) == 0o700
        assert ((state.root / "agent.sock").stat().st_mode & 0o777) == 0o600
        assert _unauthenticated(state.root / "agent.sock")

        lm.set_sequence(ROOT_MODEL, [repl("print(context_0[:15])"), "FINAL_VAR(kept)"])
        assert victim.completion("second").response == victim_value
        assert "context-secret-" in shown_to_model(lm)
    finally:
        victim.close()


def _unauthenticated(socket_path: Path) -> bool:

    import grpc

    from rlm_wire.v1 import sandbox_pb2

    async def call() -> grpc.StatusCode:
        async with grpc.aio.insecure_channel(f"unix:{socket_path}") as channel:
            stub = sandbox_pb2_grpc.SandboxStub(channel)
            try:
                read = stub.GetVariable(sandbox_pb2.GetVariableRequest(name="kept"), timeout=10)
                async for _ in read:
                    pass
            except grpc.aio.AioRpcError as exc:
                return exc.code()
            return grpc.StatusCode.OK

    return asyncio.run(call()) == grpc.StatusCode.UNAUTHENTICATED


def test_through_serve_a_tenant_cannot_reach_another_or_the_servers_secrets(
    orchestrator_server: ServerProcess, lm: ScriptedLMServer
) -> None:
    marker = uuid.uuid4().hex
    victim_context, victim_value = f"context-secret-{marker}", f"variable-secret-{marker}"
    before = set(RUN_TMP.glob("rlm-sbx-*"))
    with orchestrator_server.client() as client, client.create_session() as session:
        lm.set_sequence(ROOT_MODEL, [repl(f"kept = {victim_value!r}"), "FINAL(first)"])
        assert session.completion(victim_context, "remember").response == "first"
        [victim_root] = set(RUN_TMP.glob("rlm-sbx-*")) - before
        agents = [p for p in psutil.Process(orchestrator_server.process.pid).children()]
        pids = [orchestrator_server.process.pid]
        for agent in agents:
            pids += sandbox_pids(agent.pid)
        code = attack_code(victim_root, pids, lm, extra_files=[orchestrator_server.config])

        lm.set_sequence(ROOT_MODEL, [repl(code), "FINAL(done)"])
        assert client.completion("attacker's context", "attack").response == "done"
        secrets = [victim_context, victim_value, SERVER_TOKEN, *SECRET_ENV.values()]
        assert_everything_refused(shown_to_model(lm), secrets)

        lm.set_sequence(ROOT_MODEL, ["FINAL_VAR(kept)"])
        assert session.completion("again", "answer").response == victim_value


# -- finding 3: a forked child outlives its sandbox --------------------------------------------


def detached_child(marker: str) -> str:
    """Code that starts a process in a session of its own (out of the worker's group)."""
    return (
        "import subprocess, sys\n"
        "child = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(600)', "
        f"{marker!r}], start_new_session=True)\n"
        "print('spawned')"
    )


ALIVE = "import os\nos.kill(child.pid, 0)\nprint('child alive')"


@pytest.mark.parametrize("via", ["local", "docker"], indirect=True)
def test_a_setsid_child_does_not_outlive_its_sandbox(
    make_rlm: Callable[..., RLM], lm: ScriptedLMServer, via: str
) -> None:
    marker = f"rlm-hostile-{uuid.uuid4().hex}"
    rlm = make_rlm(root=[repl(detached_child(marker)), repl(ALIVE), "FINAL(ok)"])
    assert rlm.completion("ctx").response == "ok"
    assert "child alive" in shown_to_model(lm)
    assert wait_until_gone(marker) == []  # released: the sandbox took it with it


@pytest.mark.parametrize("via", ["local", "docker"], indirect=True)
def test_a_setsid_child_does_not_survive_an_exec_timeout(
    make_rlm: Callable[..., RLM], lm: ScriptedLMServer, via: str
) -> None:
    marker = f"rlm-hostile-{uuid.uuid4().hex}"
    stubborn = "import signal\nsignal.signal(signal.SIGINT, signal.SIG_IGN)\nwhile True: pass"
    rlm = make_rlm(
        persistent=True,
        root=[repl(f"{detached_child(marker)}\n{stubborn}"), repl("print('after')"), "FINAL(ok)"],
        environment_kwargs={"exec_timeout_seconds": 1.0},
    )
    try:
        assert rlm.completion("ctx").response == "ok"
        assert "TimeoutError" in "\n".join(
            str(m["content"]) for m in lm.requests_for(ROOT_MODEL)[1].messages
        )
        assert wait_until_gone(marker) == []  # the sandbox lives on; the child does not
        lm.set_sequence(ROOT_MODEL, [repl("print(len(context_0))"), "FINAL(still)"])
        assert rlm.completion("ctx2").response == "still"
    finally:
        rlm.close()


def test_a_fork_bomb_is_capped_by_the_default_process_limit(
    make_rlm: Callable[..., RLM], lm: ScriptedLMServer
) -> None:
    # The children are forks of the worker: the leak check finds any that outlive the test.
    bomb = (
        "import os, time\nforked = 0\ntry:\n    for _ in range(1024):\n"
        "        if os.fork() == 0:\n            time.sleep(60)\n            os._exit(0)\n"
        "        forked += 1\n"
        "except OSError as exc:\n    print('refused after', forked, type(exc).__name__, exc)"
    )
    rlm = make_rlm(root=[repl(bomb), repl("print('next block runs')"), "FINAL(ok)"])
    assert rlm.completion("ctx").response == "ok"
    shown = "\n".join(str(m["content"]) for m in lm.requests_for(ROOT_MODEL)[1].messages)
    assert "refused after" in shown and "Resource temporarily unavailable" in shown
    forked = int(shown.split("refused after ", 1)[1].split()[0])
    assert forked < 128
    assert "next block runs" in shown_to_model(lm)


def test_ten_gigabytes_fail_under_the_default_memory_limit(
    make_rlm: Callable[..., RLM], lm: ScriptedLMServer
) -> None:
    rlm = make_rlm(
        root=[
            repl("kept = 7\nblob = bytearray(10 * 1024**3)"),
            repl("print(kept * 6)"),
            "FINAL(ok)",
        ]
    )
    assert rlm.completion("ctx").response == "ok"
    shown = "\n".join(str(m["content"]) for m in lm.requests_for(ROOT_MODEL)[1].messages)
    assert "MemoryError" in shown
    assert "42" in shown_to_model(lm)


# -- finding 7: the local agent dies with the thread that started it ---------------------------


def test_a_persistent_rlm_first_used_from_a_thread_keeps_its_sandbox(
    make_rlm: Callable[..., RLM], lm: ScriptedLMServer
) -> None:
    rlm = make_rlm(persistent=True, root=[repl("kept = 42"), "FINAL(first)"])
    answers: list[str] = []
    try:
        thread = threading.Thread(target=lambda: answers.append(rlm.completion("c").response))
        thread.start()
        thread.join()
        assert answers == ["first"]
        assert rlm._session is not None
        sandbox = rlm._session.sandbox
        lm.set_sequence(ROOT_MODEL, ["FINAL_VAR(kept)"])
        assert rlm.completion("c2").response == "42"  # the variable is still there
        assert rlm._session.sandbox is sandbox  # the same sandbox, not a replacement
    finally:
        rlm.close()


@pytest.fixture(autouse=True)
def _no_marker_left() -> Iterator[None]:
    yield
    assert processes_with("rlm-hostile-") == []
