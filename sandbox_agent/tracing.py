"""The agent's span of an execution, recorded without OpenTelemetry's SDK.

A sandbox has no network, so the agent cannot export spans: it records the one span the
orchestrator asks for (by sending a W3C `traceparent`) and returns it in the result, and the
orchestrator exports it. Standard library only, to keep the agent's start fast.
"""

from __future__ import annotations

import os
import platform
import re
import socket
import time

from rlm_wire.v1 import sandbox_pb2 as pb
from sandbox_agent import __version__

_TRACEPARENT = re.compile(r"^00-([0-9a-f]{32})-([0-9a-f]{16})-([0-9a-f]{2})$")


class ExecutionSpan:
    """sandbox.execute, the child of the orchestrator's execution span."""

    def __init__(self, trace_id: str, parent_span_id: str) -> None:
        self.trace_id = trace_id
        self.parent_span_id = parent_span_id
        self.span_id = os.urandom(8).hex()
        self.start_ns = time.time_ns()

    @classmethod
    def start(cls, traceparent: str) -> ExecutionSpan | None:
        """A span when the orchestrator traces this execution (and sampled it), else None."""
        match = _TRACEPARENT.match(traceparent.strip().lower())
        if match is None or not int(match.group(3), 16) & 1:
            return None
        return cls(match.group(1), match.group(2))

    @property
    def traceparent(self) -> str:
        """This span as the parent of the sub-call spans the orchestrator will make."""
        return f"00-{self.trace_id}-{self.span_id}-01"

    def finish(self, attributes: dict[str, str], error: str) -> pb.AgentSpan:
        return pb.AgentSpan(
            trace_id=self.trace_id,
            span_id=self.span_id,
            parent_span_id=self.parent_span_id,
            name="sandbox.execute",
            start_unix_nano=self.start_ns,
            end_unix_nano=time.time_ns(),
            attributes=attributes,
            resource={
                "service.name": "rlm-sandbox-agent",
                "service.version": __version__,
                "process.pid": str(os.getpid()),
                "host.name": socket.gethostname(),
                "process.runtime.version": platform.python_version(),
            },
            error=error,
        )
