"""The client SDK's surface against a real `rlm-orchestrator serve` (conftest): typed
construction, the token from the environment, timeouts and retries, NotFoundError, the LM
router's calls, and the events' numbering and fields."""

from __future__ import annotations

import socket
from collections.abc import AsyncIterator, Callable
from typing import Any

import grpc
import pytest
from conftest import OTHER_MODEL, ROOT_MODEL, SERVER_TOKEN, SUB_MODEL, ServerProcess, repl

from rlm_orchestrator import CompletionTimeoutError, LMError
from rlm_orchestrator import events as ev
from rlm_orchestrator.client import (
    AsyncClient,
    AuthenticationError,
    Client,
    InvalidRequestError,
    NotFoundError,
    ServerUnavailableError,
)
from rlm_orchestrator.client._async import TOKEN_ENV
from rlm_orchestrator.convert.events import event_from_proto, event_to_proto
from rlm_orchestrator.exceptions import ConfigurationError
from rlm_orchestrator.testing.scripted_lm import Rule, ScriptedLMServer
from rlm_wire.v1 import lm_router_pb2 as lm_pb
from rlm_wire.v1 import lm_router_pb2_grpc


def test_a_misspelt_keyword_fails_at_construction_naming_it() -> None:
    with pytest.raises(TypeError, match="tokn"):
        Client("127.0.0.1:1", tokn="x")  # type: ignore[call-arg]
    with pytest.raises(TypeError, match="tokn"):
        AsyncClient("127.0.0.1:1", tokn="x")  # type: ignore[call-arg]
    with pytest.raises(ConfigurationError, match="timeout"):
        Client(timeout=0)
    with pytest.raises(ConfigurationError, match="max_retries"):
        Client(max_retries=-1)


def test_the_token_comes_from_the_environment_when_none_is_given(
    orchestrator_server: ServerProcess, lm: ScriptedLMServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    lm.set_sequence(ROOT_MODEL, ["FINAL(from env)"])
    monkeypatch.setenv(TOKEN_ENV, SERVER_TOKEN)
    with Client(orchestrator_server.address) as client:
        assert client.completion("ctx").response == "from env"
    # An explicit token wins; "" sends none.
    for token in ("wrong", ""):
        with (
            Client(orchestrator_server.address, token=token) as client,
            pytest.raises(AuthenticationError, match="UNAUTHENTICATED"),
        ):
            client.list_completions()


def test_not_found_is_its_own_error_and_still_an_invalid_request(
    orchestrator_server: ServerProcess,
) -> None:
    with orchestrator_server.client() as client:
        for call in (
            lambda: client.cancel("no-such-completion"),
            lambda: client.get_completion("no-such-completion"),
            lambda: client.complete("hi", model="no-such-model"),
        ):
            with pytest.raises(NotFoundError, match="NOT_FOUND") as caught:
                call()
            assert isinstance(caught.value, InvalidRequestError)
            assert caught.value.code == "NOT_FOUND"
        with pytest.raises(InvalidRequestError) as refused:
            client.completion("ctx", max_depth=99)  # INVALID_ARGUMENT: not a NotFoundError
        assert not isinstance(refused.value, NotFoundError)


def test_a_remote_timeout_names_its_class_once(
    orchestrator_server: ServerProcess, lm: ScriptedLMServer
) -> None:
    lm.add_rule(Rule(repl("import time\ntime.sleep(60)"), model=ROOT_MODEL))
    with orchestrator_server.client() as client, pytest.raises(CompletionTimeoutError) as caught:
        client.completion("ctx", timeout_seconds=1)
    assert str(caught.value).startswith("completion exceeded its timeout of 1s")


def test_a_silent_server_fails_within_the_clients_timeout() -> None:
    # A socket that accepts connections (the kernel's backlog) and never answers a byte.
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)
        address = f"127.0.0.1:{silent.getsockname()[1]}"
        with Client(address, token="t", timeout=0.5, max_retries=0) as client:
            with pytest.raises(ServerUnavailableError, match="timeout") as unary:
                client.list_completions()
            assert unary.value.code == "DEADLINE_EXCEEDED"
            with pytest.raises(ServerUnavailableError, match="timeout") as stream:
                client.completion("ctx")
            assert stream.value.code == "DEADLINE_EXCEEDED"


class _Flaky(lm_router_pb2_grpc.LMRouterServicer):
    """An LM router that answers UNAVAILABLE to its first `failures` calls of each method."""

    def __init__(self, failures: int) -> None:
        self.failures = failures
        self.calls: dict[str, int] = {}

    async def _maybe_fail(self, method: str, context: Any) -> None:
        self.calls[method] = self.calls.get(method, 0) + 1
        if self.calls[method] <= self.failures:
            await context.abort(grpc.StatusCode.UNAVAILABLE, "not now")

    async def ListModels(self, request: Any, context: Any) -> lm_pb.ListModelsResponse:
        await self._maybe_fail("ListModels", context)
        return lm_pb.ListModelsResponse(root_model="r", sub_model="s")

    async def Complete(self, request: Any, context: Any) -> lm_pb.LMResponse:
        await self._maybe_fail("Complete", context)
        return lm_pb.LMResponse(text="answer", model="r")


