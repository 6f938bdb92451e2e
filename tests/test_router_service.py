"""The LMRouter gRPC service over a real grpc.aio server, a real channel and the scripted LM."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Iterator
from typing import Any

import grpc
import pytest
from conftest import API_KEY, backend_kwargs

from rlm_orchestrator.convert.usage import usage_from_proto, usage_to_proto
from rlm_orchestrator.router import LMClientConfig, LMRouter
from rlm_orchestrator.service.router_service import add_router_service
from rlm_orchestrator.testing.scripted_lm import Rule, ScriptedLMServer
from rlm_orchestrator.types import ModelUsageSummary, UsageSummary
from rlm_wire.v1 import lm_router_pb2 as pb
from rlm_wire.v1 import lm_router_pb2_grpc

IN_PRICE, OUT_PRICE = 0.001, 0.002


@pytest.fixture(scope="module", autouse=True)
def litellm_imported() -> Iterator[None]:
    """Import litellm once, up front: seconds that must not eat a test's gRPC deadline."""
    import litellm  # noqa: F401

    yield


@pytest.fixture(params=["http", "litellm"])
async def stub(lm: ScriptedLMServer, request: pytest.FixtureRequest) -> AsyncIterator[Any]:
    """A stub of a fresh server whose router serves "root", "sub" and "priced", through
    either transport (the same tests hold for both)."""
    via = {"transport": request.param}
    router = LMRouter(
        # One slot only: a call cut off by its deadline must give it back.
        LMClientConfig.from_backend("openai", backend_kwargs(lm, "root", max_concurrency=1, **via)),
        [
            LMClientConfig.from_backend("openai", backend_kwargs(lm, "sub", **via)),
            LMClientConfig.from_backend(
                "openai",
                backend_kwargs(
                    lm,
                    "priced",
                    input_cost_per_token=IN_PRICE,
                    output_cost_per_token=OUT_PRICE,
                    **via,
                ),
            ),
        ],
    )
    server = grpc.aio.server()
    add_router_service(server, router)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            yield lm_router_pb2_grpc.LMRouterStub(channel)
    finally:
        await server.stop(None)
        await router.finish_callbacks()


async def _error(call: Any) -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await call
    return info.value


async def test_complete_routes_by_depth_and_by_name(stub: Any, lm: ScriptedLMServer) -> None:
    lm.set_sequence("root", ["from root"])
    lm.set_sequence("sub", ["from sub", "sub by name"])
    root = await stub.Complete(pb.LMRequest(prompt="hi", depth=0))
    sub = await stub.Complete(pb.LMRequest(prompt="hi", depth=1))
    named = await stub.Complete(pb.LMRequest(prompt="hi", model="sub", depth=0))
    assert (root.text, root.model) == ("from root", "root")
    assert (sub.text, sub.model) == ("from sub", "sub")
    assert (named.text, named.model) == ("sub by name", "sub")
    assert root.usage.model == "root" and root.usage.calls == 1
    assert root.usage.input_tokens > 0 and root.usage.output_tokens > 0
    assert root.duration_seconds > 0 and root.attempts == 1


async def test_cost_of_a_priced_model(stub: Any, lm: ScriptedLMServer) -> None:
    lm.set_sequence("priced", ["an answer of some length"])
    answer = await stub.Complete(pb.LMRequest(prompt="what does it cost?", model="priced"))
    usage = answer.usage
    expected = usage.input_tokens * IN_PRICE + usage.output_tokens * OUT_PRICE
    assert usage.cost == pytest.approx(expected) and usage.cost > 0


async def test_conversation_reaches_the_lm_as_messages(stub: Any, lm: ScriptedLMServer) -> None:
    lm.set_sequence("root", ["ok"])
    turns = [("system", "be brief"), ("user", "hi"), ("assistant", "hello"), ("user", "again")]
    conversation = pb.Conversation(messages=[pb.ChatMessage(role=r, content=c) for r, c in turns])
    answer = await stub.Complete(pb.LMRequest(conversation=conversation))
    assert answer.text == "ok"
    [request] = lm.requests_for("root")
    assert [(m["role"], m["content"]) for m in request.messages] == turns


@pytest.mark.parametrize(
    "request_",
    [
        pb.LMRequest(),
        pb.LMRequest(prompt=""),
        pb.LMRequest(conversation=pb.Conversation()),
        pb.LMRequest(conversation=pb.Conversation(messages=[pb.ChatMessage(role="robot")])),
    ],
    ids=["no-input", "empty-prompt", "empty-conversation", "bad-role"],
)
async def test_empty_or_malformed_input_is_invalid(
    stub: Any, lm: ScriptedLMServer, request_: pb.LMRequest
) -> None:
    error = await _error(stub.Complete(request_))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert not lm.requests


async def test_unknown_model_is_not_found(stub: Any, lm: ScriptedLMServer) -> None:
    error = await _error(stub.Complete(pb.LMRequest(prompt="hi", model="nope")))
    assert error.code() == grpc.StatusCode.NOT_FOUND
    assert "'nope'" in error.details()
    assert all(name in error.details() for name in ("root", "sub", "priced"))
    batch = await _error(stub.CompleteBatch(pb.LMBatchRequest(prompts=["a"], model="nope")))
    assert batch.code() == grpc.StatusCode.NOT_FOUND
    assert not lm.requests


async def test_rate_limit_then_success_is_retried(stub: Any, lm: ScriptedLMServer) -> None:
    lm.set_sequence("root", [Rule("slow down", status=429), "finally"])
    answer = await stub.Complete(pb.LMRequest(prompt="hi"))
    assert answer.text == "finally" and answer.attempts == 2
    assert [r.status for r in lm.requests_for("root")] == [429, 200]


