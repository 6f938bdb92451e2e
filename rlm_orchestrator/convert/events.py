"""Completion events between their Python form (events.py) and the wire (orchestrator.proto).

Both directions live here so the server and the client SDK cannot drift apart.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator

from rlm_orchestrator import events as ev
from rlm_orchestrator.convert.usage import usage_from_proto, usage_to_proto
from rlm_orchestrator.types import REPLResult
from rlm_wire.v1 import orchestrator_pb2 as pb

# Trailing metadata of an UNAVAILABLE status caused by a server shutdown (a refused or cut call),
# so that the SDK can raise ServerShutdownError without parsing the message.
SHUTDOWN_METADATA_KEY = "rlm-server-shutdown"


def excerpt(text: str, limit: int) -> tuple[str, int]:
    """`text` when it fits in `limit` characters, else its head and tail around a marker;
    and how many characters were cut."""
    if len(text) <= limit:
        return text, 0
    cut = len(text) - limit
    head = limit // 2
    marker = f"\n[... {cut} characters cut from this event ...]\n"
    return text[:head] + marker + text[len(text) - (limit - head) :], cut


def _to_wire(iteration: int) -> int:
    """Events count turns from 1; the wire from 0 (what clients of older SDKs read)."""
    return max(iteration - 1, 0)


def _from_wire(iteration: int) -> int:
    return iteration + 1


def event_to_proto(event: ev.Event, excerpt_chars: int) -> pb.CompletionEvent | None:
    """The wire form of a loop event (None for events that stay in the process); its text
    fields are cut to `excerpt_chars` (head and tail) and say how much was cut."""

    def short(text: str) -> tuple[str, int]:
        return excerpt(text, excerpt_chars)

    match event:
        case ev.TurnStarted(depth=d, iteration=i, seconds_left=left):
            return pb.CompletionEvent(
                turn_started=pb.TurnStarted(depth=d, iteration=_to_wire(i), seconds_left=left)
            )
        case ev.RootResponse(depth=d, iteration=i, text=text, duration=duration):
            text, cut = short(text)
            return pb.CompletionEvent(
                root_response=pb.RootResponse(
                    depth=d,
                    iteration=_to_wire(i),
                    text=text,
                    duration_seconds=duration,
                    cut_chars=cut,
                    finish_reason=event.finish_reason,
                )
            )
        case ev.CodeBlockStarted(depth=d, iteration=i, block=b, code=code):
            code, cut = short(code)
            return pb.CompletionEvent(
                code_block_started=pb.CodeBlockStarted(
                    depth=d, iteration=_to_wire(i), block=b, code=code, cut_chars=cut
                )
            )
        case ev.OutputChunk(depth=d, iteration=i, block=b, stream=stream, text=text):
            # Never cut (it is the output itself): `output_pieces` splits long chunks first.
            return pb.CompletionEvent(
                output=pb.CompletionOutput(
                    depth=d, iteration=_to_wire(i), block=b, stream=stream, text=text
                )
            )
        case ev.SubCallStarted(depth=d, call_id=c, kind=kind, model=model, prompt_chars=chars):
            return pb.CompletionEvent(
                sub_call_started=pb.SubCallStarted(
                    depth=d, call_id=c, kind=kind, model=short(model)[0], prompt_chars=chars
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
                    error=short(event.error)[0],
                    truncated=event.truncated,
                )
            )
        case ev.CodeBlockFinished(depth=d, iteration=i, block=b, result=r):
            (stdout, cut_out), (stderr, cut_err), (error, cut_error) = (
                short(r.stdout),
                short(r.stderr),
                short(r.error),
            )
            return pb.CompletionEvent(
                code_block_finished=pb.CodeBlockFinished(
                    depth=d,
                    iteration=_to_wire(i),
                    block=b,
                    status=r.status,
                    error=error,
                    duration_seconds=r.execution_time or 0.0,
                    variables=_variables(r.variables, short),
                    truncated_chars=r.truncated_chars,
                    worker_restarted=r.worker_restarted,
                    stdout=stdout,
                    stderr=stderr,
                    cut_chars=cut_out + cut_err + cut_error,
                )
            )
        case ev.Notice(depth=d, text=text):
            return pb.CompletionEvent(notice=pb.Notice(depth=d, text=short(text)[0]))
        case ev.ContextCompacted(depth=d, iteration=i, stage=stage):
            return pb.CompletionEvent(
                context_compacted=pb.ContextCompacted(
                    depth=d,
                    iteration=_to_wire(i),
                    stage=stage,
                    tokens_before=event.tokens_before,
                    tokens_after=event.tokens_after,
                    context_window=event.context_window,
                    messages=event.messages,
                )
            )
        case ev.UsageUpdated(depth=d, usage=usage):
            return pb.CompletionEvent(usage=pb.UsageUpdate(depth=d, usage=usage_to_proto(usage)))
        case _:
            return None  # FinalAnswer: the stream ends with `finished` instead


def output_pieces(event: ev.Event, chars: int) -> list[ev.Event]:
    """An output chunk longer than `chars` as several (nothing is cut); other events as is."""
    if not isinstance(event, ev.OutputChunk) or len(event.text) <= chars:
        return [event]
    text = event.text
    return [
        dataclasses.replace(event, text=text[offset : offset + chars])
        for offset in range(0, len(text), chars)
    ]


MAX_EVENT_VARIABLES = 1000
ANSWER_PART_CHARS = 1024 * 1024


def _variables(names: list[str], short: Callable[[str], tuple[str, int]]) -> list[str]:
    shown = [short(name)[0] for name in names[:MAX_EVENT_VARIABLES]]
    if len(names) > MAX_EVENT_VARIABLES:
        shown.append(f"[... {len(names) - MAX_EVENT_VARIABLES} more variables]")
    return shown


def in_parts(answer: str) -> bool:
    """Whether `answer` travels as answer_part events (longer than one part)."""
    return len(answer) > ANSWER_PART_CHARS


def answer_parts(answer: str) -> Iterator[pb.CompletionEvent]:
    """An answer too long for one message, as answer_part events of ANSWER_PART_CHARS each
    (UTF-8 keeps a part under 4 MiB, well within the 16 MiB message limit)."""
    for offset in range(0, len(answer), ANSWER_PART_CHARS):
        text = answer[offset : offset + ANSWER_PART_CHARS]
        yield pb.CompletionEvent(answer_part=pb.AnswerPart(text=text))


def event_from_proto(message: pb.CompletionEvent) -> ev.Event | None:
    """The Python form of a progress event (None for started / finished / failed)."""
    kind = message.WhichOneof("kind")
    if kind == "turn_started":
        m1 = message.turn_started
        left = m1.seconds_left if m1.HasField("seconds_left") else None
        return ev.TurnStarted(m1.depth, _from_wire(m1.iteration), left)
    if kind == "root_response":
        m2 = message.root_response
        return ev.RootResponse(
            m2.depth,
            _from_wire(m2.iteration),
            m2.text,
            m2.duration_seconds,
            m2.finish_reason or "stop",
        )
    if kind == "code_block_started":
        m3 = message.code_block_started
        return ev.CodeBlockStarted(m3.depth, _from_wire(m3.iteration), m3.block, m3.code)
    if kind == "output":
        m4 = message.output
        return ev.OutputChunk(m4.depth, _from_wire(m4.iteration), m4.block, m4.stream, m4.text)
    if kind == "sub_call_started":
        m5 = message.sub_call_started
        return ev.SubCallStarted(m5.depth, m5.call_id, m5.kind, m5.model, m5.prompt_chars)
    if kind == "sub_call_finished":
        m6 = message.sub_call_finished
        return ev.SubCallFinished(
            m6.depth,
            m6.call_id,
            m6.ok,
            m6.response_chars,
            m6.duration_seconds,
            m6.error,
            m6.truncated,
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
        return ev.CodeBlockFinished(m7.depth, _from_wire(m7.iteration), m7.block, result)
    if kind == "notice":
        return ev.Notice(message.notice.depth, message.notice.text)
    if kind == "context_compacted":
        m8 = message.context_compacted
        return ev.ContextCompacted(
            m8.depth,
            _from_wire(m8.iteration),
            m8.stage,
            m8.tokens_before,
            m8.tokens_after,
            m8.context_window,
            m8.messages,
        )
    if kind == "usage":
        return ev.UsageUpdated(message.usage.depth, usage_from_proto(message.usage.usage))
    return None
