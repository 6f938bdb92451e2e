"""The sandbox agent over real gRPC: streaming, limits, crashes, bad input.

Each test talks to a real `python -m sandbox_agent` process through AgentClient (the same
client the orchestrator uses), via the local provider.
"""

from __future__ import annotations

import asyncio
import os
import sys
import time
from collections.abc import AsyncIterator, Sequence
from pathlib import Path

import grpc
import pytest

from rlm_orchestrator.exceptions import SandboxError
from rlm_orchestrator.sandbox import Sandbox, SandboxSpec, SubCallOutcome
from rlm_orchestrator.sandbox.agent_client import AgentClient, ExecutionReport
from rlm_orchestrator.sandbox.local import LocalProvider
from rlm_wire.auth import bearer_metadata, channel_credentials
from rlm_wire.v1 import sandbox_pb2 as pb
from rlm_wire.v1 import sandbox_pb2_grpc
from tests.fakes.certs import make_test_pki


@pytest.fixture
async def sandbox() -> AsyncIterator[Sandbox]:
    provider = LocalProvider()
    box = await provider.acquire(
        SandboxSpec(session_id="test", exec_timeout_seconds=2.0, max_output_chars=100_000)
    )
    try:
        yield box
    finally:
        await provider.aclose()


class Recorder:
    """Collects the events of one execution in arrival order."""

    def __init__(self, answers: dict[str, str] | None = None) -> None:
        self.events: list[tuple[str, str]] = []
        self.answers = answers or {}

    async def on_output(self, stream: str, text: str) -> None:
        self.events.append((stream, text))

    async def on_sub_call(
        self, prompts: list[str], model: str, kind: str
    ) -> Sequence[SubCallOutcome]:
        self.events.append(("sub_call", f"{kind}:{model}:{len(prompts)}"))
        await asyncio.sleep(0.01 * len(prompts))
        return [
            SubCallOutcome(error="no such prompt")
            if p == "fail"
            else SubCallOutcome(text=self.answers.get(p, f"answer to {p}"))
            for p in prompts
        ]


async def run(
    box: Sandbox, code: str, recorder: Recorder | None = None, **kwargs: float
) -> ExecutionReport:
    recorder = recorder or Recorder()
    return await box.client.execute(
        code, on_output=recorder.on_output, on_sub_call=recorder.on_sub_call, **kwargs
    )  # type: ignore[arg-type]


async def test_state_persists_and_variables_are_listed(sandbox: Sandbox) -> None:
    await run(sandbox, "x = 41\ndef f(): return x + 1")
    report = await run(sandbox, "y = f()\nprint(y)")
    assert report.status == "ok"
    assert report.stdout == "42\n"
    assert [name for name, _ in report.variables] == ["x", "f", "y"]
    assert dict(report.variables)["f"] == "function"


async def test_output_streams_before_the_block_ends() -> None:
    # The first chunk must reach the orchestrator while the code is still sleeping.
    provider = LocalProvider()
    box = await provider.acquire(SandboxSpec(session_id="stream"))
    try:
        order: list[str] = []
        first_chunk = asyncio.Event()

        async def on_output(stream: str, text: str) -> None:
            order.append(f"chunk:{text.strip()}")
            first_chunk.set()

        async def no_calls(prompts: list[str], model: str, kind: str) -> list[SubCallOutcome]:
            return []

        execution = asyncio.create_task(
            box.client.execute(
                "import time\nprint('first')\ntime.sleep(1)\nprint('second')",
                on_output=on_output,
                on_sub_call=no_calls,
            )
        )
        await first_chunk.wait()
        order.append("done" if execution.done() else "still running")
        report = await execution
        order.append("result")
        assert order == ["chunk:first", "still running", "chunk:second", "result"]
        assert report.stdout == "first\nsecond\n"
    finally:
        await provider.aclose()


