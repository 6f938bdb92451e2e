"""Trajectory log: JSON lines, a metadata line then one line per iteration (original format)."""

from __future__ import annotations

import json
import os
import uuid
from datetime import datetime
from pathlib import Path
from typing import Any

from rlm_orchestrator.types import RLMIteration, RLMMetadata

_SECRET_WORDS = ("key", "secret", "token", "password", "authorization", "credential")


def redact(options: dict[str, Any]) -> dict[str, Any]:
    """Drop every option whose name suggests a secret (api_key, auth_token, ...)."""
    return {k: v for k, v in options.items() if not any(w in k.lower() for w in _SECRET_WORDS)}


class RLMLogger:
    """Writes one JSONL file per logger: `{file_name}_{timestamp}_{id}.jsonl` in `log_dir`."""

    def __init__(self, log_dir: str | os.PathLike[str], file_name: str = "rlm") -> None:
        self.log_dir = Path(log_dir)
        timestamp = datetime.now().strftime("%Y-%m-%d_%H-%M-%S")
        self.log_file_path = str(
            self.log_dir / f"{file_name}_{timestamp}_{uuid.uuid4().hex[:8]}.jsonl"
        )
        self._iteration_count = 0
        self._metadata_logged = False

    def _append(self, entry: dict[str, Any]) -> None:
        self.log_dir.mkdir(parents=True, exist_ok=True)
        with open(self.log_file_path, "a", encoding="utf-8") as log:
            log.write(json.dumps(entry, default=str) + "\n")

    def log_metadata(self, metadata: RLMMetadata) -> None:
        if self._metadata_logged:
            return
        entry = metadata.to_dict()
        entry["backend_kwargs"] = redact(entry["backend_kwargs"])
        entry["environment_kwargs"] = redact(entry["environment_kwargs"])
        self._append({"type": "metadata", "timestamp": datetime.now().isoformat(), **entry})
        self._metadata_logged = True

    def log(self, iteration: RLMIteration) -> None:
        self._iteration_count += 1
        self._append(
            {
                "type": "iteration",
                "iteration": self._iteration_count,
                "timestamp": datetime.now().isoformat(),
                **iteration.to_dict(),
            }
        )

    @property
    def iteration_count(self) -> int:
        return self._iteration_count
