"""Hostile clients of `serve` (issue 13, findings 4, 5 and 9): limits against one token holder,
anonymous callers, undecodable messages and shutdown. Index of the hostile tests:
test_hostile.py."""

from __future__ import annotations

import ast
import asyncio
import collections
import signal
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import grpc
import pytest
from conftest import (
    SANDBOX_IMAGE,
    SERVER_TOKEN,
    SUB_MODEL,
    ServerProcess,
    repl,
    require_docker,
    server_config,
    start_server,
    stop_server,
)
from hostile_support import (
    ANSWER_IN_CODE,
    MB,
    TOKEN_A,
    TOKEN_B,
    Gate,
    RSSSampler,
    _ignore_output,
    _no_sub_calls,
    still_answers,
    until,
)

from rlm_orchestrator import events as ev
from rlm_orchestrator.client import AsyncClient
from rlm_orchestrator.config import DockerConfig, LocalConfig
from rlm_orchestrator.exceptions import (
    AuthenticationError,
    InvalidRequestError,
    ResourceExhaustedError,
    ServerShutdownError,
)
from rlm_orchestrator.sandbox import (
    SandboxSpec,
    create_provider,
)
from rlm_orchestrator.testing.scripted_lm import RecordedRequest, Rule, ScriptedLMServer
from rlm_wire.auth import bearer_metadata
from rlm_wire.v1 import orchestrator_pb2 as pb
from rlm_wire.v1 import orchestrator_pb2_grpc

# -- finding 4: server limits hold against one token holder --------------------------------------


async def test_ten_concurrent_runs_are_admitted_up_to_the_limit_before_any_upload(
    tenant_server: ServerProcess, lm: ScriptedLMServer
) -> None:
    gate = Gate()
    lm.add_rule(gate.hold(ANSWER_IN_CODE))
    context = "held open " * 100_000  # 1 MB: the refused ones must not have sent it
    async with AsyncClient(tenant_server.address, token=SERVER_TOKEN) as client:
        outcomes: list[str] = []
        accepted = asyncio.Event()

        async def one(i: int) -> str:
            try:
                async for event in client.stream(f"{context}{i}"):
                    if isinstance(event, ev.CompletionStarted):
                        outcomes.append("started")
                        if outcomes.count("started") == 4:
                            accepted.set()
                    if isinstance(event, ev.CompletionFinished):
                        return event.result.response
            except ResourceExhaustedError as exc:
                outcomes.append(str(exc))
                return "refused"
            return "no answer"

        tasks = [asyncio.create_task(one(i)) for i in range(10)]
        await asyncio.wait_for(accepted.wait(), 60)
        await until(lambda: len(outcomes) == 10)  # every call answered: 4 accepted, 6 refused
        running = await client.list_completions()
        # A further Run while the four hold their slots (their LM calls wait at the gate).
        with pytest.raises(ResourceExhaustedError, match="max_concurrent_completions=4"):
            await client.completion("one too many")
        gate.open()
        answers = await asyncio.gather(*tasks)
    assert outcomes.count("started") == 4
    refusals = [o for o in outcomes if o != "started"]
    assert len(refusals) == 6
    assert all("max_concurrent_completions=4" in r for r in refusals), refusals
    assert len(running) <= 4
    assert answers.count("refused") == 6
    assert sum(a.startswith("HELD OPEN") for a in answers) == 4
    # The refused ones were refused before their upload: only 4 contexts reached the LM.
    assert gate.arrived == 4
    await still_answers(tenant_server, lm)