@pytest.fixture
async def flaky() -> AsyncIterator[tuple[str, Callable[[int], _Flaky]]]:
    """A real gRPC server whose router servicer is replaced by a fresh _Flaky per test step."""
    holder: dict[str, _Flaky] = {}

    class Forward(lm_router_pb2_grpc.LMRouterServicer):
        async def ListModels(self, request: Any, context: Any) -> lm_pb.ListModelsResponse:
            return await holder["now"].ListModels(request, context)

        async def Complete(self, request: Any, context: Any) -> lm_pb.LMResponse:
            return await holder["now"].Complete(request, context)

    def install(failures: int) -> _Flaky:
        holder["now"] = _Flaky(failures)
        return holder["now"]

    server = grpc.aio.server()
    lm_router_pb2_grpc.add_LMRouterServicer_to_server(Forward(), server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        yield f"127.0.0.1:{port}", install
    finally:
        await server.stop(None)


async def test_unavailable_is_retried_max_retries_times_but_an_lm_call_never(
    flaky: tuple[str, Callable[[int], _Flaky]],
) -> None:
    address, install = flaky
    async with AsyncClient(address, token="t", max_retries=2) as client:
        servicer = install(2)
        assert (await client.list_models()).root_model == "r"
        assert servicer.calls["ListModels"] == 3
        servicer = install(3)
        with pytest.raises(ServerUnavailableError, match="not now"):
            await client.list_models()
        assert servicer.calls["ListModels"] == 3
        servicer = install(1)
        with pytest.raises(ServerUnavailableError):
            await client.complete("hi")  # it may have spent already: never re-sent
        assert servicer.calls["Complete"] == 1
    async with AsyncClient(address, token="t", max_retries=0) as client:
        servicer = install(1)
        with pytest.raises(ServerUnavailableError):
            await client.list_models()
        assert servicer.calls["ListModels"] == 1
    # The retries stay within the timeout: a server that is never back stops them early.
    async with AsyncClient(address, token="t", timeout=1, max_retries=1000) as client:
        servicer = install(10_000)
        with pytest.raises(ServerUnavailableError, match="not now"):
            await client.list_models()
        assert 1 < servicer.calls["ListModels"] < 1001


def test_the_lm_router_is_reachable_from_the_sdk(
    orchestrator_server: ServerProcess, lm: ScriptedLMServer
) -> None:
    lm.set_sequence(SUB_MODEL, ["from sub", "from a conversation", "one", "two"])
    lm.set_sequence(ROOT_MODEL, ["from root"])
    with orchestrator_server.client() as client:
        models = client.list_models()
        assert {ROOT_MODEL, SUB_MODEL, OTHER_MODEL} <= {m.name for m in models.models}
        assert (models.root_model, models.sub_model) == (ROOT_MODEL, SUB_MODEL)
        named = client.complete("hi", model=SUB_MODEL)
        assert (named.text, named.model, named.attempts) == ("from sub", SUB_MODEL, 1)
        assert named.usage.total_calls == 1
        assert client.complete("hi").model == ROOT_MODEL  # depth 0: the root model
        conversation = [
            {"role": "system", "content": "be brief"},
            {"role": "user", "content": "hi"},
        ]
        assert client.complete(conversation, depth=1).text == "from a conversation"
        assert lm.requests_for(SUB_MODEL)[1].messages == conversation
        batch = client.complete_batch(["a", "b"], model=SUB_MODEL)
        texts = sorted(r.text for r in batch.results if not isinstance(r, LMError))
        assert texts == ["one", "two"]
        assert batch.usage.model_usage_summaries[SUB_MODEL].total_calls == 2


def test_events_count_turns_from_1_and_name_the_sub_calls_model(
    orchestrator_server: ServerProcess, lm: ScriptedLMServer, make_rlm: Callable[..., Any]
) -> None:
    root = [
        repl("x = llm_query('hi')"),
        repl("y = llm_query('again', model='other')"),
        repl("z = rlm_query('deeper')"),
        "FINAL(ok)",
    ]
    sub = ["hello", "FINAL(from the child)"]  # the child RLM's root model is the sub model
    seen: dict[str, list[ev.StreamEvent]] = {}
    lm.set_sequence(ROOT_MODEL, root)
    lm.set_sequence(SUB_MODEL, sub)
    with orchestrator_server.client() as client:
        seen["server"] = list(client.stream("ctx", max_depth=2))
    local: list[ev.StreamEvent] = []
    make_rlm(root=root, sub=sub, max_depth=2, on_event=local.append).completion("ctx")
    seen["local"] = local
    for where, events in seen.items():
        turns = [(e.depth, e.iteration) for e in events if isinstance(e, ev.TurnStarted)]
        assert turns == [(0, 1), (0, 2), (0, 3), (1, 1), (0, 4)], where
        blocks = [e.iteration for e in events if isinstance(e, ev.CodeBlockStarted)]
        assert blocks == [1, 2, 3], where
        models = [(e.kind, e.model) for e in events if isinstance(e, ev.SubCallStarted)]
        expected = [("llm_query", SUB_MODEL), ("llm_query", OTHER_MODEL), ("rlm_query", SUB_MODEL)]
        assert models == expected, where


def test_the_wire_still_counts_turns_from_0() -> None:
    message = event_to_proto(ev.TurnStarted(0, 1, None), 1000)
    assert message is not None and message.turn_started.iteration == 0
    assert event_from_proto(message) == ev.TurnStarted(0, 1, None)