async def test_permanent_500_is_unavailable(stub: Any, lm: ScriptedLMServer) -> None:
    lm.add_rule(Rule("the provider is down", model="root", status=500))
    error = await _error(stub.Complete(pb.LMRequest(prompt="hi")))
    assert error.code() == grpc.StatusCode.UNAVAILABLE
    assert "'root'" in error.details() and "HTTP 500" in error.details()
    assert "the provider is down" in error.details()
    assert len(lm.requests_for("root")) == 4  # the first attempt and 3 retries


async def test_permanent_429_is_resource_exhausted(stub: Any, lm: ScriptedLMServer) -> None:
    lm.add_rule(Rule("quota gone", model="root", status=429))
    error = await _error(stub.Complete(pb.LMRequest(prompt="hi")))
    assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED


async def test_refused_request_is_invalid_and_hides_the_key(
    stub: Any, lm: ScriptedLMServer
) -> None:
    lm.add_rule(Rule(f"bad request (key {API_KEY})", model="root", status=400))
    error = await _error(stub.Complete(pb.LMRequest(prompt="hi")))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "bad request" in error.details() and "HTTP 400" in error.details()
    assert API_KEY not in error.details()
    assert len(lm.requests_for("root")) == 1  # a 400 is not retried


async def test_deadline_exceeded_then_server_still_serves(stub: Any, lm: ScriptedLMServer) -> None:
    lm.add_rule(Rule("too late", contains="slow", delay_seconds=1.0))
    lm.add_rule(Rule("quick", contains="fast"))
    started = time.monotonic()
    error = await _error(stub.Complete(pb.LMRequest(prompt="slow"), timeout=0.5))
    assert error.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    # The server's own answer, a little before the caller's bare "Deadline Exceeded".
    assert "the LM call did not finish within the call's deadline" in error.details()
    answer = await stub.Complete(pb.LMRequest(prompt="fast"), timeout=5)
    assert answer.text == "quick"
    # Before the slow reply would have come: the slow call was cancelled, its slot freed.
    assert time.monotonic() - started < 0.9


async def test_batch_deadline_exceeded(stub: Any, lm: ScriptedLMServer) -> None:
    lm.add_rule(Rule("too late", contains="slow", delay_seconds=1.0))
    lm.add_rule(Rule("quick", contains="fast"))
    batch = pb.LMBatchRequest(prompts=["fast", "slow"], model="sub")
    error = await _error(stub.CompleteBatch(batch, timeout=0.5))
    assert error.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert "the batch did not finish within the call's deadline" in error.details()


async def test_batch_keeps_order_and_sums_usage(stub: Any, lm: ScriptedLMServer) -> None:
    for prompt, delay in (("one", 0.3), ("two", 0.0), ("three", 0.15)):
        lm.add_rule(Rule(f"answer {prompt}", contains=prompt, delay_seconds=delay))
    started = time.monotonic()
    reply = await stub.CompleteBatch(pb.LMBatchRequest(prompts=["one", "two", "three"], depth=1))
    assert time.monotonic() - started < 0.45 + 0.3  # concurrent, not 0.45 s in sequence
    texts = [r.response.text for r in reply.results]
    assert texts == ["answer one", "answer two", "answer three"]
    assert {r.response.model for r in reply.results} == {"sub"}
    [usage] = reply.usage.models
    assert usage.model == "sub" and usage.calls == 3
    assert usage.input_tokens == sum(r.response.usage.input_tokens for r in reply.results)
    assert usage.output_tokens == sum(r.response.usage.output_tokens for r in reply.results)


async def test_batch_failed_slot_gets_an_error(stub: Any, lm: ScriptedLMServer) -> None:
    lm.add_rule(Rule("refused", contains="bad", status=400))
    lm.add_rule(Rule("fine", contains="good"))
    prompts = ["good 1", "bad", "good 2", ""]
    reply = await stub.CompleteBatch(pb.LMBatchRequest(prompts=prompts, model="priced"))
    kinds = [r.WhichOneof("outcome") for r in reply.results]
    assert kinds == ["response", "error", "response", "error"]
    assert "HTTP 400" in reply.results[1].error and "refused" in reply.results[1].error
    assert "empty prompt" in reply.results[3].error
    [usage] = reply.usage.models
    assert usage.calls == 2
    costs = [r.response.usage.cost for r in reply.results if r.HasField("response")]
    assert usage.cost == pytest.approx(sum(costs)) and reply.usage.total_cost == usage.cost


async def test_empty_batch(stub: Any, lm: ScriptedLMServer) -> None:
    reply = await stub.CompleteBatch(pb.LMBatchRequest())
    assert list(reply.results) == [] and list(reply.usage.models) == []
    assert not lm.requests


async def test_list_models(stub: Any) -> None:
    reply = await stub.ListModels(pb.ListModelsRequest())
    assert [m.name for m in reply.models] == ["root", "sub", "priced"]
    root = reply.models[0]
    assert (root.backend, root.litellm_model, root.max_concurrency) == ("openai", "openai/root", 1)
    assert (reply.root_model, reply.sub_model) == ("root", "sub")
    assert API_KEY not in str(reply)


def test_usage_round_trip() -> None:
    summary = UsageSummary(
        {"a": ModelUsageSummary(2, 10, 5, 0.25), "b": ModelUsageSummary(1, 3, 4, 0.5)}
    )
    message = usage_to_proto(summary)
    assert message.total_cost == pytest.approx(0.75)
    assert [(m.model, m.calls, m.input_tokens, m.output_tokens) for m in message.models] == [
        ("a", 2, 10, 5),
        ("b", 1, 3, 4),
    ]
    assert usage_from_proto(message) == summary
