"""The bounds on what a sandbox can make the agent (and the orchestrator) receive and hold.

The worker runs hostile code in its own process: anything it "promises" (its output cap, the
size of its replies) is enforced again by the agent, which cannot be touched from there, and
again by the orchestrator on receipt (in Docker, user code runs as the agent's own uid). A
legitimate worker stays within every number below, so exceeding one is either dropped and
counted (output) or answered with an error (sub-call requests), or it is a protocol violation
that gets the worker killed and replaced.

The same numbers and the same `OutputBudget` serve both sides (`rlm_orchestrator` imports this
module); this package stays standard library only.
"""

from __future__ import annotations

from dataclasses import dataclass, field

MIB = 1024 * 1024

# -- defaults of the agent's settings ---------------------------------------------------------
# Written once here: the agent's flags, its dataclasses and the orchestrator's configuration
# models (rlm_orchestrator/config/) all take them from this module.
# A block's time, when its Execute call sets none (the orchestrator always sets one).
DEFAULT_EXEC_TIMEOUT_SECONDS = 300.0
# Characters kept per stream of one block (head and tail), when the call sets none.
DEFAULT_MAX_OUTPUT_CHARS = 1_000_000
# The local jail: processes and threads of one sandbox; size of its /tmp.
DEFAULT_MAX_PROCESSES = 128
DEFAULT_TMP_SIZE_MB = 256
# Who user code is outside the jail when the agent runs as root, and who a container's agent
# runs as: nobody.
NOBODY_UID = 65534
# The worker's cut marker ("\n... [N characters of output truncated] ...\n") comes on top of
# max_output_chars (head + tail); 256 characters covers it with room to spare.
OUTPUT_MARKER_SLACK = 256
# The orchestrator allows more than the agent: the agent's own marker and its messages
# (timeout, worker died...) come on top, and they name the values it reloaded.
ORCHESTRATOR_OUTPUT_SLACK = 16 * 1024
# Output past the allowance that is dropped before the sender is judged to be flooding: the
# agent then kills the worker, the orchestrator gives up on the agent. A legitimate sender
# never goes past the allowance at all: this is a margin, not a budget.
FLOOD_GRACE_CHARS = 1 * MIB

# -- frames between worker and agent -------------------------------------------------------
# One output frame: the worker cuts its output into pieces of at most this many characters
# (at most 4 bytes each in UTF-8).
OUTPUT_FRAME_CHARS = 256 * 1024
OUTPUT_FRAME_BYTES = 4 * OUTPUT_FRAME_CHARS
# One sub-call request: several MB of prompt are legitimate (models take millions of tokens);
# a batch bigger than this is sent as several requests, one prompt bigger gets an error.
MAX_REQUEST_BYTES = 16 * MIB
MAX_PROMPTS_PER_REQUEST = 1_000
# Replies (DONE, LOADED, a variable's header, READY): small JSON objects with capped fields.
MAX_REPLY_BYTES = 4 * MIB
# A chunk of a variable's value (GetVariable), in characters.
VALUE_CHUNK_CHARS = 256 * 1024
VALUE_CHUNK_BYTES = 4 * VALUE_CHUNK_CHARS
# Above every per-kind limit: a header announcing more is rejected before any allocation.
MAX_FRAME_BYTES = MAX_REQUEST_BYTES

# -- sub-calls in flight, per execution ----------------------------------------------------
MAX_PENDING_REQUESTS = 256
MAX_PENDING_PROMPTS = 4_096
MAX_PENDING_PROMPT_BYTES = 32 * MIB

# -- fields of the worker's replies ----------------------------------------------------------
MAX_ERROR_CHARS = 16 * 1024
MAX_VARIABLES = 1_000
MAX_NAME_CHARS = 256
MAX_MODEL_CHARS = 256

# -- answers (FINAL_VAR) ------------------------------------------------------------------------
# The longest variable GetVariable sends when the caller names no limit. The orchestrator's own
# limit is its `max_answer_chars` setting (same default).
DEFAULT_MAX_ANSWER_CHARS = 64 * MIB


def cut_middle(text: str, limit: int) -> str:
    """`text` if it fits in `limit` characters, else its head and tail around a marker."""
    if len(text) <= limit:
        return text
    marker = f"\n... [{len(text) - limit} characters cut] ...\n"
    keep = max(0, limit - len(marker))
    return text[: keep - keep // 2] + marker + (text[-(keep // 2) :] if keep // 2 else "")


@dataclass
class OutputBudget:
    """Per-stream allowance of one execution's output: what fits is kept, the rest counted.

    The allowance is `cap` (max_output_chars) plus `slack` for the markers. `admit` returns
    the part of a chunk to pass on. Once a stream's allowance is spent, its later chunks are
    dropped; `flooding` turns true when the dropped part has gone past FLOOD_GRACE_CHARS (a
    sender bypassing its own cap, not a near miss).
    """

    cap: int
    slack: int
    kept: dict[int, int] = field(default_factory=dict)
    dropped: dict[int, int] = field(default_factory=dict)

    def admit(self, stream: int, text: str) -> str:
        kept = self.kept.get(stream, 0)
        room = max(0, self.cap + self.slack - kept)
        passed = text[:room] if len(text) > room else text
        self.kept[stream] = kept + len(passed)
        if len(passed) < len(text):
            self.dropped[stream] = self.dropped.get(stream, 0) + len(text) - len(passed)
        return passed

    @property
    def dropped_total(self) -> int:
        return sum(self.dropped.values())

    @property
    def flooding(self) -> bool:
        return self.dropped_total > FLOOD_GRACE_CHARS

    def marker(self, stream: int, who: str) -> str:
        """The one line that says a stream was cut here (empty when it was not)."""
        dropped = self.dropped.get(stream, 0)
        if not dropped:
            return ""
        return (
            f"\n... [{who} dropped {dropped} characters of output written past the cap of "
            f"{self.cap} per stream: the sandbox bypassed its output capture] ...\n"
        )
