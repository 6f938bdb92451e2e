"""Completion events between their Python form (events.py) and the wire (orchestrator.proto).

Both directions live here so the server and the client SDK cannot drift apart.
"""

from __future__ import annotations

from rlm_orchestrator import events as ev
from rlm_orchestrator.service.convert_usage import usage_from_proto, usage_to_proto
from rlm_orchestrator.types import REPLResult
from sandbox_agent._proto.rlm.v1 import orchestrator_pb2 as pb


def event_to_proto(event: ev.Event) -> pb.CompletionEvent | None:
    """The wire form of a loop event (None for events that stay in the process)."""
    match event:
        case ev.TurnStarted(depth=d, iteration=i):
            return pb.CompletionEvent(turn_started=pb.TurnStarted(depth=d, iteration=i))
        case ev.RootResponse(depth=d, iteration=i, text=text, duration=duration):
            return pb.CompletionEvent(
                root_response=pb.RootResponse(
                    depth=d, iteration=i, text=text, duration_seconds=duration
                )
            )
        case ev.CodeBlockStarted(depth=d, iteration=i, block=b, code=code):
            return pb.CompletionEvent(
                code_block_started=pb.CodeBlockStarted(depth=d, iteration=i, block=b, code=code)
            )
        case ev.OutputChunk(depth=d, iteration=i, block=b, stream=stream, text=text):
            return pb.CompletionEvent(
                output=pb.CompletionOutput(depth=d, iteration=i, block=b, stream=stream, text=text)
            )
        case ev.SubCallStarted(depth=d, call_id=c, kind=kind, model=model, prompt_chars=chars):
            return pb.CompletionEvent(
                sub_call_started=pb.SubCallStarted(
                    depth=d, call_id=c, kind=kind, model=model, prompt_chars=chars
                )
            )
        case ev.SubCallFinished(depth=d, call_id=c, ok=ok, response_chars=chars):
            return pb.CompletionEvent(
                sub_call_finished=pb.SubCallFinished(
                    depth=d,
                    call_id=c,
                    ok=ok,
                    response_chars=chars,
                    duration_seconds=event.duration,
                    error=event.error,
                )
            )
        case ev.CodeBlockFinished(depth=d, iteration=i, block=b, result=r):
            return pb.CompletionEvent(
                code_block_finished=pb.CodeBlockFinished(
                    depth=d,
                    iteration=i,
                    block=b,
                    status=r.status,
                    error=r.error,
                    duration_seconds=r.execution_time,
                    variables=r.variables,
                    truncated_chars=r.truncated_chars,
                    worker_restarted=r.worker_restarted,
                    stdout=r.stdout,
                    stderr=r.stderr,
                )
            )
        case ev.Notice(depth=d, text=text):
            return pb.CompletionEvent(notice=pb.Notice(depth=d, text=text))
        case ev.UsageUpdated(depth=d, usage=usage):
            return pb.CompletionEvent(usage=pb.UsageUpdate(depth=d, usage=usage_to_proto(usage)))
        case _:
            return None  # FinalAnswer: the stream ends with `finished` instead


def event_from_proto(message: pb.CompletionEvent) -> ev.Event | None:
    """The Python form of a progress event (None for started / finished / failed)."""
    kind = message.WhichOneof("kind")
    if kind == "turn_started":
        m1 = message.turn_started
        return ev.TurnStarted(m1.depth, m1.iteration)
    if kind == "root_response":
        m2 = message.root_response
        return ev.RootResponse(m2.depth, m2.iteration, m2.text, m2.duration_seconds)
    if kind == "code_block_started":
        m3 = message.code_block_started
        return ev.CodeBlockStarted(m3.depth, m3.iteration, m3.block, m3.code)
    if kind == "output":
        m4 = message.output
        return ev.OutputChunk(m4.depth, m4.iteration, m4.block, m4.stream, m4.text)
    if kind == "sub_call_started":
        m5 = message.sub_call_started
        return ev.SubCallStarted(m5.depth, m5.call_id, m5.kind, m5.model, m5.prompt_chars)
    if kind == "sub_call_finished":
        m6 = message.sub_call_finished
        return ev.SubCallFinished(
            m6.depth, m6.call_id, m6.ok, m6.response_chars, m6.duration_seconds, m6.error
        )
    if kind == "code_block_finished":
        m7 = message.code_block_finished
        result = REPLResult(
            stdout=m7.stdout,
            stderr=m7.stderr,
            variables=list(m7.variables),
            execution_time=m7.duration_seconds,
            status=m7.status,
            error=m7.error,
            truncated_chars=m7.truncated_chars,
            worker_restarted=m7.worker_restarted,
        )
        return ev.CodeBlockFinished(m7.depth, m7.iteration, m7.block, result)
    if kind == "notice":
        return ev.Notice(message.notice.depth, message.notice.text)
    if kind == "usage":
        return ev.UsageUpdated(message.usage.depth, usage_from_proto(message.usage.usage))
    return None