async def test_sessions_are_capped_and_count_as_sandboxes(
    tenant_server: ServerProcess, lm: ScriptedLMServer
) -> None:
    """max_sessions=2, max_sandboxes=5: two sessions and three held completions take every
    sandbox, so a fourth completion is refused although max_concurrent_completions=4."""
    gate = Gate()
    lm.add_rule(gate.hold(ANSWER_IN_CODE))
    async with AsyncClient(tenant_server.address, token=SERVER_TOKEN) as client:
        first, second = await client.create_session(), await client.create_session()
        try:
            with pytest.raises(ResourceExhaustedError, match="max_sessions=2"):
                await client.create_session()
            held = [asyncio.create_task(client.completion(f"held {i}")) for i in range(3)]
            await until(lambda: gate.arrived == 3)
            with pytest.raises(ResourceExhaustedError, match="max_sandboxes=5"):
                await client.completion("a sixth sandbox")
            gate.open()
            assert sorted(r.response for r in await asyncio.gather(*held)) == [
                "HELD 0",
                "HELD 1",
                "HELD 2",
            ]
        finally:
            await first.close()
        third = await client.create_session()  # the slot came back
        await second.close()
        await third.close()
    await still_answers(tenant_server, lm)


async def test_options_above_the_server_ceilings_are_refused(
    tenant_server: ServerProcess, lm: ScriptedLMServer
) -> None:
    over = {
        "max_depth": 3,
        "max_iterations": 31,
        "exec_timeout_seconds": 301.0,
        "timeout_seconds": 3601.0,
        "iteration_timeout_seconds": 121.0,
        "max_cost": 5.5,
    }
    async with AsyncClient(tenant_server.address, token=SERVER_TOKEN) as client:
        for name, value in over.items():
            with pytest.raises(InvalidRequestError, match=f"above the server's ceiling {name}="):
                await client.completion("ctx", **{name: value})
            with pytest.raises(InvalidRequestError, match=f"ceiling {name}="):
                await client.create_session(**{name: value})
        for bad in (float("nan"), float("inf"), -1.0, 0.0):
            with pytest.raises(InvalidRequestError, match="must be a positive number"):
                await client.completion("ctx", timeout_seconds=bad)
        # Lower than the ceilings is the client's right.
        lm.add_rule(Rule(ANSWER_IN_CODE, model="root"))
        result = await client.completion("lower", max_iterations=2, exec_timeout_seconds=5.0)
        assert result.response == "LOWER"
    await still_answers(tenant_server, lm)


async def test_rlm_query_children_count_against_max_sandboxes_and_fail_as_sub_calls(
    tenant_server: ServerProcess, lm: ScriptedLMServer
) -> None:
    """max_sandboxes=5: the parent holds one, four children get one each, the fifth child is
    refused; the model sees that as a sub-call error and the completion goes on."""
    arrived = threading.Semaphore(0)
    all_four = threading.Barrier(4, timeout=60)  # the four children live at once

    def child(request: RecordedRequest) -> str:
        arrived.release()
        all_four.wait()
        return "FINAL(child ok)"

    lm.add_rule(Rule(child, model=SUB_MODEL))
    lm.set_sequence(
        "root",
        [repl("answers = rlm_query_batched([f'q{i}' for i in range(5)])"), "FINAL_VAR(answers)"],
    )
    async with AsyncClient(tenant_server.address, token=SERVER_TOKEN) as client:
        result = await client.completion("ctx", max_depth=2)
    answers = ast.literal_eval(result.response)
    assert answers.count("child ok") == 4
    [refused] = [a for a in answers if a != "child ok"]
    assert refused.startswith("Error:") and "max_sandboxes=5" in refused
    await still_answers(tenant_server, lm)


# -- finding 4, continued: tenants with tokens of their own --------------------------------


