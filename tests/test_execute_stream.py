"""One Execute stream, many blocks (sandbox.proto, Execute): a real local agent over gRPC.

The orchestrator keeps one Execute call open per sandbox; every block on it is accounted on
its own, and a client that runs one block per call keeps working.
"""

from __future__ import annotations

import signal
from collections.abc import AsyncIterator, Sequence
from typing import Any

import grpc
import pytest

from rlm_orchestrator.sandbox import Sandbox, SandboxSpec, SubCallOutcome
from rlm_orchestrator.sandbox.local import LocalProvider
from rlm_wire.auth import bearer_metadata
from rlm_wire.v1 import sandbox_pb2 as pb
from rlm_wire.v1 import sandbox_pb2_grpc


@pytest.fixture
async def sandbox() -> AsyncIterator[Sandbox]:
    provider = LocalProvider()
    box = await provider.acquire(SandboxSpec(session_id="stream", exec_timeout_seconds=10.0))
    try:
        yield box
    finally:
        await provider.aclose()


async def _no_output(stream: str, text: str) -> None:
    return None


async def _echo(prompts: list[str], model: str, kind: str) -> Sequence[SubCallOutcome]:
    return [SubCallOutcome(text=f"answer to {p}") for p in prompts]


def _start(code: str) -> pb.ExecuteRequest:
    return pb.ExecuteRequest(start=pb.ExecuteStart(code=code, timeout_seconds=10))


def _answer(request_id: int, text: str) -> pb.ExecuteRequest:
    results = [pb.LlmResult(text=text)]
    return pb.ExecuteRequest(llm_response=pb.LlmResponse(request_id=request_id, results=results))


async def _until_result(call: Any, on_request: Any = None) -> tuple[str, pb.ExecuteResult]:
    """The block's stdout and its result; LlmRequests go to `on_request`."""
    stdout = []
    while True:
        message = await call.read()
        assert message is not grpc.aio.EOF, "the stream ended before the result"
        kind = message.WhichOneof("kind")
        if kind == "output":
            stdout.append(message.output.text)
        elif kind == "llm_request":
            await on_request(message.llm_request)
        else:
            return "".join(stdout), message.result


def _raw_call(box: Sandbox) -> tuple[grpc.aio.Channel, Any]:
    state = box.provider_state
    channel = grpc.aio.insecure_channel(f"unix:{state.root / 'agent.sock'}")
    execute = sandbox_pb2_grpc.SandboxStub(channel).Execute
    return channel, execute(metadata=bearer_metadata(state.token), timeout=30)


async def test_blocks_share_one_call(sandbox: Sandbox) -> None:
    client = sandbox.client
    first = await client.execute("x = 41", on_output=_no_output, on_sub_call=_echo)
    link = client._execution
    second = await client.execute(
        "print(x + 1, llm_query('p'))", on_output=_no_output, on_sub_call=_echo
    )
    assert first.status == second.status == "ok"
    assert second.stdout == "42 answer to p\n"
    assert client._execution is link and link is not None and link.blocks == 2


async def test_a_raw_stream_runs_blocks_one_after_another_and_ends_on_half_close(
    sandbox: Sandbox,
) -> None:
    channel, call = _raw_call(sandbox)
    async with channel:
        await call.write(_start("x = 1\nprint('one')"))
        stdout, result = await _until_result(call)
        assert (stdout, result.status, result.stream_open) == (
            "one\n",
            pb.EXECUTION_STATUS_OK,
            True,
        )
        await call.write(_start("print(x + 1)"))
        stdout, result = await _until_result(call)
        assert (stdout, result.status) == ("2\n", pb.EXECUTION_STATUS_OK)
        await call.done_writing()
        assert await call.read() is grpc.aio.EOF
        assert await call.code() == grpc.StatusCode.OK


async def test_a_second_start_before_the_result_ends_the_stream(sandbox: Sandbox) -> None:
    channel, call = _raw_call(sandbox)
    async with channel:
        await call.write(_start("import time\ntime.sleep(30)\nprint('finished')"))
        await call.write(_start("print('second')"))
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await _until_result(call)
        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    # The running block was interrupted: the sandbox serves the next one at once.
    report = await sandbox.client.execute("print('next')", on_output=_no_output, on_sub_call=_echo)
    assert report.stdout == "next\n"


async def test_a_late_answer_never_reaches_the_next_block(sandbox: Sandbox) -> None:
    # Block 1 leaves a sub-call unanswered and its worker dies: the new worker numbers its
    # requests from 1 again. The answer to block 1's request, sent after its result, must be
    # dropped, not taken for block 2's request of the same id.
    channel, call = _raw_call(sandbox)
    requests: list[pb.LlmRequest] = []

    async def hold(request: pb.LlmRequest) -> None:
        requests.append(request)

    async def answer(request: pb.LlmRequest) -> None:
        requests.append(request)
        await call.write(_answer(request.request_id, "fresh"))

    async with channel:
        await call.write(
            _start(
                "import threading, time, os\n"
                "threading.Thread(target=llm_query, args=('p',), daemon=True).start()\n"
                "time.sleep(0.5)\nos._exit(3)"
            )
        )
        _, result = await _until_result(call, hold)
        assert result.status == pb.EXECUTION_STATUS_WORKER_DIED and result.worker_restarted
        await call.write(_answer(requests[0].request_id, "stale"))
        await call.write(_start("print(llm_query('q'))"))
        stdout, result = await _until_result(call, answer)
        assert requests[1].request_id == requests[0].request_id  # the same id, reused
        assert (stdout, result.status) == ("fresh\n", pb.EXECUTION_STATUS_OK)
        await call.done_writing()
        assert await call.read() is grpc.aio.EOF


async def test_output_caps_start_afresh_with_each_block_on_a_stream(sandbox: Sandbox) -> None:
    client = sandbox.client
    for _ in range(3):
        report = await client.execute(
            "print('x' * 5000)", on_output=_no_output, on_sub_call=_echo, max_output_chars=6000
        )
        assert report.status == "ok" and report.truncated_chars == 0
        assert report.stdout == "x" * 5000 + "\n"
    assert client._execution is not None and client._execution.blocks == 3


async def test_an_agent_that_stops_ends_an_idle_stream_at_once() -> None:
    # Between blocks there is nothing to finish: SIGTERM ends the kept stream with OK, not
    # with a cancellation after the server's grace period.
    provider = LocalProvider()
    box = await provider.acquire(SandboxSpec(session_id="stop"))
    try:
        await box.client.execute("x = 1", on_output=_no_output, on_sub_call=_echo)
        link = box.client._execution
        assert link is not None and link.usable
        box.provider_state.process.send_signal(signal.SIGTERM)
        assert await link.call.code() == grpc.StatusCode.OK
    finally:
        await provider.aclose()