async def test_llm_query_round_trips_on_the_execution_stream(sandbox: Sandbox) -> None:
    recorder = Recorder({"q1": "A1"})
    report = await run(
        sandbox, "print(llm_query('q1'))\nprint(llm_query_batched(['a', 'fail', 'b']))", recorder
    )
    assert report.stdout.splitlines() == [
        "A1",
        "['answer to a', 'Error: no such prompt', 'answer to b']",
    ]
    assert ("sub_call", "llm_query::1") in recorder.events
    assert ("sub_call", "llm_query::3") in recorder.events


async def test_llm_query_from_threads_is_correlated_by_id(sandbox: Sandbox) -> None:
    code = (
        "from concurrent.futures import ThreadPoolExecutor\n"
        "with ThreadPoolExecutor(8) as pool:\n"
        "    answers = list(pool.map(llm_query, [f'p{i}' for i in range(16)]))\n"
        "print(answers == [f'answer to p{i}' for i in range(16)])"
    )
    report = await run(sandbox, code)
    assert report.stdout == "True\n"


async def test_infinite_loop_is_interrupted_and_namespace_survives(sandbox: Sandbox) -> None:
    await run(sandbox, "kept = 'still here'")
    report = await run(sandbox, "while True: pass", timeout_seconds=0.5)
    assert report.status == "timeout"
    assert "TimeoutError" in report.stderr and "0.5 seconds" in report.error
    assert not report.worker_restarted
    assert (await run(sandbox, "print(kept)")).stdout == "still here\n"


async def test_code_that_ignores_interrupts_is_killed_and_worker_replaced(sandbox: Sandbox) -> None:
    await sandbox.client.load_value("context_0", "the context", alias="context")
    await run(sandbox, "lost = 1")
    code = "import signal\nsignal.signal(signal.SIGINT, signal.SIG_IGN)\nwhile True: pass"
    report = await run(sandbox, code, timeout_seconds=0.3)
    assert report.status == "timeout"
    assert report.worker_restarted
    assert "every variable is lost" in report.error
    after = await run(sandbox, "print(context); print('lost' in globals())")
    assert after.stdout == "the context\nFalse\n"


@pytest.mark.parametrize(
    "code, expected",
    [
        ("import os; os._exit(3)", "exited with code 3"),
        ("import os, signal; os.kill(os.getpid(), signal.SIGKILL)", "killed by signal SIGKILL"),
    ],
)
async def test_worker_death_is_reported_and_sandbox_stays_usable(
    sandbox: Sandbox, code: str, expected: str
) -> None:
    report = await run(sandbox, code)
    assert report.status == "worker_died"
    assert expected in report.error and report.worker_restarted
    assert (await run(sandbox, "print(1 + 1)")).stdout == "2\n"


async def test_huge_output_is_capped_with_head_tail_and_marker(sandbox: Sandbox) -> None:
    # 200 MB printed; the orchestrator receives only the cap (100,000 chars per stream here).
    received = 0
    recorder = Recorder()

    async def count(stream: str, text: str) -> None:
        nonlocal received
        received += len(text)

    code = "print('HEAD')\nfor _ in range(200):\n    print('x' * 1_000_000)\nprint('TAIL')"
    report = await sandbox.client.execute(code, on_output=count, on_sub_call=recorder.on_sub_call)
    assert report.status == "ok"
    assert received < 110_000
    assert report.stdout.startswith("HEAD\n") and report.stdout.endswith("TAIL\n")
    assert "characters of output truncated" in report.stdout
    assert report.truncated_chars > 199_000_000


async def test_fd_level_output_of_child_processes_is_captured(sandbox: Sandbox) -> None:
    report = await run(
        sandbox,
        "import os, subprocess\nos.system('echo from-shell')\n"
        "subprocess.run(['sh', '-c', 'echo to-stderr >&2'])",
    )
    assert report.stdout == "from-shell\n"
    assert report.stderr == "to-stderr\n"


async def test_sandbox_environment_has_no_secrets(sandbox: Sandbox) -> None:
    report = await run(sandbox, "import os, json\nprint(json.dumps(dict(os.environ)))")
    for secret in ("sk-orchestrator-secret", "orchestrator-secret-token", "API_KEY"):
        assert secret not in report.stdout
    assert os.environ["OPENAI_API_KEY"].startswith(
        "sk-orchestrator-secret"
    )  # the test's own env had it


