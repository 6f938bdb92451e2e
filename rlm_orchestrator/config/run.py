"""`rlm-orchestrator run`'s settings: flags > RLM_RUN_* variables > the `[run]` table of its file.

Its file is ./rlm.toml, or the one `--config` or RLM_RUN_CONFIG names, and `run` reads only
its `[run]` table: a server's config (top-level `listen`, `[[models]]`...) is never taken for
run's. A file named on purpose must have a `[run]` table and nothing else; ./rlm.toml without
one is not read (the CLI says so). With `--server`, none of this is read: only the flags go to
the server, whose own config decides the rest.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated, Any

from pydantic import AfterValidator, Field, PrivateAttr
from pydantic_settings import SettingsConfigDict

from rlm_orchestrator.config import limits
from rlm_orchestrator.config.answer import FINAL, AnswerConvention
from rlm_orchestrator.config.fences import DEFAULT_CODE_FENCES, CodeFences
from rlm_orchestrator.config.lm import DEFAULT_MAX_TOKENS, TokenPrice, Transport, check_backend
from rlm_orchestrator.config.loading import (
    Layer,
    env_layer,
    file_layer,
    flag_layer,
    load,
    read_toml,
)
from rlm_orchestrator.config.sandbox import SandboxSettings
from rlm_orchestrator.exceptions import ConfigurationError

CONFIG_ENV = "RLM_RUN_CONFIG"
# What run's variables were called before they had a prefix of their own (RLM_ is shared by
# every variable of the project): refused with the new name rather than silently unread.
RENAMED = {"RLM_CONFIG_FILE": CONFIG_ENV, "RLM_EXEC_TIMEOUT_SECONDS": "RLM_RUN_ENVIRONMENT_KWARGS"}
DEFAULT_FILE = Path("rlm.toml")
TABLE = "run"
# The flag that sets each setting, for messages ("--max-iterations: ...").
FLAGS = {
    "model": "--model",
    "sub_model": "--sub-model",
    "backend": "--backend",
    "api_base": "--api-base",
    "api_key": "--api-key",
    "environment": "--environment",
    "environment_kwargs.exec_timeout_seconds": "--exec-timeout",
    "max_iterations": "--max-iterations",
    "max_depth": "--max-depth",
    "timeout_seconds": "--timeout",
    "max_cost": "--max-cost",
    "log_dir": "--log-dir",
    "answer_convention": "--answer-convention",
    "code_fences": "--code-fences",
    "input_cost_per_token": "--input-cost-per-token",
    "output_cost_per_token": "--output-cost-per-token",
    "max_tokens": "--max-tokens",
    "context_window": "--context-window",
    "request_timeout_seconds": "--request-timeout",
}


class RunSettings(SandboxSettings):
    """What `rlm-orchestrator run` runs with; the same names and types as RLM's arguments
    (environment_kwargs: the backend's keys, the sandbox limits, setup_code)."""

    model_config = SettingsConfigDict(
        env_prefix="RLM_RUN_", env_nested_delimiter="__", extra="forbid"
    )

    backend: Annotated[str, AfterValidator(check_backend)] = "openai"
    model: str = "gpt-4o-mini"
    sub_model: str | None = None
    api_base: str | None = None
    # The model's key (for an OpenAI-compatible server: none needed). Else the provider's
    # variable (OPENAI_API_KEY, ...). A flag or RLM_RUN_API_KEY; better not in a file.
    api_key: str | None = Field(default=None, repr=False)
    # How the models are reached (config/lm.py): "litellm" forces litellm.
    transport: Transport = "auto"
    # USD per token of the root and the sub model, when litellm has no price for them (a local
    # model): what --max-cost counts. Set, they replace litellm's price.
    input_cost_per_token: TokenPrice | None = None
    output_cost_per_token: TokenPrice | None = None
    max_iterations: limits.MaxIterations = limits.DEFAULT_MAX_ITERATIONS
    max_depth: limits.MaxDepth = limits.DEFAULT_MAX_DEPTH
    timeout_seconds: limits.Seconds | None = None
    max_cost: limits.Usd | None = None
    log_dir: Path | None = None
    # How the model gives its answer: FINAL / FINAL_VAR, or upstream's `answer` dict.
    answer_convention: AnswerConvention = FINAL
    # The fenced blocks that run: ```repl; "repl,python" also runs ```python blocks.
    code_fences: CodeFences = DEFAULT_CODE_FENCES
    # The limits of each model call (root and sub): output tokens (0: none sent), the window
    # (for local or unknown models), and the seconds one call may take.
    max_tokens: Annotated[int, Field(ge=0)] = DEFAULT_MAX_TOKENS
    context_window: Annotated[int, Field(gt=0)] | None = None
    request_timeout_seconds: limits.Seconds | None = None

    # ./rlm.toml when it was there but had no [run] table (so it was not read).
    _unread_file: Path | None = PrivateAttr(default=None)

    @property
    def unread_file(self) -> Path | None:
        return self._unread_file

    def model_limits(self) -> dict[str, Any]:
        """The backend_kwargs of the call limits set here (config/lm.py's keys)."""
        kwargs: dict[str, Any] = {"max_tokens": self.max_tokens}
        if self.context_window is not None:
            kwargs["context_window"] = self.context_window
        if self.request_timeout_seconds is not None:
            kwargs["timeout"] = self.request_timeout_seconds
        return kwargs


def load_run_settings(
    flags: dict[str, Any], config_file: Path | None = None, *, read_sources: bool = True
) -> RunSettings:
    """The settings with the flags the user gave (None: not given) on top. Without
    `read_sources` (run --server), the flags alone are validated."""
    layers = [flag_layer(flags, FLAGS)]
    unread: Path | None = None
    if read_sources:
        _refuse_renamed_variables()
        layers.append(env_layer(RunSettings, allowed={CONFIG_ENV}))
        layer, unread = _file_layer(config_file)
        if layer is not None:
            layers.append(layer)
    settings = load(RunSettings, layers)
    settings._unread_file = unread
    return settings


def _refuse_renamed_variables() -> None:
    fields = [field.upper() for field in RunSettings.model_fields]
    renamed = {f"RLM_{field}": f"RLM_RUN_{field}" for field in fields}
    for old, new in {**renamed, **RENAMED}.items():
        if old in os.environ:
            raise ConfigurationError(f"{old}: run's variables are RLM_RUN_* now: use {new}")


def _file_layer(config_file: Path | None) -> tuple[Layer | None, Path | None]:
    """The [run] table of run's file, or (None, ./rlm.toml) when that file has none."""
    named = config_file or (Path(os.environ[CONFIG_ENV]) if os.environ.get(CONFIG_ENV) else None)
    path = named or DEFAULT_FILE
    if named is None and not path.is_file():
        return None, None
    data = read_toml(path)
    table = data.get(TABLE)
    if table is None and named is None:
        return None, path
    if table is None:
        raise ConfigurationError(
            f"{path}: no [run] table: `run` reads its settings from [run] only (a server's "
            "config is read by `serve --config`)"
        )
    others = [key for key in data if key != TABLE]
    if others:
        raise ConfigurationError(
            f"{path}: {others[0]}: not part of the [run] table, and run's file holds nothing "
            "else (a server's config belongs in a file of its own, for `serve --config`)"
        )
    if not isinstance(table, dict):
        raise ConfigurationError(f"{path}: run: must be a table ([run])")
    return file_layer(path, table, (TABLE,)), None
