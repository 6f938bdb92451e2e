"""Settings shared by the CLI (and later the server): env vars `RLM_*`, then a TOML file.

Precedence: command-line flags > environment (RLM_MODEL, ...) > the file named by
RLM_CONFIG_FILE (default ./rlm.toml, if present) > defaults.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from pydantic import Field
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    TomlConfigSettingsSource,
)


class RunSettings(BaseSettings):
    """Defaults of `rlm-orchestrator run`."""

    model_config = SettingsConfigDict(env_prefix="RLM_", extra="ignore")

    backend: str = "openai"
    model: str = "gpt-4o-mini"
    sub_model: str | None = None
    api_base: str | None = None
    environment: str = "local"
    max_iterations: int = Field(30, ge=1)
    max_depth: int = Field(1, ge=0)
    exec_timeout_seconds: float = Field(300.0, gt=0)
    timeout_seconds: float | None = None
    max_cost: float | None = None
    log_dir: Path | None = None

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        config_file = Path(os.environ.get("RLM_CONFIG_FILE", "rlm.toml"))
        sources: list[PydanticBaseSettingsSource] = [init_settings, env_settings]
        if config_file.is_file():
            sources.append(TomlConfigSettingsSource(settings_cls, toml_file=config_file))
        return tuple(sources)


def load_run_settings(**overrides: Any) -> RunSettings:
    """Settings with the flags the user gave (None = not given) on top."""
    return RunSettings(**{k: v for k, v in overrides.items() if v is not None})