async def test_exceptions_keep_prior_output_and_assignments(sandbox: Sandbox) -> None:
    report = await run(sandbox, "a = 1\nprint('before')\nraise ValueError('bad value')\nb = 2")
    assert report.status == "error"
    assert report.stdout == "before\n"
    assert report.stderr.strip().endswith("ValueError: bad value")
    assert "line 3" in report.stderr
    assert [n for n, _ in report.variables] == ["a"]


async def test_syntax_error_and_system_exit_are_errors_not_crashes(sandbox: Sandbox) -> None:
    syntax = await run(sandbox, "def broken(:\n  pass")
    assert syntax.status == "error" and "SyntaxError" in syntax.stderr
    exiting = await run(sandbox, "import sys; sys.exit(4)")
    assert exiting.status == "error" and "SystemExit: 4" in exiting.stderr
    assert not exiting.worker_restarted


async def test_final_var_inside_code_sets_final_answer(sandbox: Sandbox) -> None:
    report = await run(sandbox, "answer = [1, 2]\nFINAL_VAR('answer')\nanswer.append(3)")
    assert report.final_answer_chars == 6  # the text travels apart, in chunks
    value = await sandbox.client.get_variable(final_answer=True)
    assert value.found and value.value == "[1, 2]"  # as it was at the call
    missing = await run(sandbox, "print(FINAL_VAR('nope'))")
    assert missing.final_answer_chars is None and "not found" in missing.stdout
    assert not (await sandbox.client.get_variable(final_answer=True)).found


async def test_load_value_large_json_and_get_variable(sandbox: Sandbox) -> None:
    big = {"items": ["y" * 1000] * 6000}  # ~6 MB: more than one gRPC message
    reply = await sandbox.client.load_value("context_0", big, alias="context")
    assert reply.type_name == "dict"
    report = await run(sandbox, "print(len(context['items']), context is context_0)")
    assert report.stdout == "6000 True\n"
    value = await sandbox.client.get_variable("context_0", max_chars=10)
    assert value.found and value.too_large and value.value == ""  # refused, never cut
    assert value.chars == len(str(big))
    whole = await sandbox.client.get_variable("context_0")
    assert whole.value == str(big) and whole.type_name == "dict"
    missing = await sandbox.client.get_variable("'nothing'")
    assert not missing.found and "context" in missing.available


async def test_big_prompts_are_split_across_requests_or_refused(sandbox: Sandbox) -> None:
    # One request carries at most 16 MiB: a bigger batch goes as several requests, a prompt
    # bigger than that gets an error string (a sub-call is never a 17 MB message).
    recorder = Recorder()
    code = (
        "big = ['a' * 7_000_000, 'b' * 7_000_000, 'c' * 7_000_000]\n"
        "print([answer[:11] for answer in llm_query_batched(big)])\n"
        "print(llm_query('d' * 17_000_000)[:60])"
    )
    report = await run(sandbox, code, recorder)
    assert report.status == "ok", report
    first, second = report.stdout.splitlines()
    assert first == "['answer to a', 'answer to b', 'answer to c']"
    assert second.startswith("Error: the prompt has 17000002 bytes encoded, more than one")
    assert [e for e in recorder.events if e[0] == "sub_call"] == [
        ("sub_call", "llm_query::2"),
        ("sub_call", "llm_query::1"),
    ]


async def test_a_read_given_up_half_way_does_not_confuse_the_next_one(sandbox: Sandbox) -> None:
    # The agent pulls a value from its worker chunk by chunk: a caller that goes away leaves
    # a reply owed, which must be dropped, not taken for the next caller's (or for an attack).
    await run(sandbox, "big = 'x' * 30_000_000\nsmall = 'y'")
    state = sandbox.provider_state
    async with grpc.aio.insecure_channel(f"unix:{state.root / 'agent.sock'}") as channel:
        call = sandbox_pb2_grpc.SandboxStub(channel).GetVariable(
            pb.GetVariableRequest(name="big"), metadata=bearer_metadata(state.token)
        )
        messages = aiter(call)
        assert (await anext(messages)).header.chars == 30_000_000
        assert len((await anext(messages)).chunk) == 256 * 1024
        call.cancel()
    value = await sandbox.client.get_variable("small")
    assert value.value == "y" and value.type_name == "str"
    report = await run(sandbox, "print(len(big))")
    assert report.stdout == "30000000\n" and not report.worker_restarted