async def test_a_tenant_cannot_see_cancel_or_use_another_tenants_work(
    tenant_server: ServerProcess, lm: ScriptedLMServer
) -> None:
    """Tenant b knows the ids of tenant a's completion and session (ids leak: logs, a shared
    dashboard): it can neither list, read, cancel nor close them, nor run in a's session.
    Tenant a's share (one completion at a time) does not stop b; a's work ends intact."""
    gate = Gate()
    lm.add_rule(gate.hold(ANSWER_IN_CODE))
    address = tenant_server.address
    async with AsyncClient(address, token=TOKEN_A) as a, AsyncClient(address, token=TOKEN_B) as b:
        session = await a.create_session()
        held = asyncio.create_task(session.completion("victim"))
        await until(lambda: gate.arrived == 1)
        [victim] = await a.list_completions()
        assert victim.session_id == session.session_id
        assert await b.list_completions() == []
        for attempt in (
            b.get_completion(victim.completion_id),
            b.cancel(victim.completion_id),
            b.completion("hijack", session_id=session.session_id),
            b.close_session(session.session_id),
        ):
            with pytest.raises(InvalidRequestError, match=r"no (running completion|session)"):
                await attempt
        with pytest.raises(
            ResourceExhaustedError, match="tenant 'a': max_concurrent_completions=1"
        ):
            await a.completion("a second one")
        own = asyncio.create_task(b.completion("b's own"))  # b's capacity is its own
        await until(lambda: gate.arrived == 2)
        gate.open()
        assert (await held).response == "VICTIM"
        assert (await own).response == "B'S OWN"
        # a's session is intact: its `context` is still the first one loaded into it.
        assert (await session.completion("again")).response == "VICTIM"
        await session.close()
    await still_answers(tenant_server, lm)


# -- finding 5: unauthenticated callers get nothing for free -------------------------------------


def test_anonymous_16_mib_messages_cost_the_server_nothing_and_are_unauthenticated(
    orchestrator_server: ServerProcess, lm: ScriptedLMServer
) -> None:
    """40 anonymous calls (streams and unary), each sending a 16 MiB message, at once. The
    sync gRPC client reports the status the server sent (grpc.aio's may mask it when its own
    write races the refusal: see rlm_wire/auth.py)."""
    payload = b"\x0a" + b"\xff" * (16 * MB - 64)
    codes: collections.Counter[str] = collections.Counter()
    with grpc.insecure_channel(orchestrator_server.address) as channel:
        run = channel.stream_stream("/rlm.v1.Orchestrator/Run")
        cancel = channel.unary_unary("/rlm.v1.Orchestrator/CancelCompletion")
        complete = channel.unary_unary("/rlm.v1.LMRouter/Complete")

        def attack(i: int) -> None:
            try:
                if i % 3 == 0:
                    list(run(iter([payload]), timeout=60))
                elif i % 3 == 1:
                    cancel(payload, timeout=60)
                else:
                    complete(payload, metadata=bearer_metadata("wrong"), timeout=60)
                codes["OK"] += 1
            except grpc.RpcError as exc:
                codes[exc.code().name] += 1

        with RSSSampler(orchestrator_server.process.pid) as rss, ThreadPoolExecutor(40) as pool:
            list(pool.map(attack, range(40)))
    assert codes == {"UNAUTHENTICATED": 40}
    assert rss.growth_mb < 32, f"server RSS grew by {rss.growth_mb:.0f} MB"
    asyncio.run(still_answers(orchestrator_server, lm))


async def test_the_sdk_always_sees_unauthenticated_even_when_racing(
    orchestrator_server: ServerProcess, lm: ScriptedLMServer
) -> None:
    """Without waiting for the server's headers, ~1 in 3 rounds had a call reporting INTERNAL."""
    results: list[object] = []
    async with AsyncClient(orchestrator_server.address, token="wrong") as client:
        for _ in range(4):
            results += await asyncio.gather(
                *(client.completion("x" * 100_000) for _ in range(50)), return_exceptions=True
            )
    assert all(isinstance(r, AuthenticationError) for r in results), {
        type(r).__name__ for r in results
    }
    await still_answers(orchestrator_server, lm)


# -- finding 9: malformed messages; shutdown --------------------------------------------------


async def test_garbage_bytes_get_invalid_argument_from_the_server(
    orchestrator_server: ServerProcess, lm: ScriptedLMServer
) -> None:
    garbage = b"\xff\xfe\x00garbage"
    token = bearer_metadata(SERVER_TOKEN)
    async with grpc.aio.insecure_channel(orchestrator_server.address) as channel:
        for method in ("/rlm.v1.Orchestrator/CancelCompletion", "/rlm.v1.LMRouter/Complete"):
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await channel.unary_unary(method)(garbage, metadata=token, timeout=10)
            assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT, method
            assert "does not decode" in (caught.value.details() or "")
        run = channel.stream_stream("/rlm.v1.Orchestrator/Run")(metadata=token, timeout=10)
        await run.write(garbage)
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await run.read()
        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        # Without the token, nothing is decoded at all.
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await channel.unary_unary("/rlm.v1.LMRouter/Complete")(garbage, timeout=10)
        assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED
    await still_answers(orchestrator_server, lm)


