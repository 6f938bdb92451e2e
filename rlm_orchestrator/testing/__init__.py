"""Test helpers: a scripted OpenAI-compatible LM server (see :mod:`.scripted_lm`).

Names are loaded lazily so that ``python -m rlm_orchestrator.testing.scripted_lm`` does not
import the module twice (runpy warns when the package already imported it).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from rlm_orchestrator.testing.scripted_lm import (
        Headers,
        RecordedRequest,
        ReplyFn,
        Rule,
        Script,
        ScriptedLMServer,
    )

__all__ = ["Headers", "RecordedRequest", "ReplyFn", "Rule", "Script", "ScriptedLMServer"]


def __getattr__(name: str) -> Any:
    if name in __all__:
        return getattr(importlib.import_module("rlm_orchestrator.testing.scripted_lm"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