async def test_output_of_a_thread_that_outlives_its_block_counts_for_the_next(
    sandbox: Sandbox,
) -> None:
    # The agent counts what arrives between blocks against the next one; so must the worker,
    # or an honest worker would look like one that bypasses its cap.
    code = (
        "import threading, time\n"
        "def chatter():\n"
        "    for _ in range(300):\n"
        "        print('z' * 99)\n"
        "        time.sleep(0.001)\n"
        "threading.Thread(target=chatter, daemon=True).start()"
    )
    await run(sandbox, code, max_output_chars=1_000)
    report = await run(sandbox, "time.sleep(0.5)\nprint('w' * 5_000)", max_output_chars=1_000)
    assert report.status == "ok" and not report.worker_restarted
    assert "the sandbox agent dropped" not in report.stdout
    assert len(report.stdout) <= 1_000 + 100


async def test_bad_requests_get_clear_status_codes(sandbox: Sandbox) -> None:
    with pytest.raises(SandboxError, match=r"INVALID_ARGUMENT.*invalid variable name"):
        await sandbox.client.load_value("not an identifier", "x")
    with pytest.raises(SandboxError, match=r"INVALID_ARGUMENT.*invalid variable name"):
        await sandbox.client.load_value("llm_query", "x")
    # A stream that does not start with `start`.
    state = sandbox.provider_state
    async with grpc.aio.insecure_channel(f"unix:{state.root / 'agent.sock'}") as channel:
        stub = sandbox_pb2_grpc.SandboxStub(channel)

        async def only_answer() -> AsyncIterator[pb.ExecuteRequest]:
            yield pb.ExecuteRequest(llm_response=pb.LlmResponse(request_id=1))

        with pytest.raises(grpc.aio.AioRpcError) as caught:
            async for _ in stub.Execute(only_answer(), metadata=bearer_metadata(state.token)):
                pass
        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert (await run(sandbox, "print('still serving')")).stdout == "still serving\n"


async def test_second_concurrent_execution_is_refused(sandbox: Sandbox) -> None:
    first = asyncio.create_task(run(sandbox, "import time; time.sleep(2)", timeout_seconds=30))
    await asyncio.sleep(0.2)
    with pytest.raises(SandboxError, match="FAILED_PRECONDITION"):
        await run(sandbox, "x = 1")
    assert (await first).status == "ok"


async def test_cancelling_the_call_stops_the_code(sandbox: Sandbox) -> None:
    await run(sandbox, "import time")
    task = asyncio.create_task(run(sandbox, "while True: time.sleep(0.01)", timeout_seconds=60))
    await asyncio.sleep(0.3)
    started = time.monotonic()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    # The agent interrupted the code: the next execution runs at once.
    assert (await run(sandbox, "print('next')")).stdout == "next\n"
    assert time.monotonic() - started < 30  # bounded, not a timing assertion on speed


async def test_a_forked_child_neither_corrupts_the_protocol_nor_acts_as_the_worker(
    sandbox: Sandbox,
) -> None:
    code = (
        "import os\npid = os.fork()\nif pid == 0:\n    print('from the child')\n"
        "    raise ValueError('child error')\nos.waitpid(pid, 0)\nprint('from the parent')"
    )
    report = await run(sandbox, code)
    assert report.status == "ok"
    assert "from the parent" in report.stdout
    assert (await run(sandbox, "print('next block')")).stdout == "next block\n"