@pytest.mark.parametrize("environment", ["local", "docker"])
async def test_garbage_bytes_get_invalid_argument_from_a_sandbox_agent(environment: str) -> None:
    if environment == "docker":
        require_docker()
    config = DockerConfig(image=SANDBOX_IMAGE) if environment == "docker" else LocalConfig()
    provider = create_provider(config)
    try:
        box = await provider.acquire(SandboxSpec(session_id="garbage", exec_timeout_seconds=5.0))
        channel, metadata = box.client._channel, box.client._metadata
        for method in ("/rlm.v1.Sandbox/GetVariable", "/rlm.v1.Sandbox/GetInfo"):
            call = channel.unary_unary(method)
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await call(b"\xff\xfe\x00garbage", metadata=metadata, timeout=10)
            assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT, method
        execute = channel.stream_stream("/rlm.v1.Sandbox/Execute")(metadata=metadata, timeout=10)
        await execute.write(b"\xff\xfe\x00garbage")
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await execute.read()
        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        # The agent still runs code.
        report = await box.client.execute(
            "print(6 * 7)", on_output=_ignore_output, on_sub_call=_no_sub_calls
        )
        assert report.stdout.strip() == "42"
    finally:
        await provider.aclose()


async def test_sigterm_reaches_clients_as_a_server_shutdown(
    lm: ScriptedLMServer, tmp_path: Path
) -> None:
    server = start_server(server_config(lm, tmp_path, shutdown_grace_seconds=1.0))
    try:
        lm.add_rule(Rule(repl("import time\ntime.sleep(120)"), model="root"))
        async with AsyncClient(server.address, token=SERVER_TOKEN) as client:
            running = asyncio.Event()

            def on_event(event: ev.Event) -> None:
                if isinstance(event, ev.CodeBlockStarted):
                    running.set()

            sleeper = asyncio.create_task(client.completion("ctx", "q", on_event=on_event))
            # A second client accepted but still uploading when the shutdown comes.
            channel = grpc.aio.insecure_channel(server.address)
            uploading = await _accepted_but_uploading(channel)
            await asyncio.wait_for(running.wait(), 60)
            server.process.send_signal(signal.SIGTERM)
            with pytest.raises(ServerShutdownError) as caught:
                await sleeper
            # From the `failed` event (SERVER_SHUTDOWN), not a bare status: it names the grace.
            assert caught.value.grace_seconds == 1.0
            assert "1 s shutdown grace period" in str(caught.value)
            # New work is refused as a shutdown too (the server still listens: the uploading
            # stream below keeps it in its flush period).
            with pytest.raises(ServerShutdownError, match="UNAVAILABLE: the server is shutting"):
                await client.completion("too late")
            with pytest.raises(grpc.aio.AioRpcError) as cut:
                await uploading.read()
            assert cut.value.code() == grpc.StatusCode.UNAVAILABLE
            assert "shutting down" in (cut.value.details() or "")
            assert ("rlm-server-shutdown", "1") in tuple(cut.value.trailing_metadata() or ())
            await channel.close()
        assert server.process.wait(30) == 0  # then the leak check finds no sandbox
    finally:
        stop_server(server)


async def _accepted_but_uploading(channel: grpc.aio.Channel) -> Any:
    call = orchestrator_pb2_grpc.OrchestratorStub(channel).Run(
        metadata=bearer_metadata(SERVER_TOKEN)
    )
    start = pb.CompletionStart(context_encoding=pb.CONTEXT_ENCODING_TEXT, context_bytes=10)
    await call.write(pb.RunRequest(start=start))
    assert (await call.read()).WhichOneof("kind") == "started"
    await call.write(pb.RunRequest(context_chunk=b"12345"))  # 5 of the 10 bytes announced
    return call