async def test_agent_listens_on_tcp_and_serves_reflection_on_request(tmp_path: Path) -> None:
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "sandbox_agent",
        "--reflection",
        "--listen",
        "127.0.0.1:0",
        "--workdir",
        str(tmp_path / "work"),
        "--state-dir",
        str(tmp_path / "state"),
        stdout=asyncio.subprocess.PIPE,
    )
    try:
        assert process.stdout is not None
        line = (await asyncio.wait_for(process.stdout.readline(), 30)).decode()
        assert line.startswith("LISTENING port ")
        client = AgentClient(f"127.0.0.1:{line.split()[-1]}")
        try:
            await client.wait_ready(10)
            assert (await client.info()).workdir == str(tmp_path / "work")
            port = line.split()[-1]
            services = await asyncio.to_thread(_reflected_services, f"127.0.0.1:{port}")
            assert "rlm.v1.Sandbox" in services
        finally:
            await client.close()
    finally:
        process.terminate()
        assert await asyncio.wait_for(process.wait(), 10) == 0


async def test_agent_over_tls_requires_its_token_and_hides_it_from_user_code(
    tmp_path: Path,
) -> None:
    pki = make_test_pki(tmp_path)
    env = {**os.environ, "RLM_AGENT_TOKEN": "agent-token-123"}
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "sandbox_agent",
        "--listen",
        "127.0.0.1:0",
        "--workdir",
        str(tmp_path / "work"),
        "--state-dir",
        str(tmp_path / "state"),
        "--tls-cert",
        str(pki.server_cert),
        "--tls-key",
        str(pki.server_key),
        stdout=asyncio.subprocess.PIPE,
        env=env,
    )
    try:
        assert process.stdout is not None
        port = (await asyncio.wait_for(process.stdout.readline(), 30)).decode().split()[-1]
        credentials = channel_credentials(pki.ca_cert)
        anonymous = AgentClient(f"localhost:{port}", credentials=credentials)
        trusted = AgentClient(
            f"localhost:{port}",
            credentials=credentials,
            metadata=bearer_metadata("agent-token-123"),
        )
        try:
            await anonymous.wait_ready(10)  # health needs no token (probes)
            with pytest.raises(SandboxError, match="UNAUTHENTICATED"):
                await anonymous.info()
            report = await trusted.execute(
                "import os\nprint(os.environ.get('RLM_AGENT_TOKEN'))\n"
                "try:\n    environ = open(f'/proc/{os.getppid()}/environ').read()\n"
                "    print('unreadable' if 'agent-token-123' not in environ else 'LEAKED')\n"
                "except OSError:\n    print('unreadable')",
                on_output=Recorder().on_output,
                on_sub_call=Recorder().on_sub_call,
            )
            assert report.stdout == "None\nunreadable\n"
        finally:
            await anonymous.close()
            await trusted.close()
    finally:
        process.terminate()
        assert await asyncio.wait_for(process.wait(), 10) == 0


def _reflected_services(target: str) -> list[str]:
    from grpc_reflection.v1alpha.proto_reflection_descriptor_database import (
        ProtoReflectionDescriptorDatabase,
    )

    with grpc.insecure_channel(target) as channel:
        return list(ProtoReflectionDescriptorDatabase(channel).get_services())


def test_a_killed_orchestrator_leaves_no_local_sandbox_behind() -> None:
    script = (
        "import asyncio\n"
        "from rlm_orchestrator.sandbox import SandboxSpec\n"
        "from rlm_orchestrator.sandbox.local import LocalProvider\n"
        "async def main():\n"
        "    box = await LocalProvider().acquire(SandboxSpec(session_id='doomed'))\n"
        "    print((await box.client.info()).agent_pid, flush=True)\n"
        "    await asyncio.sleep(600)\n"
        "asyncio.run(main())\n"
    )
    import subprocess

    import psutil

    orchestrator = subprocess.Popen(
        [sys.executable, "-c", script], stdout=subprocess.PIPE, text=True
    )
    assert orchestrator.stdout is not None
    agent = psutil.Process(int(orchestrator.stdout.readline()))
    orchestrator.kill()  # SIGKILL: no clean-up code of the orchestrator runs
    orchestrator.wait()
    orchestrator.stdout.close()
    agent.wait(10)  # the agent stops by itself (and takes its worker with it)
    # Its sandbox dir is removed by the next local provider's reconcile pass.
    assert asyncio.run(LocalProvider().reconcile()) == 1
